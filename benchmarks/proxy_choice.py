"""Which error proxy should rank allocations? Spearman ρ with held-out perplexity, and cost per trial.

On SmolLM2 (Wanda masks, engine calibration protocol 16×256 of WikiText-2 valid, seed 0), about 30
allocations at 60, 65 and 70% mean sparsity: uniform, OWL (M=5, two λ), ATP's depth ramp (two β),
AlphaPruning, the DP allocation, and seeded random per-block perturbations (±0.15) projected onto
the budget with ``spaces/budget.py``. For each, ONE forward pass of the pruned model over the
calibration windows gives the three forward proxies (KL of next-token distributions, OptiShear's
logit error, final hidden-state error); the summed layer-local error comes from the per-layer Gram
matrices without a forward; the held-out perplexity is measured on WikiText-2 test (first
``--eval-windows`` windows of 512 tokens).

Cost per trial: a complete trial of each proxy (TrialEvaluator with that proxy as the only
objective) on a few allocations, as a ratio to one dense forward (``model(input_ids)`` with logits,
same windows and batch size) timed before and after each trial in the same run.

    python benchmarks/proxy_choice.py --eval-windows 10
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch

from _common import (ROOT, Timer, calib_windows, load_smollm2, machine, markdown_table,
                     require_data, test_stream)

TARGETS = (0.6, 0.65, 0.7)
#: proxy name in the spec → how forward_errors / the context compute it
PROXIES = {"kl": "kl", "reconstruction": "logits", "hidden": "hidden", "layer_local": None}


def allocations(ctx, seed: int = 0, n_random: int = 4) -> list[tuple[float, str, dict[str, float]]]:
    """(target, label, ratio per Linear FQN) for every target."""
    from sparsealloc.pruning.allocators import AllocationInputs, allocate
    from sparsealloc.spaces.budget import project_to_budget

    inputs = AllocationInputs(ctx.layout, ctx.weights(), ctx.stats)
    layout = ctx.layout
    block_numels = {b: sum(layout.numels[n] for n in layout.block_linears(b)) for b in layout.blocks}
    gen = torch.Generator().manual_seed(seed)
    out = []
    named = [("uniform", "uniform", {}), ("owl λ=0.04", "owl", {"m": 5.0, "lam": 0.04}),
             ("owl λ=0.08", "owl", {"m": 5.0, "lam": 0.08}), ("depth ramp β=0.004", "depth_ramp", {"beta": 0.004}),
             ("depth ramp β=0.008", "depth_ramp", {"beta": 0.008}), ("alphapruning ε=0.3", "alphapruning", {"epsilon": 0.3}),
             ("dp", "dp", {})]
    for target in TARGETS:
        for label, name, params in named:
            out.append((target, label, allocate(name, inputs, target, **params)))
        for i in range(n_random):
            noise = {b: target + 0.3 * (float(torch.rand((), generator=gen)) - 0.5) for b in layout.blocks}
            blocks = project_to_budget(noise, block_numels, target, 0.0, 0.95)
            out.append((target, f"random {i}", {n: blocks[layout.block_of[n]] for n in layout.linears}))
    return out


def dense_forward_seconds(model, windows, batch_size: int) -> float:
    with Timer() as t, torch.inference_mode():
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
    return t.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--random", type=int, default=4, help="random allocations per target")
    parser.add_argument("--cost-trials", type=int, default=2, help="timed trials per proxy")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "proxy_choice.md"))
    parser.add_argument("--reuse-csv", default=None, metavar="CSV",
                        help="take the per-allocation proxies and PPLs from an earlier run's CSV (same allocations) "
                             "and measure only the trial costs again")
    args = parser.parse_args()
    require_data()
    from scipy.stats import spearmanr

    from sparsealloc.core import progress
    from sparsealloc.core.plan import AllocationPlan, MetricChoice
    from sparsealloc.objectives import EvalContext, TrialEvaluator
    from sparsealloc.objectives.reconstruction import forward_errors
    from sparsealloc.pruning import perplexity, prune_
    from sparsealloc.spaces.spec import StudySpec

    progress.set_mode("quiet")
    load_start = os.getloadavg()
    started = time.perf_counter()
    model, tokenizer, _ = load_smollm2()
    windows = calib_windows(tokenizer)
    stream = test_stream(tokenizer)
    with Timer() as t_setup:
        ctx = EvalContext.build(model, windows, 4, model_info={"name": "smollm2-135m"}, tokenizer=tokenizer,
                                layer_grams=True)
        ctx.cache_kl_reference()
        wanda = MetricChoice("wanda")
        ctx.cache_ranks(wanda)
    allocs = allocations(ctx, n_random=args.random)
    rows = []
    reused = pd.read_csv(args.reuse_csv) if args.reuse_csv else None
    if reused is not None:
        assert list(zip(reused.target, reused.allocation)) == [(t, a) for t, a, _ in allocs], "different allocations"
        rows = reused.to_dict("records")
    for i, (target, label, ratios) in enumerate(allocs if reused is None else []):
        plan = AllocationPlan(sparsity=ratios, metric=wanda, model={"name": "smollm2-135m"})
        ctx.restore_(weights=False)
        prune_(ctx.model, plan, ctx.stats, layout=ctx.layout, ranks=ctx.ranks, pristine=ctx.pristine_weight)
        values = forward_errors(ctx, ("kl", "logits", "hidden"))
        layer = ctx.layer_error()
        ppl = perplexity(ctx.model, stream, 512, args.eval_windows)
        ctx.restore_()
        rows.append({"target": target, "allocation": label, "kl": values["kl"], "reconstruction": values["logits"],
                     "hidden": values["hidden"], "layer_local": layer, "test PPL": ppl})
        print(f"[{i + 1}/{len(allocs)}] {rows[-1]}", flush=True)
    frame = pd.DataFrame(rows)

    # cost per trial: each proxy as the only objective, interleaved with dense forwards
    costs = []
    evaluators = {p: TrialEvaluator(ctx, StudySpec(target_sparsity=0.65, objectives=(p,))) for p in PROXIES}
    picks = [a for a in allocs if a[0] == 0.65][: args.cost_trials]  # the evaluators' own target
    dense_times = [dense_forward_seconds(model, windows, 4)]
    for target, _, ratios in picks:
        for proxy, evaluator in evaluators.items():
            values = evaluator.space.encode_sparsity(ratios)
            with Timer() as t:
                outcome = evaluator(values)
            assert outcome.state == "complete", outcome.reason
            dense_times.append(dense_forward_seconds(model, windows, 4))
            costs.append({"proxy": proxy, "seconds": t.seconds, "dense before": dense_times[-2], "dense after": dense_times[-1]})
    cost = pd.DataFrame(costs)
    cost["ratio"] = cost["seconds"] / ((cost["dense before"] + cost["dense after"]) / 2)

    def rho(sub: pd.DataFrame, proxy: str) -> float:
        return float(spearmanr(sub[proxy], sub["test PPL"]).statistic)

    table = []
    for proxy in PROXIES:
        per_target = [rho(frame[frame.target == t], proxy) for t in TARGETS]
        table.append({"proxy": proxy, "ρ all": rho(frame, proxy),
                      **{f"ρ at {int(t * 100)}%": r for t, r in zip(TARGETS, per_target)},
                      "mean ρ within a target": sum(per_target) / len(per_target),
                      "trial / dense forward": float(cost[cost.proxy == proxy]["ratio"].median()),
                      "trial seconds": float(cost[cost.proxy == proxy]["seconds"].median())})
    summary = pd.DataFrame(table)
    best = max(table, key=lambda r: r["mean ρ within a target"])
    near = [r for r in table if r["mean ρ within a target"] >= best["mean ρ within a target"] - 0.02]
    choice = min(near, key=lambda r: r["trial / dense forward"])
    load_end = os.getloadavg()
    csv = Path(args.out).with_suffix(".csv")
    if reused is None:
        frame.to_csv(csv, index=False)
    provenance = (f" Proxies and perplexities per allocation come from an earlier run of this script "
                  f"({Path(args.reuse_csv).name}); only the trial costs were measured in this one."
                  if reused is not None else "")
    text = [
        "# Proxy choice (benchmarks/proxy_choice.py)", "",
        f"Machine: {machine()}; load average {load_start[0]:.1f} at the start and {load_end[0]:.1f} at the end "
        f"(2 cores). SmolLM2-135M-Instruct, Wanda masks. Calibration 16×256 tokens of "
        f"WikiText-2 valid (seed 0), batch 4. Held-out PPL: WikiText-2 test, first {args.eval_windows} windows of "
        f"512 tokens (fewer than the engine protocol's 20, to save time). {len(frame)} allocations: at each of "
        f"{', '.join(f'{int(t * 100)}%' for t in TARGETS)} uniform, OWL (M=5, λ 0.04/0.08), depth ramp (β 0.004/0.008), "
        f"AlphaPruning (ε 0.3), DP, and {args.random} seeded random per-block perturbations (±0.15) projected onto "
        "the budget. The three forward proxies of an allocation come from one forward pass; the layer-local "
        "error needs none. Setup (calibration with Gram matrices, dense reference, KL reference, ranks): "
        f"{t_setup.seconds:.0f} s; whole run {(time.perf_counter() - started) / 60:.1f} min.{provenance}", "",
        "Spearman ρ of each proxy with held-out perplexity (pooled over all allocations, and within each target "
        "— what a study compares), and the cost of a complete trial with that proxy, as a ratio to one dense "
        f"forward over the same calibration tokens (median of {args.cost_trials} trials; dense forward timed before "
        "and after each trial):", "",
        markdown_table(summary), "",
        f"Decision rule: the highest mean within-target ρ; among proxies within 0.02 of it, the cheapest. "
        f"Result: **{choice['proxy']}** (mean within-target ρ {choice['mean ρ within a target']:.3f}, pooled ρ "
        f"{choice['ρ all']:.3f}, trial {choice['trial / dense forward']:.2f}× a dense forward).", "",
        "Trial timings:", "", markdown_table(cost), "",
        f"Every allocation ({csv.name}):", "", markdown_table(frame), "",
    ]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
