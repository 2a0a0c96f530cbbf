"""Search quality on SmolLM2: each sampler's exported plan against the best hand rules, in one run.

Protocol (one process, one model load, per setting one calibration pass shared by every plan):

* text: WikiText-2 ``valid.txt`` split by lines, the first 70% for calibration (a pool of
  ``--calib-samples`` windows × ``--calib-seq-len`` tokens (256), seed 0) and the last 30% for the studies' validation
  (8 windows × 512, the text that picks the exported plan); evaluation on two held-out texts that
  neither the search nor its validation saw: WikiText-2 ``test.txt`` (first 20 windows × 512) and
  the built-in Python-docs evaluation split (first 20 windows × 512; another domain);
* hand rules: uniform, OWL (M=5, λ grid) and ATP's depth ramp (β grid), each grid point measured
  (so "best" uses the test text: it favours the hand rules);
* each sampler: one study limited by wall time (``--minutes``), warm starts uniform / OWL /
  depth ramp (each the best of its grid by the proxy), validated and exported as ``study run``
  does (the exported plan is the best validated one); its plan and its lowest-proxy plan are
  measured on both held-out texts.

    python benchmarks/search_quality.py --settings wanda:0.7 --samplers evo --minutes 25
    python benchmarks/search_quality.py --settings wanda:0.7 sparsegpt:0.7 wanda:0.5 \
        --samplers evo tpe cmaes --minutes 30
    python benchmarks/search_quality.py --settings wanda:0.7 --samplers evo evo:merge=true  # evo settings A/B
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import pandas as pd
import torch

from _common import ROOT, WIKITEXT, Timer, load_smollm2, machine, markdown_table, require_data

EVAL_SEQ_LEN = 512


#: evo's tuning flags: flag (= spec key) → (spec section, how the report describes a given value).
TUNING = {
    "level_step": ("layerwise", "evo's level step {} of the mean Linear size"),
    "radius": ("layerwise", "sparsity window ±{} around the target"),
    "max_swaps": ("evo", "evo's max swaps {}"),
    "switch_sparsity": ("evo", "evo's switch sparsity {}"),
    "offspring": ("evo", "evo's offspring {}"),
    "stages": ("evo", "evo's stages {}"),
}


def sampler_variant(entry: str) -> tuple[str, dict[str, object]]:
    """A ``--samplers`` entry: ``name``, or ``name:key=value,...`` with evo settings for that study
    alone (JSON values, e.g. ``evo:merge=true``), so that two variants share one run's hand rules."""
    name, _, rest = entry.partition(":")
    overrides = {}
    for pair in filter(None, re.split(r",(?=\w+=)", rest)):  # a comma before the next key=
        key, eq, value = pair.partition("=")
        if not eq:
            raise ValueError(f"expected --samplers entries like evo or evo:merge=true, but got {entry!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"expected a JSON value for {key} in {entry!r} (true, 0.05, [[2, 2], [8, 1]]...), "
                             f"but got {value!r}") from None
    return name, overrides


def tuning(args) -> list[tuple[str, str, object]]:
    """The tuning flags given on the command line: ``(spec key, spec section, value)``, in TUNING's order."""
    return [(key, section, getattr(args, key)) for key, (section, _) in TUNING.items() if getattr(args, key)]


def _shown(value, quote: bool = False) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"'{text}'" if quote else text


def calibration_parts(mix: str | None = None) -> list[str]:
    """The calibration text's parts, one per domain: the first 70% of WikiText-2 valid, or with ``mix``
    (another text) as many characters of each (a mixed-domain calibration set; Williams & Aletras,
    2024, on the calibration data's effect on pruning)."""
    lines = (WIKITEXT / "valid.txt").read_text().splitlines(keepends=True)
    wiki = "".join(lines[:int(len(lines) * 0.7)])
    return [wiki[:len(mix)], mix[:len(wiki)]] if mix else [wiki]


def split_valid(folder: Path, mix: str | None = None) -> tuple[Path, Path]:
    """Calibration text (the first 70% of WikiText-2 valid; with ``mix`` half that, half ``mix``, see
    :func:`calibration_parts`) and validation text (its last 30%)."""
    lines = (WIKITEXT / "valid.txt").read_text().splitlines(keepends=True)
    calib, val = folder / "calib.txt", folder / "validation.txt"
    calib.write_text("\n\n".join(calibration_parts(mix)))
    val.write_text("".join(lines[int(len(lines) * 0.7):]))
    return calib, val


