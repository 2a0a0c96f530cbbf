"""``sparsealloc study run|resume|list|show``: search studies over the store."""

from __future__ import annotations

import argparse
import shlex
import time
from typing import Any

from sparsealloc.cli.common import DEFAULT_MODEL, fraction, positive_int
from sparsealloc.core.errors import SpecError

DEFAULT_STORAGE = "sqlite:///sparsealloc.db"
HEARTBEAT_SECONDS = 10


def register(sub) -> None:
    parser = sub.add_parser("study", help="run, resume and inspect search studies")
    study_sub = parser.add_subparsers(dest="study_command", metavar="ACTION", parser_class=type(parser))
    study_sub.required = True

    run = study_sub.add_parser("run", help="start (or continue) a study")
    run.add_argument("spec", nargs="?", metavar="SPEC.yaml", help="study spec (YAML or JSON); flags override it")
    run.add_argument("--name", help="study name (default: from the spec, else 'study')")
    _add_storage(run)
    run.add_argument("--model", default=None, help=f"model (default {DEFAULT_MODEL})")
    run.add_argument("--device", default=None)
    run.add_argument("--target-sparsity", type=fraction, default=None)
    run.add_argument("--space", default=None, help="comma list of layerwise, metric, kv, allocator")
    run.add_argument("--granularity", default=None, help="block, bins, projection or module")
    run.add_argument("--radius", type=fraction, default=None, help="ratio window around the target")
    run.add_argument("--metric", default=None, help="fixed pruning metric (default wanda)")
    run.add_argument("--objectives", default=None,
                     help="comma list: kl|reconstruction|hidden|layer_local[,remaining_weights][,kv_bytes]")
    run.add_argument("--early-stopping", default=None, metavar="PRUNER",
                     help="none, median or successive_halving (stop bad trials after a calibration batch)")
    run.add_argument("--gram-rung", action="store_true", default=None,
                     help="with successive_halving: a zero-forward first rung from per-layer Gram matrices")
    run.add_argument("--sampler", default=None, help="tpe, cmaes, nsga3, optuna-nsga3 or random")
    run.add_argument("--population-size", type=positive_int, default=None)
    run.add_argument("--trials", type=positive_int, default=None, help="COMPLETE trials to reach")
    run.add_argument("--timeout", type=float, default=None, help="seconds")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--calib-text", metavar="FILE", default=None)
    run.add_argument("--calib-dataset", metavar="NAME[:CONFIG[:SPLIT]]", default=None)
    run.add_argument("--calib-windows", metavar="CALIB.jsonl", default=None,
                     help="windows from 'sparsealloc calib select' (replace the text, samples and seq-len)")
    run.add_argument("--calib-samples", type=positive_int, default=None)
    run.add_argument("--calib-seq-len", type=positive_int, default=None)
    run.add_argument("--eval-text", metavar="FILE", default=None, help="held-out text for validation")
    run.add_argument("--eval-windows", type=positive_int, default=None)
    run.add_argument("--eval-seq-len", type=positive_int, default=None)
    run.add_argument("--validate-top", type=int, default=None, help="re-score this many best trials by PPL")
    run.add_argument("--no-validate", action="store_true")
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


def make_dispatcher(args: argparse.Namespace, spec, evaluator):
    """In-process by default; a Ray actor pool with ``--workers N``."""
    if args.workers == 0:
        from sparsealloc.search.dispatch.local import LocalDispatcher

        return LocalDispatcher(evaluator)
    from sparsealloc.search.dispatch.ray_pool import RayDispatcher

    if spec.early_stopping.enabled:
        print("note: early stopping runs in process only; Ray workers score every trial to full fidelity")
    return RayDispatcher(spec, evaluator.ctx.windows, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                         gpus_per_worker=args.gpus_per_worker, address=args.ray_address)


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help=f"study store URL (default {DEFAULT_STORAGE})")


def spec_from_args(args: argparse.Namespace):
    """The StudySpec: file (if any) overridden by flags."""
    from sparsealloc.spaces.spec import StudySpec

    base = StudySpec.load(args.spec).to_dict() if args.spec else {}
    flat = {"name": args.name, "model": args.model, "device": args.device, "target_sparsity": args.target_sparsity,
            "space": args.space, "objectives": args.objectives, "sampler": args.sampler,
            "population_size": args.population_size, "trials": args.trials, "timeout": args.timeout, "seed": args.seed}
    base.update({k: v for k, v in flat.items() if v is not None})
    sections = {
        "layerwise": {"granularity": args.granularity, "radius": args.radius},
        "metric": {"name": args.metric},
        "calibration": {"text": args.calib_text, "dataset": args.calib_dataset, "samples": args.calib_samples,
                        "seq_len": args.calib_seq_len, "windows_file": args.calib_windows},
        "validation": {"text": args.eval_text, "windows": args.eval_windows, "seq_len": args.eval_seq_len,
                       "top_k": args.validate_top},
        "early_stopping": {"pruner": args.early_stopping, "gram_rung": args.gram_rung},
    }
    for key, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            base[key] = {**base.get(key, {}), **given}
    return StudySpec.from_dict(base)


