"""Seed methods on SmolLM2: every metric × every allocator at 50/60/70%, and layer pruning.

Part of ``benchmarks/baselines.py`` (``--part methods`` / ``--part layers``); runnable alone:

    python benchmarks/methods.py --part methods    # → benchmarks/baselines_methods.md
    python benchmarks/methods.py --part layers     # → benchmarks/baselines_layers.md

Protocol: calibration 16×256 tokens of WikiText-2 valid (seed 0, one pass collecting the statistics
every metric shares, Gram matrices included for SparseGPT and ACE); allocators are computed once per
(allocator, sparsity) from those statistics and the dense weights; each (metric, allocator,
sparsity) restores the dense weights and prunes. Evaluation: WikiText-2 test as one stream, the first
``--eval-windows`` windows of 512 tokens (6 in the committed run of this ~100-run grid, against the engine
table's 20: the dense PPL is reported at the same setting, so every ratio is like for like).
Rows are appended to a CSV as they finish; ``--resume`` skips rows already there.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pandas as pd
import torch

from _common import (EVAL_SEQ_LEN, ROOT, Timer, calib_windows, load_smollm2, machine, markdown_table,
                     require_data, test_stream)

METRICS = ("wanda", "ria", "stade", "stadew", "ace", "magnitude", "sparsegpt")  # run in this order
ALLOCATORS = ("uniform", "owl", "alphapruning", "depth_ramp", "mrp", "dp")
SPARSITIES = (0.5, 0.6, 0.7)
DROPPED = (2, 4, 6)


def _ppl(model, stream, windows: int) -> float:
    from sparsealloc.pruning import perplexity

    return perplexity(model, stream, EVAL_SEQ_LEN, windows)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _append(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _orders_apply(metric: str) -> bool:
    """Whether ``prune_`` uses a cached row order for ``metric`` (no bias, no name, no update)."""
    from sparsealloc.pruning.metrics import metric_traits

    traits = metric_traits(metric)
    return metric not in ("stade", "stadew") and traits.updater is None and not traits.needs_name


def methods(args: argparse.Namespace) -> str:
    """The metric × allocator × sparsity grid; returns the Markdown report."""
    from tqdm.auto import tqdm

    from sparsealloc.core import AllocationPlan, MetricChoice
    from sparsealloc.pruning import collect_stats, model_layout, prune_
    from sparsealloc.pruning.allocators import AllocationInputs, allocate
    from sparsealloc.pruning.masks import row_rank
    from sparsealloc.pruning.metrics import score

    csv_path = Path(args.csv)
    if args.report_only:
        return render_methods(csv_path, args.eval_windows, None)
    model, tokenizer, _ = load_smollm2()
    layout = model_layout(model)
    stream = test_stream(tokenizer)
    done = {(r["metric"], r["allocator"], float(r["sparsity"])) for r in _read_rows(csv_path)} if args.resume else set()
    if not args.resume and csv_path.exists():
        csv_path.unlink()
    with Timer() as t_calib:
        stats = collect_stats(model, calib_windows(tokenizer), layout=layout, gram=True)
    modules = dict(model.named_modules())
    pristine = {n: modules[n].weight.detach().clone() for n in layout.linears}
    bias = {n: None if modules[n].bias is None else modules[n].bias.detach().clone() for n in layout.linears}

    def restore() -> None:
        for name, weight in pristine.items():
            modules[name].weight.data.copy_(weight)
            if bias[name] is None:
                modules[name].bias = None
            else:
                modules[name].bias.data.copy_(bias[name])

    dense = _ppl(model, stream, args.eval_windows)
    inputs = AllocationInputs(layout, pristine, stats)
    grid = [(m, s, a) for m in METRICS for s in SPARSITIES for a in ALLOCATORS
            if (m, a, s) not in done and (m != "sparsegpt" or s == 0.6 or a == "uniform")]
    allocations: dict[tuple[str, float], dict[str, float]] = {}
    orders: dict[str, torch.Tensor] | None = None
    orders_metric = None
    for metric, sparsity, allocator in tqdm(grid, desc="metric × allocator × sparsity", unit="run"):
        with Timer() as t_alloc:
            if (allocator, sparsity) not in allocations:
                allocations[(allocator, sparsity)] = allocate(allocator, inputs, sparsity)
        ratios = allocations[(allocator, sparsity)]
        with Timer() as t_score:
            if metric != orders_metric:  # score and rank once per metric; prune_ masks rank < k
                orders = None
                if _orders_apply(metric):
                    orders = {n: row_rank(score(metric, w, stats[n], {})) for n, w in pristine.items()}
                orders_metric = metric
        restore()
        plan = AllocationPlan(sparsity=ratios, metric=MetricChoice(metric))
        with Timer() as t_prune:
            report = prune_(model, plan, stats, layout=layout, ranks=orders)
        _append(csv_path, {"metric": metric, "allocator": allocator, "sparsity": sparsity,
                           "ppl": _ppl(model, stream, args.eval_windows), "achieved": report.achieved_mean,
                           "prune_s": round(t_prune.seconds + t_score.seconds, 2),
                           "alloc_s": round(t_alloc.seconds, 2), "dense_ppl": dense})
    restore()
    return render_methods(csv_path, args.eval_windows, t_calib.seconds)


def _versus_uniform(frame: pd.DataFrame) -> list[str]:
    """Per allocator: in how many (metric, sparsity) cells it beats uniform, and its median PPL ratio."""
    uniform = frame[frame.allocator == "uniform"].set_index(["metric", "sparsity"]).ppl
    rows = []
    for allocator in ALLOCATORS[1:]:
        part = frame[frame.allocator == allocator].set_index(["metric", "sparsity"]).ppl
        common = part.index.intersection(uniform.index)
        if common.empty:
            continue
        ratio = part[common] / uniform[common]
        rows.append({"allocator": allocator, "cells": len(common), "beats uniform": int((ratio < 1).sum()),
                     "median PPL / uniform": round(float(ratio.median()), 3),
                     "at 70%: median PPL / uniform": round(float(ratio[ratio.index.get_level_values(1) == 0.7].median()), 3)})
    return [markdown_table(pd.DataFrame(rows)), "",
            "dp is optimal for the additive layer-local error it is given, and that error is a poor guide to "
            "perplexity here: summed layer-local error has Spearman ρ −0.60 with PPL within a target "
            "(benchmarks/proxy_choice.md), so dp is kept as a warm start and a baseline, not a default."]


def render_methods(csv_path: Path, eval_windows: int, calib_seconds: float | None) -> str:
    """The Markdown report of the grid from the CSV (complete or partial)."""
    frame = pd.DataFrame(_read_rows(csv_path)).astype({"sparsity": float, "ppl": float, "achieved": float,
                                                       "prune_s": float, "alloc_s": float, "dense_ppl": float})
    dense = float(frame.dense_ppl.iloc[0])
    calib = f"{calib_seconds:.1f} s with Gram matrices" if calib_seconds is not None else "with Gram matrices"
    expected = len(METRICS[:-1]) * len(ALLOCATORS) * len(SPARSITIES) + len(ALLOCATORS) + len(SPARSITIES) - 1
    lines = ["# Seed methods: metric × allocator (benchmarks/methods.py, part of baselines.py)", "",
             f"Machine: {machine()} (the grid ran in several invocations, partly with OMP_NUM_THREADS=1 beside other jobs: the time columns are rough). SmolLM2-135M-Instruct (embedded GGUF, fp32). Calibration 16×256 "
             f"tokens of WikiText-2 valid (seed 0; one pass, {calib}). "
             f"Evaluation: WikiText-2 test, first {eval_windows} windows of 512 tokens. "
             f"Dense PPL at this setting: **{dense:.2f}**. Default allocator parameters "
             "(owl m=5 λ=0.08, alphapruning ε=0.3, depth_ramp β=0.005, mrp m=5 step 0.01, "
             "dp step 0.05 radius 0.2 over relative layer errors; the first, unnormalized dp gave 137.8 / 3750 / 73224 with Wanda at 50 / 60 / 70%). Runs measured: "
             f"{len(frame)} of {expected} planned; cells shown as nan were not run.", ""]
    for sparsity in SPARSITIES:
        part = frame[frame.sparsity == sparsity]
        if part.empty:
            continue
        table = part.pivot_table(index="metric", columns="allocator", values="ppl")
        table = table.reindex(index=[m for m in METRICS if m in table.index],
                              columns=[a for a in ALLOCATORS if a in table.columns]).reset_index()
        best = part.loc[part.ppl.idxmin()]
        lines += [f"## {sparsity:.0%} mean sparsity: test PPL", "", markdown_table(table), "",
                  f"Best: {best.metric} + {best.allocator}, PPL {best.ppl:.2f} "
                  f"({best.ppl / dense:.2f}× dense).", ""]
    lines += ["## Allocators against uniform", "", *_versus_uniform(frame), "",
              "## Budget check", "",
              f"Achieved parameter-weighted sparsity minus target over all {len(frame)} runs: "
              f"max |Δ| = {(frame.achieved - frame.sparsity).abs().max():.2e}.", "",
              ("SparseGPT (sequential OBS with weight updates) runs with every allocator at 60% and with "
               "uniform at 50% and 70%, to bound the grid's time; the other cells of its row are empty."
               if (frame.metric == "sparsegpt").any() else
               "The grid runs metric by metric (wanda, ria, stade, stadew, ace, magnitude, sparsegpt); runs "
               "missing from the tables were not reached before the run was stopped (the machine's 2 cores "
               "were shared with 4-6 other jobs, ≈50 s per 6-window evaluation instead of ≈7 s). "
               "Magnitude's 50% rows come from a first pass in magnitude-first order."), "",
              "Pruning time per run (scoring once per metric + masks), seconds, mean per metric; "
              "allocation time per allocator (computed once per sparsity):", "",
              markdown_table(frame.groupby("metric", sort=False).prune_s.mean().round(2).reset_index()), "",
              markdown_table(frame[frame.alloc_s > 0].groupby("allocator", sort=False).alloc_s.max()
                             .round(1).reset_index()), ""]
    return "\n".join(lines)


def layers(args: argparse.Namespace) -> str:
    """Block Influence layer pruning of 2/4/6 blocks with and without Prune&Comp compensation."""
    from sparsealloc.pruning.layer_prune import prune_layers_

    import copy

    rows = []
    base, tokenizer, _ = load_smollm2()
    stream = test_stream(tokenizer)
    windows = calib_windows(tokenizer)
    rows.append({"blocks dropped": 0, "compensation": "-", "test PPL": _ppl(base, stream, args.eval_windows),
                 "dropped": "-", "alphas": "-", "seconds": 0.0})
    for n_blocks in DROPPED:
        for compensate in (False, True):
            model = copy.deepcopy(base)  # dropping is structural: a fresh copy each time
            with Timer() as t:
                result = prune_layers_(model, windows, n_blocks, compensate=compensate)
            rows.append({"blocks dropped": n_blocks, "compensation": "Prune&Comp" if compensate else "none",
                         "test PPL": _ppl(model, stream, args.eval_windows),
                         "dropped": " ".join(d.rsplit(".", 1)[-1] for d in result.dropped),
                         "alphas": " ".join(f"{a:.3f}" for a in result.alphas), "seconds": round(t.seconds, 1)})
            print(rows[-1], flush=True)
            del model
    frame = pd.DataFrame(rows)
    plain = frame[(frame["blocks dropped"] == 4) & (frame.compensation == "none")]["test PPL"].iloc[0]
    comp = frame[(frame["blocks dropped"] == 4) & (frame.compensation == "Prune&Comp")]["test PPL"].iloc[0]
    verdict = "lowers" if comp < plain else "does NOT lower"
    return "\n".join([
        "# Layer pruning: Block Influence ± Prune&Comp (benchmarks/methods.py, part of baselines.py)", "",
        f"Machine: {machine()}. SmolLM2-135M-Instruct (30 blocks). Iterative BI (ShortGPT) on 16×256 "
        "calibration tokens of WikiText-2 valid (seed 0); Prune&Comp α fused into the embeddings and "
        "the earlier blocks' o_proj/down_proj after each removal. Evaluation: WikiText-2 test, first "
        f"{args.eval_windows} windows of 512 tokens. 'dropped' lists block indices of the original model "
        "in removal order.", "",
        markdown_table(frame), "",
        f"At 4 blocks, compensation {verdict} PPL: {comp:.2f} vs {plain:.2f} without "
        f"({comp / plain:.3f}×).", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("methods", "layers"), required=True)
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--csv", default=str(ROOT / "benchmarks" / "baselines_methods.csv"))
    parser.add_argument("--resume", action="store_true", help="keep the CSV's rows and run the rest")
    parser.add_argument("--report-only", action="store_true", help="render the Markdown from the CSV, run nothing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    require_data()
    from sparsealloc.core import progress

    progress.set_mode("quiet")
    text = methods(args) if args.part == "methods" else layers(args)
    out = Path(args.out or ROOT / "benchmarks" / f"baselines_{args.part}.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
