"""Probe: one sensitivity-and-DP step from the depth ramp (β=0.01) at Wanda 70%, against evo.

A separable (first-order) model of the KL proxy around a plan: for every Linear g and d in
{−2, −1, +1, +2}, the KL on 4 calibration windows with only g moved by d·m_g levels (m_g levels ≈
0.04 of g's sparsity); then the budget-exact allocation that minimises the sum of those changes
(``solve_budget_dp``, the same DP as the ``dp`` allocator), checked on 8 other windows, and repeated
from the new plan. It is the "linearised step" alternative to evo's random level switches
(SPDY-style DP over a per-layer profile, Frantar & Alistarh 2022, with measured end-to-end KL
instead of layer-local errors). Measured once (2026-12-06, Intel Xeon with AMX, 2 threads), see
sensitivity_step.md: rejected, evo gains more per minute.

    python benchmarks/sensitivity_step.py
"""
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import WIKITEXT, load_smollm2
from search_quality import split_valid
from sparsealloc.objectives.reconstruction import forward_errors
from sparsealloc.pruning import TextSource, perplexity, tokenize_stream
from sparsealloc.pruning.allocators import AllocationInputs, allocate, solve_budget_dp
from sparsealloc.search.session import build_evaluator
from sparsealloc.spaces.spec import CalibrationSpec, MetricSpec, StudySpec, ValidationSpec

torch.set_num_threads(2)
work = Path(tempfile.mkdtemp())
mix = TextSource("builtin", "calib").read()
calib, val = split_valid(work, mix)
model, tok, _ = load_smollm2()
base = StudySpec(name="x", target_sparsity=0.7, metric=MetricSpec(name="wanda"), trials=10, seed=0, sampler="evo",
                 calibration=CalibrationSpec(text=str(calib), samples=32, seq_len=256),
                 validation=ValidationSpec(text=str(val), seq_len=512, windows=8, top_k=5))
ev = build_evaluator(base, model, tok)
ctx = ev.ctx
inputs = AllocationInputs(ctx.layout, ctx.weights(), ctx.stats)
numels = {k: v.numel() for k, v in ctx.weights().items()}
space = ev.space
def plan_of(r): return space.decode({}).to_plan(sparsity=r)
def kl(r, wins):
    with ev.applied(plan_of(r), fast=True):
        return forward_errors(ctx, ["kl"], windows=wins, model=ev.last_model, blocks=ev.last_blocks)["kl"]
streams = {"wt2": tokenize_stream(tok, (WIKITEXT / "test.txt").read_text()),
           "py": tokenize_stream(tok, TextSource("builtin", "eval").read())}
def ppl(r, n=10):
    with ev.applied(plan_of(r)):
        return {k: round(perplexity(model, s, 512, n), 1) for k, s in streams.items()}
cur = allocate("depth_ramp", inputs, 0.7, beta=0.01)
names = sorted(cur)
total_w = sum(numels.values())
step = int(0.005 * total_w / len(names))  # weights per unit
check = list(range(24, 32))
print("start KL(check)", kl(cur, check), ppl(cur), flush=True)
rng = np.random.default_rng(0)
for rnd in range(3):
    wins = sorted(rng.choice(24, 4, replace=False).tolist())
    t = time.time()
    base_kl = kl(cur, wins)
    deltas = [-2, -1, 0, 1, 2]
    m = {g: max(1, round(0.04 * numels[g] / step)) for g in names}
    costs = []
    for g in names:
        row = []
        for d in deltas:
            r = cur[g] + d * m[g] * step / numels[g]
            if d == 0: row.append(base_kl); continue
            if not (0.0 <= r <= 0.99): row.append(np.inf); continue
            row.append(kl({**cur, g: r}, wins))
        costs.append(row)
    print(f"round {rnd}: {len(names)*4} evals in {time.time()-t:.0f}s", flush=True)
    costs = np.array(costs)
    # separable model: sum of (f_g(d) - base)
    picks = solve_budget_dp([list(c - base_kl) for c in costs], [m[g] for g in names], sum(2 * m[g] for g in names))
    moved = {g: (picks[i] - 2) * m[g] for i, g in enumerate(names)}
    print("level sum", sum(moved.values()), "moved groups", sum(1 for v in moved.values() if v))
    for shrink in (1.0, 0.5):
        new = {g: cur[g] + round(moved[g] * shrink) * step / numels[g] for g in names}
        # exact budget repair
        diff = sum((new[g] - 0.7) * numels[g] for g in names)
        print(f"shrink {shrink}: budget diff weights {diff:.0f}; predicted {sum(costs[i][picks[i]] - base_kl for i in range(len(names))):.3f}")
        k_new, k_cur = kl(new, check), kl(cur, check)
        print(f"  KL check cur {k_cur:.4f} new {k_new:.4f}; sens-windows new {kl(new, wins):.4f} vs {base_kl:.4f}", flush=True)
        if k_new < k_cur:
            cur = new
            print("  accepted", ppl(cur), flush=True)
            break