def run_command(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    return _execute(spec, args, validate=not args.no_validate, export_dir=args.export)


def resume_command(args: argparse.Namespace) -> int:
    from sparsealloc.search.session import stored_spec
    from sparsealloc.storage.rdb import open_storage

    spec = stored_spec(open_storage(args.storage, create=False), args.name)
    spec = spec.override(trials=args.trials, timeout=args.timeout, device=args.device)
    return _execute(spec, args, validate=not args.no_validate, export_dir=args.export)


def _execute(spec, args: argparse.Namespace, validate: bool, export_dir: str | None) -> int:
    from sparsealloc.search.session import build_evaluator, preflight
    from sparsealloc.search.samplers.base import SAMPLERS
    from sparsealloc.storage.rdb import check_storage, parse_storage_url, redact, store_errors

    from sparsealloc.core.errors import check_output_dir

    storage_url = parse_storage_url(args.storage)
    check_workers(args)
    SAMPLERS.get(spec.sampler)
    if export_dir:
        check_output_dir(export_dir, "--export")
    # Nothing is loaded or written before the inputs, the store and the model have been checked.
    preflight(spec, validate)
    check_storage(storage_url)
    start = time.perf_counter()
    evaluator = build_evaluator(spec)
    setup_s = time.perf_counter() - start
    hint = (f"trials written so far are kept; continue with: sparsealloc study resume {shlex.quote(spec.name)} "
            f"--storage {shlex.quote(redact(storage_url))}")
    with store_errors(storage_url, hint):
        return _search(spec, args, evaluator, storage_url, setup_s, validate, export_dir)


def _search(spec, args: argparse.Namespace, evaluator, storage_url: str, setup_s: float, validate: bool,
            export_dir: str | None) -> int:
    from sparsealloc.core.errors import writing
    from sparsealloc.search.orchestrator import run_study
    from sparsealloc.search.session import enqueue_warm_starts, open_sampler
    from sparsealloc.search.session import validate as validate_study
    from sparsealloc.storage.export import export_study
    from sparsealloc.storage.rdb import open_storage, recover_orphans

    shared = not storage_url.startswith("sqlite")
    # Shared stores (PostgreSQL) may have several orchestrators: heartbeats instead of orphan sweeps.
    storage = open_storage(storage_url, heartbeat_interval=HEARTBEAT_SECONDS if shared else None)
    sampler = open_sampler(spec, storage, evaluator.space)
    orphans = [] if shared else recover_orphans(sampler.study)
    if orphans:
        print(f"re-queued {len(orphans)} trial(s) left RUNNING by an earlier run: {orphans}")
    enqueue_warm_starts(sampler, evaluator)
    dispatcher = make_dispatcher(args, spec, evaluator)
    try:
        result = run_study(sampler, dispatcher, spec.trials, spec.timeout)
    finally:
        dispatcher.close()
    study = sampler.study
    print(f"study: {spec.name}  store: {storage_url}  space: {','.join(spec.space)}  sampler: {spec.sampler}")
    print(f"setup: {setup_s:.1f} s  trials this run: {dict(result.told)}  in {result.seconds:.1f} s")
    if validate and spec.validation.top_k > 0:
        validation = validate_study(study, evaluator, spec)
        _print_validation(study, validation.to_dict())
    if export_dir:
        from sparsealloc.storage.export import plan_of

        from sparsealloc.storage.artifacts import attach_files, default_artifact_dir

        with writing(f"the exported plans to {export_dir!r}"):
            paths = export_study(study, export_dir)
            attach_files(study, paths, default_artifact_dir(storage_url))  # shown by sparsealloc dashboard
        for path in paths:
            print(f"exported: {path}")
        if len(paths) == 1:
            ppl = plan_of(study, study.best_trial).provenance.get("validation", {}).get("perplexity")
            if ppl is not None:
                print(f"exported plan perplexity: {ppl:.3f}")
    return 0


def _print_validation(study, validation: dict[str, Any]) -> None:
    from sparsealloc.search.session import warm_start_trials

    names = {t.number: f"warm start: {n}" for n, t in warm_start_trials(study).items()}
    best = study.best_trial.number if len(study.directions) == 1 else None
    print("validation (held-out perplexity):")
    for number, ppl in sorted(validation["ppl"].items(), key=lambda kv: kv[1]):
        label = names.get(int(number), "best" if int(number) == best else "")
        print(f"  trial {int(number):4d}  proxy {validation['proxy'][number]:.5g}  ppl {ppl:10.3f}  {label}")
    rho = validation.get("spearman")
    print(f"  spearman(proxy, ppl) = {rho:.3f}" if rho is not None else "  spearman: too few trials")


def list_command(args: argparse.Namespace) -> int:
    import optuna

    from sparsealloc.storage.rdb import open_storage, store_errors

    rows = []
    with store_errors(args.storage):
        storage = open_storage(args.storage, create=False)
        for summary in optuna.get_all_study_summaries(storage):
            states = _state_counts(optuna.load_study(study_name=summary.study_name, storage=storage))
            rows.append((summary.study_name, len(summary.directions), states))
    if not rows:
        print("no studies")
    for name, n_obj, states in rows:
        print(f"{name}  objectives={n_obj}  " + " ".join(f"{k}={v}" for k, v in states.items()))
    return 0


def _state_counts(study) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False)))


def show_command(args: argparse.Namespace) -> int:
    from sparsealloc.storage.rdb import load_study, open_storage, store_errors

    with store_errors(args.storage):
        study = load_study(open_storage(args.storage, create=False), args.name)
    print(f"study: {study.study_name}")
    print(f"objectives: {study.metric_names or ['value'] * len(study.directions)}")
    print("trials: " + " ".join(f"{k}={v}" for k, v in _state_counts(study).items()))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        if len(study.directions) == 1:
            best = study.best_trial
            print(f"best: trial {best.number} value {best.values[0]:.6g} {best.user_attrs.get('warm_start') or ''}")
        else:
            print(f"pareto set: {len(study.best_trials)} trials")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    for t in failed[:5]:
        print(f"failed trial {t.number}: {t.user_attrs.get('fail_reason', '?')}")
    validation = study.user_attrs.get("validation")
    if validation:
        _print_validation(study, validation)
    return 0

