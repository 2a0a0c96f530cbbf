"""``sparsealloc study run|resume|list|show``: search studies over the store."""

from __future__ import annotations

import argparse

from sparsealloc.cli.common import DEFAULT_MODEL, fraction, positive_int
from sparsealloc.core.errors import SpecError
from sparsealloc.core.keys import DEFAULT_STORAGE, FAIL_REASON, SPEC_ATTR, VALIDATION, WARM_START


def register(sub) -> None:
    parser = sub.add_parser("study", help="run, resume and inspect search studies")
    study_sub = parser.add_subparsers(dest="study_command", metavar="ACTION", parser_class=type(parser))
    study_sub.required = True

    from sparsealloc.spaces.spec import EVO_RADIUS, RADIUS, StudySpec

    d = StudySpec()  # the defaults the help shows
    run = study_sub.add_parser("run", help="start (or continue) a study")
    run.add_argument("spec", nargs="?", metavar="SPEC.yaml", help="study spec (YAML or JSON); flags override it")
    run.add_argument("--name", help="study name (default: from the spec, else 'study')")
    _add_storage(run)
    run.add_argument("--model", default=None, help=f"model (default {DEFAULT_MODEL})")
    run.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    run.add_argument("--target-sparsity", type=fraction, default=None,
                     help=f"parameter-weighted mean sparsity every candidate meets exactly "
                          f"(default {d.target_sparsity})")
    run.add_argument("--space", default=None,
                     help="comma list of layerwise, metric, kv, allocator, layer_drop (default layerwise)")
    run.add_argument("--granularity", default=None,
                     help="block, bins, projection or module (default block; module for the evo sampler)")
    run.add_argument("--radius", type=fraction, default=None,
                     help=f"ratio window around the target (default {RADIUS}; {EVO_RADIUS} for the evo sampler)")
    run.add_argument("--metric", default=None, help="fixed pruning metric (default wanda)")
    run.add_argument("--kv-budget", type=float, default=None, metavar="BITS",
                     help="with kv in the space: mean bits per K/V slot every candidate meets")
    run.add_argument("--kv-budget-bytes", type=float, default=None, metavar="BYTES",
                     help="with kv in the space: KV-cache bytes per token (all layers) every candidate meets")
    run.add_argument("--seed-plan", action="append", default=None, metavar="PLAN.json",
                     help="queue this exported plan as an extra warm start (repeatable; e.g. budgeted optima "
                          "seeding a front)")
    run.add_argument("--objectives", default=None,
                     help="comma list: kl|reconstruction|hidden|layer_local[,remaining_weights][,kv_bytes] "
                          "(default hidden; kl for the evo sampler)")
    run.add_argument("--early-stopping", default=None, metavar="PRUNER",
                     help="none, median or successive_halving (stop bad trials after a calibration batch)")
    run.add_argument("--gram-rung", action="store_true", default=None,
                     help="with successive_halving: a zero-forward first rung from per-layer Gram matrices")
    run.add_argument("--sampler", default=None,
                     help=f"tpe, cmaes (one objective), evo (EvoPress level-switch search, one objective), "
                          f"nsga3, optuna-nsga3 or random (default {d.sampler})")
    run.add_argument("--population-size", type=positive_int, default=None,
                     help=f"population of the nsga3 and optuna-nsga3 samplers (default {d.population_size})")
    run.add_argument("--trials", type=positive_int, default=None,
                     help=f"COMPLETE trials to reach (default {d.trials})")
    run.add_argument("--timeout", type=float, default=None, help="seconds")
    run.add_argument("--seed", type=int, default=None, help=f"sampler seed (default {d.seed})")
    run.add_argument("--calib-text", metavar="FILE", default=None,
                     help="calibration text file (default: built-in text)")
    run.add_argument("--calib-dataset", metavar="NAME[:CONFIG[:SPLIT]]", default=None,
                     help="calibration text from a Hugging Face dataset")
    run.add_argument("--calib-domains", metavar="FILE", nargs="+", default=None,
                     help="calibration text from several files, one domain each (e.g. prose and code), read as one "
                          "text; evo's stages draw each domain in proportion")
    run.add_argument("--domain-weights", metavar="W", type=float, nargs="+", default=None,
                     help="one relative weight per calibration domain (e.g. 1 1: each domain counts the same in the "
                          "proxy; default: each token counts the same)")
    run.add_argument("--calib-windows", metavar="CALIB.jsonl", default=None,
                     help="windows from 'sparsealloc calib select' (replace the text, samples and seq-len)")
    run.add_argument("--calib-samples", type=positive_int, default=None,
                     help="calibration windows: the pruning statistics, and what trials score unless "
                          f"--score-samples (default {d.calibration.samples})")
    run.add_argument("--calib-seq-len", type=positive_int, default=None,
                     help=f"tokens per calibration window (default {d.calibration.seq_len})")
    run.add_argument("--score-samples", type=int, default=None,
                     help="score trials on this many other windows of the calibration text, disjoint from the "
                          "--calib-samples windows the pruning statistics come from (default 0: on those)")
    run.add_argument("--eval-text", metavar="FILE", nargs="+", default=None,
                     help="held-out text(s) for validation (default: built-in held-out text); with several (one "
                          "per calibration domain, say) a plan's validation PPL is the geometric mean over them")
    run.add_argument("--eval-windows", type=positive_int, default=None,
                     help=f"validation windows (default {d.validation.windows})")
    run.add_argument("--eval-seq-len", type=positive_int, default=None,
                     help=f"tokens per validation window (default {d.validation.seq_len})")
    run.add_argument("--validate-top", type=int, default=None,
                     help=f"re-score this many best trials by held-out perplexity (default {d.validation.top_k})")
    run.add_argument("--validate-seconds", type=float, default=None,
                     help="time bound of validation (default: as long as the search took, at least 120 s; the "
                          "best plan is always validated)")
    run.add_argument("--no-validate", action="store_true", help="skip re-scoring the best trials on held-out text")
    run.add_argument("--export", metavar="DIR", default=None, help="export the result here when done")
    _add_workers(run)
    run.set_defaults(handler=run_command)

    resume = study_sub.add_parser("resume", help="finish an interrupted study")
    resume.add_argument("name")
    _add_storage(resume)
    resume.add_argument("--trials", type=positive_int, default=None, help="new budget (default: the stored one)")
    resume.add_argument("--timeout", type=float, default=None)
    resume.add_argument("--device", default=None)
    resume.add_argument("--no-validate", action="store_true")
    resume.add_argument("--export", metavar="DIR", default=None)
    _add_workers(resume)
    resume.set_defaults(handler=resume_command)

    listing = study_sub.add_parser("list", help="studies in the store")
    _add_storage(listing)
    listing.set_defaults(handler=list_command)

    show = study_sub.add_parser("show", help="one study: best values, Pareto size, states, proxy↔PPL")
    show.add_argument("name")
    _add_storage(show)
    show.set_defaults(handler=show_command)