def unused_part_text(tokenizer, calib_text: Path, parts: list[str], samples: int, seq_len: int, seed: int = 0,
                     min_tokens: int = 64) -> str:
    """The last part of the calibration text (the Python-docs half with ``--calib-mix``) without the
    tokens of the statistics windows: held-out text of that domain for validation. The pool's windows
    are where ``sample_windows`` draws them in the whole text (``window_starts``, the calibration seed);
    the runs of at least ``min_tokens`` tokens of the last part that none of them covers are decoded and
    joined by blank lines."""
    from sparsealloc.pruning import tokenize_stream
    from sparsealloc.pruning.calibration.text import window_starts

    text = calib_text.read_text()
    stream = tokenize_stream(tokenizer, text)
    before = len(tokenize_stream(tokenizer, text[: -len(parts[-1])])) + 8  # a margin at the seam
    covered = torch.zeros(stream.numel(), dtype=torch.bool)
    for start in window_starts(stream.numel(), samples, seq_len, seed):
        covered[start : start + seq_len] = True
    covered[:before] = True
    runs, start = [], None
    for i, taken in enumerate([*covered.tolist(), True]):
        if not taken and start is None:
            start = i
        elif taken and start is not None:
            if i - start >= min_tokens:
                runs.append(tokenizer.decode(stream[start:i].tolist()))
            start = None
    return "\n\n".join(runs)


def heldout_streams(tokenizer) -> dict[str, list[int]]:
    """This protocol's two held-out texts, tokenized: WikiText-2 test and the built-in Python-docs
    evaluation topics."""
    from sparsealloc.pruning import TextSource, tokenize_stream

    return {"wikitext2-test": tokenize_stream(tokenizer, (WIKITEXT / "test.txt").read_text()),
            "python-docs": tokenize_stream(tokenizer, TextSource("builtin", "eval").read())}


