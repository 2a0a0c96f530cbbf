"""Search quality on SmolLM2: the exported plan of each sampler against uniform, OWL and depth ramp.

All numbers come from one run: one calibration pass, one dense reference, then for each target the
hand-made allocations (uniform Wanda, OWL at the paper's M=5/λ=0.08 and a λ grid, ATP's depth ramp
over a β grid) and one study per sampler (TPE, CMA-ES, ...) limited by wall time; every plan is
scored by WikiText-2 test perplexity (engine protocol). The exported plan is the study's best trial
by the proxy: no test perplexity is used to pick it.

    python benchmarks/search_quality.py --targets 0.7 0.5 --minutes 20 6
    python benchmarks/search_quality.py --targets 0.6 --minutes 8 --samplers tpe cmaes \
        --out benchmarks/search_samplers.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from _common import (ROOT, Timer, calib_windows, load_smollm2, machine, markdown_table, require_data,
                     test_ppl, test_stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--minutes", type=float, nargs="+", default=[20, 6], help="TPE wall time per target")
    parser.add_argument("--samplers", nargs="+", default=["tpe"], help="one study per sampler and target")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "search_quality.md"))
    parser.add_argument("--reuse-store", default=None, metavar="DB",
                        help="SQLite file of an earlier run: a finished study 'tpe-<pct>-*' there is reloaded "
                             "instead of searched again (its plan is still re-scored in this run)")
    args = parser.parse_args()
    require_data()
    from sparsealloc.core import progress
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.objectives import EvalContext, TrialEvaluator
    from sparsealloc.pruning import prune_
    from sparsealloc.pruning.allocators import AllocationInputs, allocate
    from sparsealloc.search.dispatch.local import LocalDispatcher
    from sparsealloc.search.orchestrator import run_study
    from sparsealloc.search.session import enqueue_warm_starts, open_sampler
    from sparsealloc.spaces.spec import StudySpec
    from sparsealloc.storage import export_study, open_storage

    progress.set_mode("quiet")
    model, tokenizer, _ = load_smollm2()
    windows = calib_windows(tokenizer)
    stream = test_stream(tokenizer)
    with Timer() as t_setup:
        ctx = EvalContext.build(model, windows, 4, model_info={"name": "smollm2-135m"}, tokenizer=tokenizer)
    with Timer() as t_dense, torch.inference_mode():
        for batch in windows.split(4):
            model(input_ids=batch, use_cache=False)
    inputs = AllocationInputs(ctx.layout, ctx.weights(), ctx.stats)
    dense_ppl = test_ppl(model, stream)
    store_dir = Path(tempfile.mkdtemp(prefix="sparsealloc-bench-"))
    store_file = Path(args.reuse_store) if args.reuse_store else store_dir / "studies.db"
    storage = open_storage(f"sqlite:///{store_file}")
    import optuna

    stored = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    rows, shapes, lines = [], {}, []

    def ppl_of(plan) -> float:
        ctx.restore_()
        prune_(ctx.model, plan, ctx.stats, layout=ctx.layout)
        value = test_ppl(ctx.model, stream)
        ctx.restore_()
        return value

    for target, minutes in zip(args.targets, args.minutes):
        evaluator = TrialEvaluator(ctx, StudySpec(name="baselines", target_sparsity=target, seed=0))
        baselines = {"uniform": ("uniform", {})}
        for lam in (0.04, 0.08, 0.12):
            baselines[f"owl λ={lam}"] = ("owl", {"m": 5.0, "lam": lam})
        for beta in (0.002, 0.004, 0.006, 0.008, 0.010, 0.012):
            baselines[f"depth ramp β={beta}"] = ("depth_ramp", {"beta": beta})
        results = {}
        for label, (name, params) in baselines.items():
            ratios = allocate(name, inputs, target, **params)
            plan = evaluator.space.decode({}).to_plan(sparsity=ratios)
            results[label] = ppl_of(plan)
            if name == "uniform":
                proxy = evaluator(evaluator.space.encode_sparsity(ratios)).values[0]
            rows.append({"target": target, "allocation": label, "test PPL": results[label]})
            shapes.setdefault(target, {})[label] = [ratios[ctx.layout.block_linears(b)[0]] for b in ctx.layout.blocks]
        owl_best = min(v for k, v in results.items() if k.startswith("owl"))
        ramp_best = min(v for k, v in results.items() if k.startswith("depth"))
        for sampler_name in args.samplers:
            prefix = f"{sampler_name}-{int(target * 100)}-"
            reused = [n for n in stored if n.startswith(prefix)]
            study_name = reused[0] if reused else f"{prefix}{int(time.time())}"
            spec = StudySpec(name=study_name, target_sparsity=target, trials=100_000, timeout=minutes * 60, seed=0,
                             sampler=sampler_name)
            evaluator = TrialEvaluator(ctx, spec)
            sampler = open_sampler(spec, storage, evaluator.space)
            if reused:
                study = sampler.study
                complete_s = [t.datetime_complete.timestamp() for t in study.trials if t.datetime_complete]
                search_min = (max(complete_s) - min(t.datetime_start.timestamp() for t in study.trials)) / 60
                note = " (study searched by an earlier invocation, reloaded from its store)"
            else:
                enqueue_warm_starts(sampler, evaluator)
                run = run_study(sampler, LocalDispatcher(evaluator), spec.trials, spec.timeout)
                study = sampler.study
                search_min, note = run.seconds / 60, ""
            best_path = export_study(study, store_dir / spec.name)[0]
            best_plan = AllocationPlan.load(best_path)
            found_ppl = ppl_of(best_plan)
            complete = [t for t in study.trials if t.state.name == "COMPLETE"]
            trial_s = sum(t.user_attrs["trial_seconds"] for t in complete) / len(complete)
            best = study.best_trial
            origin = f"warm start {best.user_attrs['warm_start']}, " if best.user_attrs.get("warm_start") else ""
            label = f"{sampler_name.upper()} best"
            rows.append({"target": target,
                         "allocation": f"{label} ({origin}trial {best.number} of {len(complete)})",
                         "test PPL": found_ppl})
            shapes[target][label] = [best_plan.sparsity[ctx.layout.block_linears(b)[0]] for b in ctx.layout.blocks]
            lines.append(
                f"- **{int(target * 100)}%, {sampler_name}**: {found_ppl:.1f} vs uniform {results['uniform']:.1f} "
                f"(ratio **{found_ppl / results['uniform']:.3f}**), best OWL {owl_best:.1f}, best depth ramp "
                f"{ramp_best:.1f} (ratio to the better of the two **{found_ppl / min(owl_best, ramp_best):.3f}**); "
                f"{len(complete)} trials in {search_min:.1f} min{note}, mean trial {trial_s:.2f} s = "
                f"{trial_s / t_dense.seconds:.2f}× a dense forward over the calibration tokens; "
                f"proxy of the uniform warm start {proxy:.4f}, best proxy {study.best_value:.4f}"
                f"{' (' + origin.rstrip(', ') + ')' if origin else ''}.")
    frame = pd.DataFrame(rows)
    plot = _plot(shapes, Path(args.out).with_suffix(".png"))
    text = [
        "# Search quality (benchmarks/search_quality.py)", "",
        f"Machine: {machine()}. Model: SmolLM2-135M-Instruct (embedded GGUF). Calibration 16×256 of "
        "WikiText-2 valid (seed 0); evaluation WikiText-2 test, first 20 windows of 512. Metric: Wanda. "
        f"Proxy: `{spec.objectives[0]}` (the default) on the calibration windows; "
        f"samplers: {', '.join(args.samplers)} (seed 0, warm starts uniform, OWL, depth ramp enqueued first). "
        "Space: one ratio per block in [target−0.3, target+0.3], exact budget by projection.", "",
        f"Dense PPL {dense_ppl:.2f}; setup (calibration + dense reference) {t_setup.seconds:.1f} s; "
        f"one dense forward over the calibration tokens {t_dense.seconds:.2f} s.", "",
        *lines, "", markdown_table(frame), "", f"![per-block sparsity]({plot.name})", "",
    ]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


def _plot(shapes, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, (target, curves) in zip(axes[0], shapes.items()):
        for label in ("uniform", "owl λ=0.08", "depth ramp β=0.008", *[k for k in curves if k.endswith(" best")]):
            if label in curves:
                ax.plot(curves[label], marker="o" if label.endswith(" best") else None, label=label)
        ax.set_title(f"target {target:.0%}")
        ax.set_xlabel("block")
        ax.set_ylabel("sparsity")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