def _add_workers(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workers (Ray)")
    group.add_argument("--workers", type=int, default=0, help="Ray scorer actors (default 0: in-process)")
    group.add_argument("--ray-address", default=None, help="'auto' or HOST:PORT of a Ray cluster (default: start one)")
    group.add_argument("--gpus-per-worker", type=float, default=0.0, help="num_gpus per actor (fractional allowed)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help="num_cpus per actor")


def check_workers(args: argparse.Namespace) -> None:
    if args.workers < 0 or args.gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        raise SpecError(f"expected --workers >= 0, --gpus-per-worker >= 0 and --cpus-per-worker > 0, but got "
                        f"{args.workers}, {args.gpus_per_worker}, {args.cpus_per_worker}")


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help=f"study store URL (default {DEFAULT_STORAGE})")


def spec_from_args(args: argparse.Namespace):
    """The StudySpec: file (if any) overridden by flags."""
    from sparsealloc.spaces.spec import StudySpec

    base = StudySpec.load(args.spec).to_dict() if args.spec else {}
    flat = {"name": args.name, "model": args.model, "device": args.device, "target_sparsity": args.target_sparsity,
            "space": args.space, "objectives": args.objectives, "sampler": args.sampler,
            "population_size": args.population_size, "trials": args.trials, "timeout": args.timeout, "seed": args.seed,
            "seed_plans": args.seed_plan}
    base.update({k: v for k, v in flat.items() if v is not None})
    sections = {
        "layerwise": {"granularity": args.granularity, "radius": args.radius},
        "metric": {"name": args.metric},
        "kv": {"budget": args.kv_budget, "budget_bytes": args.kv_budget_bytes},
        "calibration": {"text": args.calib_text, "dataset": args.calib_dataset, "samples": args.calib_samples,
                        "seq_len": args.calib_seq_len, "windows_file": args.calib_windows,
                        "score_samples": args.score_samples, "domains": args.calib_domains,
                        "domain_weights": args.domain_weights},
        "validation": {"text": args.eval_text[0] if args.eval_text else None,
                       "extra_texts": args.eval_text[1:] if args.eval_text else None, "windows": args.eval_windows, "seq_len": args.eval_seq_len,
                       "top_k": args.validate_top, "max_seconds": args.validate_seconds},
        "early_stopping": {"pruner": args.early_stopping, "gram_rung": args.gram_rung},
    }
    for key, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            base[key] = {**base.get(key, {}), **given}
    return StudySpec.from_dict(base)


def run_command(args: argparse.Namespace) -> int:
    return _execute(spec_from_args(args), args)


def resume_command(args: argparse.Namespace) -> int:
    from sparsealloc.search.session import stored_spec
    from sparsealloc.storage.rdb import open_storage

    spec = stored_spec(open_storage(args.storage, create=False), args.name)
    return _execute(spec.override(trials=args.trials, timeout=args.timeout, device=args.device), args)


def _execute(spec, args: argparse.Namespace) -> int:
    """:func:`sparsealloc.search.study.run` in process, or on Ray actors with ``--workers N``."""
    from sparsealloc.search.study import run
    from sparsealloc.storage.rdb import parse_storage_url

    parse_storage_url(args.storage)
    check_workers(args)
    ray = {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
           "gpus_per_worker": args.gpus_per_worker, "address": args.ray_address}
    run(spec, args.storage, dispatcher="ray" if args.workers else "local",
        dispatcher_options=ray if args.workers else None, validate=not args.no_validate, export_dir=args.export,
        echo=print)
    return 0


def list_command(args: argparse.Namespace) -> int:
    import optuna

    from sparsealloc.storage.rdb import open_storage, state_counts, store_errors

    rows = []
    with store_errors(args.storage):
        storage = open_storage(args.storage, create=False)
        for summary in optuna.get_all_study_summaries(storage):
            states = state_counts(optuna.load_study(study_name=summary.study_name, storage=storage))
            rows.append((summary.study_name, len(summary.directions), states))
    if not rows:
        print("no studies")
    for name, n_obj, states in rows:
        print(f"{name}  objectives={n_obj}  " + " ".join(f"{k}={v}" for k, v in states.items()))
    return 0


def show_command(args: argparse.Namespace) -> int:
    from sparsealloc.storage.rdb import load_study, open_storage, state_counts, store_errors

    with store_errors(args.storage):
        study = load_study(open_storage(args.storage, create=False), args.name)
    print(f"study: {study.study_name}")
    print(f"objectives: {study.metric_names or ['value'] * len(study.directions)}")
    print("trials: " + " ".join(f"{k}={v}" for k, v in state_counts(study).items()))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        if len(study.directions) == 1:
            best = study.best_trial
            print(f"best: trial {best.number} value {best.values[0]:.6g} {best.user_attrs.get(WARM_START) or ''}")
        else:
            print(f"pareto set: {len(study.best_trials)} trials")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    for t in failed[:5]:
        print(f"failed trial {t.number}: {t.user_attrs.get(FAIL_REASON, '?')}")
    validation = study.user_attrs.get(VALIDATION)
    if validation:
        from sparsealloc.search.study import validation_lines

        print("\n".join(validation_lines(study, validation)))
    elif complete:
        print(f"validation: {not_validated_hint(study, args.storage)}")
    return 0


def not_validated_hint(study, storage_url: str) -> str:
    """Why a study holds no held-out perplexities, and the command that adds them.

    ``study resume`` without ``--no-validate`` validates the best trials of the stored spec (a study
    that already has its trials runs none), unless the spec asks for none (``validation.top_k: 0``).
    """
    from sparsealloc.search.study import resume_command

    spec = study.user_attrs.get(SPEC_ATTR)
    if not spec:
        return "not run (the study was not made by sparsealloc study run)"
    if (spec.get("validation") or {}).get("top_k") == 0:
        return "off (the study's spec sets validation top_k: 0)"
    return (f"not run (the run had --no-validate or stopped before validating); add it with: "
            f"{resume_command(study.study_name, storage_url)}")