def protocol_evaluator(model, tokenizer, target: float = 0.7, samples: int = 32, seq_len: int = 256,
                       mix: bool = True, seed: int = 1):
    """This protocol's Wanda evaluator outside a run (for the scripts that re-measure its plans): the
    same calibration pool (``--calib-mix``, ``--calib-samples``, ``--calib-seq-len``), so the same Wanda
    statistics; with the validation text's path in ``spec.validation.text``."""
    from sparsealloc.pruning import TextSource
    from sparsealloc.search.session import build_evaluator
    from sparsealloc.spaces.spec import CalibrationSpec, MetricSpec, StudySpec, ValidationSpec

    work = Path(tempfile.mkdtemp(prefix="sparsealloc-quality-"))
    calib_text, val_text = split_valid(work, TextSource("builtin", "calib").read() if mix else None)
    spec = StudySpec(name="probe", target_sparsity=target, metric=MetricSpec(name="wanda"), trials=1, seed=seed,
                     calibration=CalibrationSpec(text=str(calib_text), samples=samples, seq_len=seq_len),
                     validation=ValidationSpec(text=str(val_text), seq_len=512, windows=8, top_k=5))
    return build_evaluator(spec.override(sampler="evo"), model, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["wanda:0.7"], help="metric:target pairs")
    parser.add_argument("--samplers", nargs="+", default=["evo"])
    parser.add_argument("--minutes", type=float, default=25.0, help="wall time of each study")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration pool (windows × --calib-seq-len)")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--score-samples", type=int, default=0,
                        help="calibration.score_samples: score trials on this many other windows of the calibration "
                             "text, disjoint from the statistics pool (default 0: on the pool)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "search_quality.md"))
    parser.add_argument("--store", default=None, help="SQLite file for the studies (default: a temp folder)")
    parser.add_argument("--owl-lambdas", type=float, nargs="+", default=[0.04, 0.08, 0.12, 0.16])
    parser.add_argument("--ramp-betas", type=float, nargs="+", default=[0.002, 0.004, 0.006, 0.008, 0.010, 0.012, 0.014])
    parser.add_argument("--eval-windows", type=int, default=20, help="windows × 512 of each held-out text")
    parser.add_argument("--calib-mix", action="store_true",
                        help="calibrate on half WikiText-2 valid, half the built-in Python-docs calibration topics "
                             "(disjoint from its evaluation topics); validation stays on WikiText-2 only (see --validate-domains)")
    parser.add_argument("--validate-domains", action="store_true",
                        help="with --calib-mix: validation also on the Python-docs calibration text outside the statistics "
                             "windows (validation.extra_texts; the exported plan has the best geometric mean of the two)")
    parser.add_argument("--calib-strata", action="store_true",
                        help="with --calib-mix: the pool takes half its windows from each text (a calibration-set "
                             "file whose cluster is the text) and evo's stages draw them in proportion")
    parser.add_argument("--calib-domains", action="store_true",
                        help="with --calib-mix: give the two texts as calibration.domains (the same pool; evo's stages "
                             "draw each window's domain in proportion)")
    parser.add_argument("--domain-weights", type=float, nargs="+", default=None,
                        help="with --calib-mix: calibration.domain_weights of the two texts (WikiText-2, Python docs), "
                             "e.g. 1 1: each text counts the same in the proxy (implies --calib-domains)")
    parser.add_argument("--level-step", type=float, default=None,
                        help="evo's layerwise.level_step (weights per level / mean Linear size; default the package's)")
    parser.add_argument("--radius", type=float, default=None,
                        help="layerwise.radius: each Linear's sparsity stays within target ± radius (default the package's)")
    parser.add_argument("--max-swaps", type=int, default=None, help="evo's evo.max_swaps (default the package's)")
    parser.add_argument("--offspring", type=int, default=None, help="evo's evo.offspring, λ (default the package's)")
    parser.add_argument("--stages", default=None,
                        help="evo's evo.stages as JSON, e.g. '[[2, 2], [8, 1]]' (default the package's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the studies' seed (stage windows, mutations; the calibration pool keeps seed 0)")
    parser.add_argument("--switch-sparsity", type=float, default=None,
                        help="evo's evo.switch_sparsity (sparsity a switch moves the smaller group by; default the package's)")
    args = parser.parse_args()
    if args.calib_strata and not args.calib_mix:
        parser.error("expected --calib-strata together with --calib-mix, but got it alone")
    if args.calib_strata and args.score_samples:
        parser.error("expected --score-samples without --calib-strata (a windows file has no text to draw from), "
                     "but got both")
    if args.validate_domains and (not args.calib_mix or args.calib_strata or args.score_samples):
        parser.error("expected --validate-domains with --calib-mix, without --calib-strata and without --score-samples "
                     "(whose scoring windows come from the same held-out part of the calibration text)")
    if args.domain_weights is not None:
        args.calib_domains = True
    if args.calib_domains and (not args.calib_mix or args.calib_strata):
        parser.error("expected --calib-domains / --domain-weights with --calib-mix and without --calib-strata")
    if args.domain_weights is not None and len(args.domain_weights) != 2:
        parser.error(f"expected two --domain-weights (WikiText-2, Python docs), but got {args.domain_weights}")
    require_data()
    from sparsealloc.core import progress
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.objectives import TrialEvaluator
    from sparsealloc.pruning import TextSource, perplexity, tokenize_stream
    from sparsealloc.pruning.allocators import AllocationInputs, allocate
    from sparsealloc.pruning.calibration.select import mix_calibration_set, write_calibration_set
    from sparsealloc.search.session import build_evaluator
    from sparsealloc.search.study import run
    from sparsealloc.spaces.spec import CalibrationSpec, EvoSpec, MetricSpec, StudySpec, ValidationSpec

    from sparsealloc.core.errors import UnknownNameError
    from sparsealloc.search.samplers.base import SAMPLERS
    from sparsealloc.search.samplers.evo import PARENT_ATTR  # noqa: F401  (every module imported up front)

    for entry in args.samplers:
        try:
            name, variant = sampler_variant(entry)
        except ValueError as exc:
            parser.error(str(exc))
        try:
            SAMPLERS.get(name)
        except UnknownNameError as exc:
            parser.error(str(exc))
        unknown = sorted(set(variant) - {f.name for f in fields(EvoSpec)})
        if unknown:
            parser.error(f"expected evo settings {sorted(f.name for f in fields(EvoSpec))} in {entry!r}, but got {unknown}")
    progress.set_mode("quiet")
    work = Path(tempfile.mkdtemp(prefix="sparsealloc-quality-"))
    mix = TextSource("builtin", "calib").read() if args.calib_mix else None
    calib_text, val_text = split_valid(work, mix)
    store = f"sqlite:///{Path(args.store) if args.store else work / 'studies.db'}"
    model, tokenizer, _ = load_smollm2()
    streams = heldout_streams(tokenizer)
    val_stream = tokenize_stream(tokenizer, val_text.read_text())
    extra_texts: tuple[str, ...] = ()
    code_tokens = 0
    if args.validate_domains:
        code_val = work / "validation_python_docs.txt"
        code_val.write_text(unused_part_text(tokenizer, calib_text, calibration_parts(mix), args.calib_samples,
                                             args.calib_seq_len))
        extra_texts = (str(code_val),)
        code_tokens = len(tokenize_stream(tokenizer, code_val.read_text()))
    with Timer():
        dense = {k: perplexity(model, s, EVAL_SEQ_LEN, args.eval_windows) for k, s in streams.items()}
    rows, lines, curves, winners = [], [], {}, {}

    def measure(evaluator, plan) -> dict[str, float]:
        with evaluator.applied(plan):
            return {k: perplexity(model, s, EVAL_SEQ_LEN, args.eval_windows) for k, s in streams.items()}

    calibration = CalibrationSpec(text=str(calib_text), samples=args.calib_samples, seq_len=args.calib_seq_len,
                                  score_samples=args.score_samples)
    if args.calib_domains:  # the same text, in two files: one domain each
        domains = [work / "calib_wikitext2.txt", work / "calib_python_docs.txt"]
        for path, part in zip(domains, calibration_parts(mix)):
            path.write_text(part)
        calibration = replace(calibration, text=None, domains=tuple(map(str, domains)),
                              domain_weights=tuple(args.domain_weights) if args.domain_weights else None)
    if args.calib_strata:  # what `sparsealloc calib mix` writes, from the two parts
        parts = [(name, tokenize_stream(tokenizer, part))
                 for name, part in zip(("WikiText-2 valid", "builtin:calib"), calibration_parts(mix))]
        mixed = mix_calibration_set(tokenizer, parts, args.calib_samples, args.calib_seq_len, info={"model": "smollm2-135m"})
        calibration = CalibrationSpec(windows_file=str(write_calibration_set(mixed, work / "calib.jsonl")))
    for setting in args.settings:
        metric, target = setting.split(":")
        target = float(target)
        label = f"{metric} {int(round(target * 100))}%"
        base = StudySpec(name="base", target_sparsity=target, metric=MetricSpec(name=metric), trials=10**6,
                         timeout=args.minutes * 60, seed=args.seed,
                         calibration=calibration,
                         validation=ValidationSpec(text=str(val_text), extra_texts=extra_texts, seq_len=512,
                                                   windows=8, top_k=5))
        with Timer() as t_setup:
            shared = build_evaluator(base.override(sampler="evo"), model, tokenizer)
        ctx = shared.ctx
        db_note = ""
        # Hand rules, every grid point measured on the held-out texts.
        inputs = AllocationInputs(ctx.layout, ctx.weights(), ctx.stats)
        hand = {"uniform": allocate("uniform", inputs, target)}
        hand |= {f"owl λ={lam}": allocate("owl", inputs, target, m=5.0, lam=lam) for lam in args.owl_lambdas}
        hand |= {f"depth ramp β={b}": allocate("depth_ramp", inputs, target, beta=b) for b in args.ramp_betas}
        results = {}
        with Timer() as t_hand:
            for name, ratios in hand.items():
                plan = shared.space.decode({}).to_plan(sparsity=ratios)
                results[name] = measure(shared, plan)
                rows.append({"setting": label, "allocation": name, **results[name]})
        uniform = results["uniform"]
        best_owl = min((k for k in results if k.startswith("owl")), key=lambda k: results[k]["wikitext2-test"])
        best_ramp = min((k for k in results if k.startswith("depth")), key=lambda k: results[k]["wikitext2-test"])
        for sampler in args.samplers:
            name, variant = sampler_variant(sampler)
            spec = base.override(name=f"{name}-{metric}-{int(target * 100)}-{int(time.time())}", sampler=name)
            given = tuning(args)
            tuned = {key: value for key, section, value in given if section == "layerwise"}
            evo = {**spec.to_dict().get("evo", {}),
                   **{key: json.loads(value) if key == "stages" else value
                      for key, section, value in given if section == "evo"}, **variant}
            spec = StudySpec.from_dict({**spec.to_dict(), "objectives": None, "proxy_dtype": None, "evo": evo,
                                        "layerwise": {**spec.to_dict()["layerwise"], "granularity": None, "radius": None,
                                                      **tuned}})
            evaluator = TrialEvaluator(ctx, spec)
            result = run(spec, store, evaluator=evaluator, validate=True, export_dir=work / spec.name)
            study = result.study
            exported = AllocationPlan.load(result.exported[0])
            exported.save(Path(args.out).with_name(f"{Path(args.out).stem}_{metric}{int(round(target * 100))}_{re.sub(r'[^A-Za-z0-9.-]+', '_', sampler)}_plan.json"))
            lowest = study.best_trial
            chosen = exported.provenance["trial"]
            found = measure(evaluator, exported)
            lowest_ppl = found if lowest.number == chosen else measure(
                evaluator, AllocationPlan.from_dict(lowest.user_attrs["plan"]))
            complete = [t for t in study.trials if t.state.name == "COMPLETE"]
            pruned = [t for t in study.trials if t.state.name == "PRUNED"]
            trial_s = sum(t.user_attrs["trial_seconds"] for t in complete + pruned) / max(1, len(complete + pruned))
            built = sum(t.user_attrs.get("database_build_seconds", 0.0) for t in study.trials)
            if evaluator.database is not None:
                db_note = f"; level database: {evaluator.database.stats_summary().describe()}"
            rows.append({"setting": label, "allocation": f"{sampler} exported (trial {chosen})", **found})
            if lowest.number != chosen:
                rows.append({"setting": label, "allocation": f"{sampler} lowest proxy (trial {lowest.number})",
                             **lowest_ppl})
            by_text = (study.user_attrs.get("validation") or {}).get("by_text") or {}
            one_text = ""
            if by_text:  # what validation on WikiText-2 alone would have exported, measured too
                first = next(iter(by_text.values()))
                wiki_pick = int(min(first, key=first.get))
                wiki_ppl = found if wiki_pick == chosen else lowest_ppl if wiki_pick == lowest.number else measure(
                    evaluator, AllocationPlan.from_dict(study.trials[wiki_pick].user_attrs["plan"]))
                if wiki_pick not in (chosen, lowest.number):
                    rows.append({"setting": label, "allocation": f"{sampler} WikiText-2 validation's pick (trial {wiki_pick})",
                                 **wiki_ppl})
                one_text = (f" Validation on both texts exported trial {chosen}; WikiText-2 validation alone would have "
                            f"exported trial {wiki_pick}" + (" (the same)." if wiki_pick == chosen else
                            f", which scores {wiki_ppl['wikitext2-test']:.1f} / {wiki_ppl['python-docs']:.1f}."))
            curves[(label, sampler)] = _curve(study, evaluator, val_stream, perplexity, result.seconds)
            winners[(label, sampler)] = (exported, found["wikitext2-test"])
            rho = (result.validation.spearman if result.validation else None)
            ratio = lowest_ppl["wikitext2-test"] / found["wikitext2-test"]
            gain = "changes nothing" if lowest.number == chosen else f"divides test PPL by {ratio:.3f}"
            lines.append(
                f"- **{label}, {sampler}** ({len(complete)} complete + {len(pruned)} pruned trials in "
                f"{result.seconds / 60:.1f} min; mean trial {trial_s:.2f} s in {str(evaluator.proxy_dtype).removeprefix('torch.')}"
                f"{f', database build {built:.0f} s inside trials' if built else ''}{_evo_dynamics(study)}): WikiText-2 test "
                f"**{found['wikitext2-test']:.1f}** = **{found['wikitext2-test'] / uniform['wikitext2-test']:.3f}× uniform** "
                f"({uniform['wikitext2-test']:.1f}) and **{found['wikitext2-test'] / results[best_ramp]['wikitext2-test']:.3f}× "
                f"the best depth ramp** ({best_ramp}: {results[best_ramp]['wikitext2-test']:.1f}); best OWL "
                f"{results[best_owl]['wikitext2-test']:.1f}. Python docs {found['python-docs']:.1f} vs uniform "
                f"{uniform['python-docs']:.1f} ({found['python-docs'] / uniform['python-docs']:.3f}×) and depth ramp "
                f"{results[best_ramp]['python-docs']:.1f} ({found['python-docs'] / results[best_ramp]['python-docs']:.3f}×). "
                f"Within-study Spearman ρ(proxy, validation PPL) = {'n/a' if rho is None else f'{rho:.2f}'}; the "
                f"lowest-proxy plan (trial {lowest.number}) scores {lowest_ppl['wikitext2-test']:.1f} on WikiText-2 test, "
                f"so exporting the best validated plan {gain}.{one_text}")
        lines.append(f"- {label}: setup {t_setup.seconds:.0f} s (calibration statistics over "
                     f"{args.calib_samples}×{args.calib_seq_len} tokens, dense reference over "
                     f"{args.score_samples or args.calib_samples}×{args.calib_seq_len}); hand rules measured in {t_hand.seconds / 60:.1f} min{db_note}.")
    frame = pd.DataFrame(rows)
    for col in streams:
        frame[col] = frame[col].astype(float)
    out = Path(args.out)
    plot_curve = _plot_curves(curves, out.with_name(out.stem + "_curve.png"))
    plot_shape = _plot_winner(winners, out.with_name(out.stem + "_winner.png"))
    text = [
        "# Search quality (benchmarks/search_quality.py)", "",
        f"Machine: {machine()}. Model: SmolLM2-135M-Instruct (embedded GGUF, fp32). Calibration: a pool of "
        f"{args.calib_samples}×{args.calib_seq_len} tokens from "
        + ("half the first 70% of WikiText-2 valid, half the built-in Python-docs calibration topics (in "
           "characters; topics disjoint from its evaluation text)" if args.calib_mix and not args.calib_strata else
           "WikiText-2 valid's first 70% and the built-in Python-docs calibration topics, half the windows from "
           "each (topics disjoint from its evaluation text; evo's stages draw the two in proportion)"
           if args.calib_strata else
           "the first 70% of WikiText-2 valid")
        + ("; the two texts are calibration domains (evo's stages draw them in proportion)" if args.calib_domains else "")
        + (f"; the proxy weighs them {' : '.join(f'{w:g}' for w in args.domain_weights)} (calibration.domain_weights)"
           if args.domain_weights else "")
        + (f"; trials scored on {args.score_samples}×{args.calib_seq_len} other tokens of that text, disjoint from the "
           "pool" if args.score_samples else "") + "; validation (picks the exported "
        "plan): 8×512 from its last 30%"
        + (f" and 8×512 of the Python-docs calibration text outside the pool's windows ({code_tokens} tokens), the "
           "exported plan the best geometric mean of the two (validation.extra_texts)" if args.validate_domains else "")
        + "; held-out evaluation: WikiText-2 test and the built-in Python-docs "
        f"evaluation text, {args.eval_windows}×512 each. Dense PPL {dense['wikitext2-test']:.2f} / {dense['python-docs']:.2f}. "
        f"Studies: {', '.join(args.samplers)}, {args.minutes:g} min each, sampler defaults (evo: KL proxy, one "
        "level per Linear; tpe/cmaes: hidden-state proxy, one ratio per block)"
        + "".join(f"; {TUNING[key][1].format(_shown(value))}" for key, _, value in tuning(args))
        + (f"; seed {args.seed}" if args.seed else "") + ".", "",
        f"Command: `python benchmarks/search_quality.py --settings {' '.join(args.settings)} --samplers "
        f"{' '.join(args.samplers)} --minutes {args.minutes:g} --calib-samples {args.calib_samples} "
        f"{f'--calib-seq-len {args.calib_seq_len} ' if args.calib_seq_len != 256 else ''}"
        f"{f'--score-samples {args.score_samples} ' if args.score_samples else ''}"
        f"--owl-lambdas {' '.join(map(str, args.owl_lambdas))} --ramp-betas {' '.join(map(str, args.ramp_betas))} "
        f"--eval-windows {args.eval_windows}{' --calib-mix' if args.calib_mix else ''}"
        f"{' --validate-domains' if args.validate_domains else ''}"
        f"{' --calib-strata' if args.calib_strata else ''}"
        f"{' --calib-domains' if args.calib_domains and not args.domain_weights else ''}"
        f"{' --domain-weights ' + ' '.join(f'{w:g}' for w in args.domain_weights) if args.domain_weights else ''}"
        + "".join(f" --{key.replace('_', '-')} {_shown(value, quote=key == 'stages')}" for key, _, value in tuning(args))
        + (f" --seed {args.seed}" if args.seed else "") + "`", "",
        *lines, "", markdown_table(frame), "",
        f"![validation PPL of the incumbent against wall-clock]({plot_curve.name})", "",
        f"![per-Linear sparsity of the winners]({plot_shape.name})", "",
    ]
    out.write_text("\n".join(text))
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    print("\n".join(text))


def _evo_dynamics(study) -> str:
    """Generations of an evo study, how often the parent changed (its re-scored copies in two
    consecutive generations differ) and, with ``evo.merge``, its merged candidates and how many of
    them became the next parent (the next generation's re-scored parent has their parameters)."""
    from sparsealloc.search.samplers.evo import trials_by_generation

    by_generation: dict[int, dict[str, list]] = {}
    for generation, trials in trials_by_generation(study.trials).items():
        for t in trials:
            by_generation.setdefault(generation, {}).setdefault(t.user_attrs.get("evo_role"), []).append(t)
    if not by_generation:
        return ""
    merged = [(g, t) for g, roles in by_generation.items() for t in roles.get("merged", [])]
    adopted = sum(1 for g, t in merged if any(p.params == t.params for p in by_generation.get(g + 1, {}).get("parent", [])))
    parents = [roles["parent"][0].params for _, roles in sorted(by_generation.items()) if roles.get("parent")]
    moved = sum(1 for a, b in zip(parents, parents[1:]) if a != b)
    text = f"; last generation {max(by_generation)}; the parent changed in {moved} of {max(len(parents) - 1, 0)} generations"
    return text + (f"; {len(merged)} merged candidates, {adopted} became the parent" if merged else "")


def _curve(study, evaluator, stream, perplexity, seconds: float, points: int = 4) -> list[tuple[float, float]]:
    """Validation PPL (8×512) of the incumbent at a few moments of the study: the evo parent, or
    the lowest proxy so far for the other samplers.

    The study attr keeps only the latest parents; before the oldest of them, the parent is the one
    re-scored last (the ``parent`` role of its generation's last stage)."""
    from sparsealloc.core.keys import EVO_ROLE
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.search.samplers.evo import PARENT_ATTR

    trials = [t for t in study.trials if t.state.name == "COMPLETE" and t.datetime_complete]
    if not trials:
        return []
    start = min(t.datetime_start for t in study.trials).timestamp()
    history = (study.user_attrs.get(PARENT_ATTR) or {}).get("history", [])
    out = []
    for i in range(1, points + 1):
        cutoff = start + seconds * i / points
        done = [t for t in trials if t.datetime_complete.timestamp() <= cutoff]
        if not done:
            continue
        numbers = {t.number for t in done}
        parents = [n for n in history if n in numbers]
        rescored = [t for t in done if t.user_attrs.get(EVO_ROLE) == "parent"]
        incumbent = (study.trials[parents[-1]] if parents else
                     max(rescored, key=lambda t: t.datetime_complete) if rescored else
                     min(done, key=lambda t: t.values[0]))
        with evaluator.applied(AllocationPlan.from_dict(incumbent.user_attrs["plan"])):
            out.append(((cutoff - start) / 60, perplexity(evaluator.ctx.model, stream, 512, 8)))
    return out


def _plot_curves(curves, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({label for label, _ in curves})
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(6 * max(1, len(settings)), 4), squeeze=False)
    for ax, label in zip(axes[0], settings):
        for (lab, sampler), points in curves.items():
            if lab == label and points:
                ax.plot(*zip(*points), marker="o", label=sampler)
        ax.set_title(label)
        ax.set_xlabel("wall-clock (min)")
        ax.set_ylabel("validation PPL of the incumbent")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_winner(winners, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_setting: dict[str, tuple] = {}
    for (label, sampler), (plan, ppl) in winners.items():
        if label not in by_setting or ppl < by_setting[label][2]:
            by_setting[label] = (sampler, plan, ppl)
    fig, axes = plt.subplots(1, max(1, len(by_setting)), figsize=(7 * max(1, len(by_setting)), 4), squeeze=False)
    for ax, (label, (sampler, plan, ppl)) in zip(axes[0], by_setting.items()):
        kinds: dict[str, list[tuple[int, float]]] = {}
        for name, ratio in plan.sparsity.items():
            block = int(name.split(".layers.")[1].split(".")[0])
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append((block, ratio))
        for kind, points in sorted(kinds.items()):
            ax.plot(*zip(*sorted(points)), marker=".", label=kind)
        ax.set_title(f"{label}: {sampler} (test PPL {ppl:.1f})")
        ax.set_xlabel("block")
        ax.set_ylabel("sparsity")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
