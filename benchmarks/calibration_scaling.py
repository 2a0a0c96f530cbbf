"""Calibration-set scaling on SmolLM2: random vs SSP (Sorscher et al. 2022) vs loss-selected windows.

Question: does a calibration set pruned by a good ranking keep the proxy's fidelity with fewer
windows? A trial's cost is the forward pass over the calibration windows, so fewer windows = faster
trials. Protocol (all numbers from one run, resumable through ``--cache``):

1. Candidate pool: ``--pool`` non-overlapping windows of ``--seq-len`` tokens of WikiText-2 valid
   (seed 0). One dense pass gives each window's embedding (block 15's output, mean-pooled over
   positions 1…L−1) and its dense loss. Rankings of the pool: ``ssp`` = hardest first by cosine
   distance to the nearest of k=8 k-means prototypes; ``loss`` = highest dense loss first (EL2N
   analogue); ``random`` = a seeded shuffle. The set of size n is the first n windows of a ranking.
2. 20 fixed allocations at 65% mean sparsity (uniform, depth ramps, an inverted ramp, OWL, seeded
   random smooth shapes), each projected onto the exact budget; Wanda masks.
3. Masks: every allocation is pruned with the statistics of one fixed reference set (64 random
   windows of the pool's length, seed 1). Statistics are collected once per study, while the proxy's
   forward pass is paid by every trial; so this benchmark varies the set that *scores* trials and
   keeps the masks fixed (it does not measure how the masks change with the set).
4. Ground truth: each pruned allocation's WikiText-2 test perplexity (first ``--eval-windows``
   windows of 512; 20 in the engine protocol).
5. Proxy: the study's own ``TrialEvaluator`` with the ``kl`` proxy (KL(dense ‖ pruned) per token; a
   mean over tokens, so per-window values combine exactly, unlike the default ``hidden``, a ratio of
   sums) run once per allocation
   over the union U of the windows that any set uses, one window per batch; its running value after
   each batch gives every window's KL exactly. A set's proxy is the mean over its windows. Fidelity =
   Spearman ρ of the 20 proxies with the 20 perplexities; best plan = the lowest proxy, its PPL.
   Random sets of size n < N are 200 seeded n-subsets of the first N windows of the shuffle (mean
   and 10–90% band); the size-N random set is that shuffle's first N windows.

    python benchmarks/calibration_scaling.py --sizes 4 8 16 32 --seq-len 128 --eval-windows 10 \\
        --cache runs/calib_scaling.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import EVAL_SEQ_LEN, ROOT, WIKITEXT, load_smollm2, machine, markdown_table, require_data, test_stream

TARGET = 0.65
LO, HI = 0.35, 0.95  # the study space's window: target ± 0.3, capped by layerwise.max_sparsity
REFERENCE_WINDOWS, REFERENCE_SEED = 64, 1
RANKINGS = ("ssp", "loss", "random")
RANDOM_DRAWS = 200


def block_allocations(layout, inputs, n_random: int = 11) -> dict[str, dict[str, float]]:
    """Label → ratio per Linear FQN for the 20 fixed allocations (exact budget, within [LO, HI])."""
    from sparsealloc.pruning.allocators import allocate
    from sparsealloc.spaces.budget import project_to_budget

    blocks = list(layout.blocks)
    numels = {b: sum(layout.numels[n] for n in layout.block_linears(b)) for b in blocks}

    def spread(block_ratio: dict[str, float]) -> dict[str, float]:
        repaired = project_to_budget(block_ratio, numels, TARGET, LO, HI)
        return {n: repaired[layout.block_of[n]] for n in layout.linears}

    def per_block(ratios: dict[str, float]) -> dict[str, float]:
        return {b: ratios[layout.block_linears(b)[0]] for b in blocks}

    out = {"uniform": spread({b: TARGET for b in blocks})}
    for beta in (0.003, 0.006, 0.009, 0.012):
        out[f"depth ramp β={beta}"] = spread(per_block(allocate("depth_ramp", inputs, TARGET, beta=beta)))
    out["inverted ramp β=-0.006"] = spread({b: TARGET + 0.006 * ((len(blocks) - 1) / 2 - i) for i, b in enumerate(blocks)})
    for lam in (0.04, 0.08, 0.12):
        out[f"owl λ={lam}"] = spread(per_block(allocate("owl", inputs, TARGET, m=5.0, lam=lam)))
    x = np.linspace(0.0, 1.0, len(blocks))
    for seed in range(n_random):
        rng = np.random.default_rng(seed)
        slope, amp = rng.uniform(-0.2, 0.35), rng.uniform(0.0, 0.12)
        freq, phase = rng.choice([0.5, 1.0, 1.5, 2.0]), rng.uniform(0, 2 * math.pi)
        shape = TARGET + slope * (x - 0.5) + amp * np.sin(2 * math.pi * freq * x + phase) + rng.normal(0, 0.03, len(x))
        out[f"random shape {seed}"] = spread({b: float(v) for b, v in zip(blocks, shape)})
    return out


def rankings(features, k: int) -> dict[str, list[int]]:
    """Ranking name → pool indices, most preferred first (ssp and loss: hardest first)."""
    from sparsealloc.pruning.calibration.data_selection import score_windows, select

    out = {}
    for name in RANKINGS:
        scored = score_windows(name, features, k=k, seed=0)
        out[name] = select(scored.scores, features.count, "hard", seed=0).tolist()
    return out


def per_window_kl(intermediate) -> list[float]:
    """Each window's mean KL from the running means reported after each one-window batch."""
    running = [value for _, value in sorted(intermediate)]
    return [i * v - (i - 1) * (running[i - 2] if i > 1 else 0.0) for i, v in enumerate(running, start=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pool", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=20, help="test windows of 512 tokens per PPL")
    parser.add_argument("--cache", default=None, help="JSON file of finished units (resume after a kill)")
    parser.add_argument("--report-only", action="store_true", help="write the report from --cache, run nothing")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "calibration_scaling.md"))
    args = parser.parse_args()
    require_data()
    from tqdm import tqdm

    from sparsealloc.core import progress
    from sparsealloc.objectives import EvalContext, TrialEvaluator
    from sparsealloc.pruning import TextSource, collect_stats, model_layout, perplexity, tokenize_stream
    from sparsealloc.pruning.allocators import AllocationInputs
    from sparsealloc.pruning.calibration.data_selection import WindowFeatures
    from sparsealloc.pruning.calibration.select import candidate_offsets, candidate_pool, embedding_block, window_features
    from sparsealloc.spaces.spec import StudySpec

    progress.set_mode("quiet")
    started = time.perf_counter()
    cache_path = Path(args.cache) if args.cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    config = {"sizes": args.sizes, "seq_len": args.seq_len, "pool": args.pool, "k": args.k, "target": TARGET,
              "eval_windows": args.eval_windows}
    if cache.get("config", config) != config:
        raise SystemExit(f"--cache {cache_path} holds a run with {cache['config']}, not {config}")
    cache["config"] = config
    if args.report_only:
        report(cache, args)
        return
    prior_s = cache.get("elapsed_s", 0.0)
    cache["load"] = [os.getloadavg()[0]]

    def save() -> None:
        cache["elapsed_s"] = prior_s + time.perf_counter() - started
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=1))

    model, tokenizer, _ = load_smollm2()
    layout = model_layout(model)
    stream = tokenize_stream(tokenizer, TextSource("file", str(WIKITEXT / "valid.txt")).read())
    evaluation = test_stream(tokenizer)
    pool, _ = candidate_pool(stream, args.pool, args.seq_len, seed=0)
    if "features" not in cache:
        t = time.perf_counter()
        f = window_features(model, pool, embedding_block(model, None), {"embeddings", "losses"})
        cache["features"] = {"embeddings": f.embeddings.tolist(), "losses": f.losses.tolist(),
                             "seconds": time.perf_counter() - t}
        save()
    features = WindowFeatures(args.pool, torch.tensor(cache["features"]["embeddings"]),
                              torch.tensor(cache["features"]["losses"]))
    ranks = rankings(features, args.k)
    top = max(args.sizes)
    union = sorted({i for order in ranks.values() for i in order[:top]})
    cache["rankings"] = {name: order[:top] for name, order in ranks.items()}
    cache["union"] = union

    ref_offsets = candidate_offsets(stream.numel(), REFERENCE_WINDOWS, args.seq_len, seed=REFERENCE_SEED)
    ref_stats = collect_stats(model, torch.stack([stream[o : o + args.seq_len] for o in ref_offsets]), 4,
                              layout=layout)
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight.detach() for n in layout.linears}
    allocations = block_allocations(layout, AllocationInputs(layout, weights, ref_stats))
    spec = StudySpec(name="calib-scaling", target_sparsity=TARGET, trials=20, objectives=("kl",))
    ctx = EvalContext.build(model, pool[union], 1, model_info={"name": "smollm2-135m"}, tokenizer=tokenizer)
    ctx = dataclasses.replace(ctx, stats=ref_stats)  # masks from the reference set; windows = U
    evaluator = TrialEvaluator(ctx, spec)
    values = {label: evaluator.space.encode_sparsity(r) for label, r in allocations.items()}
    plans = {label: evaluator.plan_for(v) for label, v in values.items()}

    reference = cache.setdefault("reference", {})
    window_kl = cache.setdefault("window_kl", {})
    trial_s = cache.setdefault("trial_s", {})
    if "dense" not in cache:
        cache["dense"] = perplexity(model, evaluation, EVAL_SEQ_LEN, args.eval_windows)
    for label in tqdm(plans, desc="calibration scaling", unit="allocation", dynamic_ncols=True):
        if label not in window_kl:
            outcome = evaluator(values[label], report=lambda step, value: False)
            kl = per_window_kl(outcome.intermediate)
            assert abs(float(np.mean(kl)) - outcome.values[0]) < 1e-6 * max(1.0, outcome.values[0])
            window_kl[label] = dict(zip(map(str, union), kl))
            trial_s[label] = outcome.attrs["trial_seconds"]
            save()
        if label not in reference:
            with evaluator.applied(plans[label]):
                reference[label] = perplexity(model, evaluation, EVAL_SEQ_LEN, args.eval_windows)
            save()
    if "uniform_again" not in cache:  # an earlier invocation's masks and PPL, reproduced by this one
        with evaluator.applied(plans["uniform"]):
            cache["uniform_again"] = perplexity(model, evaluation, EVAL_SEQ_LEN, args.eval_windows)
    del evaluator, ctx
    gc.collect()
    cache["load"].append(os.getloadavg()[0])
    save()
    report(cache, args)


def set_results(cache: dict, sizes: list[int]) -> pd.DataFrame:
    """One row per (method, size, draw): ρ, the lowest-proxy allocation and its PPL."""
    from scipy.stats import spearmanr

    reference = cache["reference"]
    labels = list(reference)
    kl = {a: cache["window_kl"][a] for a in labels}
    truth = [reference[a] for a in labels]
    top = max(sizes)

    def score(windows) -> tuple[float, str]:
        proxies = [float(np.mean([kl[a][str(i)] for i in windows])) for a in labels]
        best = labels[int(np.argmin(proxies))]
        return float(spearmanr(proxies, truth).statistic), best

    rows = []
    rng = np.random.default_rng(0)
    for name, order in cache["rankings"].items():
        for n in sizes:
            draws = [order[:n]]
            if name == "random" and n < top:
                draws = [list(rng.choice(order[:top], n, replace=False)) for _ in range(RANDOM_DRAWS)]
            for draw, windows in enumerate(draws):
                rho, best = score(windows)
                rows.append({"method": name, "n": n, "draw": draw, "rho": rho, "best": best,
                             "best_ppl": reference[best]})
    union = [int(i) for i in cache["union"]]
    rho, best = score(union)
    rows.append({"method": "union", "n": len(union), "draw": 0, "rho": rho, "best": best,
                 "best_ppl": reference[best]})
    return pd.DataFrame(rows)


def report(cache: dict, args) -> None:
    """Tables, plot and the stated conclusion."""
    seq_len = cache["config"]["seq_len"]
    sets = set_results(cache, cache["config"]["sizes"])
    family = (sets.groupby(["method", "n"])
              .agg(rho=("rho", "mean"), rho_lo=("rho", lambda x: x.quantile(0.1)), rho_hi=("rho", lambda x: x.quantile(0.9)),
                   best_ppl=("best_ppl", "mean"), ppl_lo=("best_ppl", lambda x: x.quantile(0.1)),
                   ppl_hi=("best_ppl", lambda x: x.quantile(0.9)), draws=("draw", "count"),
                   best=("best", lambda x: x.mode().iloc[0]))
              .reset_index())
    family["tokens"] = family.n * seq_len
    reference = cache["reference"]
    oracle = min(reference.values())
    plot = _plot(family[family.method != "union"], oracle, Path(args.out).with_suffix(".png"))
    union = family[family.method == "union"].iloc[0]
    trial_s = cache["trial_s"]
    text = [
        "# Calibration-set scaling (benchmarks/calibration_scaling.py)", "",
        f"Machine: {machine()}; load average {cache.get('load', [float('nan')])[0]:.1f} at the start and "
        f"{cache.get('load', [float('nan')] * 2)[-1]:.1f} at the end of the last invocation; the run took "
        f"{cache['elapsed_s'] / 60:.0f} min in all.", "",
        f"Model SmolLM2-135M-Instruct, Wanda masks, 20 allocations at {TARGET:.0%} (exact budget). Pool: "
        f"{cache['config']['pool']} non-overlapping windows × {seq_len} tokens of WikiText-2 valid (seed 0). "
        f"SSP: block 15 output mean-pooled, centered, k={cache['config']['k']} cosine k-means, hardest first; "
        "loss: dense mean next-token loss, highest first; random: seeded shuffle "
        f"(sizes below {max(cache['config']['sizes'])}: mean of {RANDOM_DRAWS} random subsets, 10–90% band in "
        "brackets). Masks from a fixed reference set "
        f"({REFERENCE_WINDOWS} random windows × {seq_len}, seed {REFERENCE_SEED}) for every allocation; the "
        "calibration set under test only scores the trials (see the script's docstring for why). Proxy: "
        "`kl`, the per-token KL of next-token distributions (a set's value is the mean of its windows'). "
        f"Ground truth: WikiText-2 test PPL, first {cache['config']['eval_windows']} windows of 512 "
        "(the engine protocol uses 20).", "",
        f"Dense PPL {cache['dense']:.2f}. The 20 allocations range from {oracle:.1f} "
        f"({min(reference, key=reference.get)}) to {max(reference.values()):.1f} "
        f"({max(reference, key=reference.get)}); uniform {reference['uniform']:.1f}. One trial over all "
        f"{int(union.n)} windows of the union took {np.median(list(trial_s.values())):.1f} s (median of the 20; "
        "the first ones ran beside other jobs)"
        f"; over them the proxy's ρ is {union.rho:.3f}. Uniform's PPL recomputed at the end of the run: "
        f"{cache.get('uniform_again', float('nan')):.2f}.", "",
        "## Conclusion", "", *_conclusion(family[family.method != "union"], sets), "",
        "## Per method and size", "", markdown_table(_pretty(family[family.method != "union"])), "",
        f"![fidelity and best-plan PPL vs calibration size]({plot.name})", "",
        "## Reference perplexities of the 20 allocations", "",
        markdown_table(pd.DataFrame({"allocation": list(reference), "test PPL": list(reference.values())})), "",
    ]
    Path(args.out).write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))


def _pretty(family: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in family.sort_values(["n", "method"]).iterrows():
        band = r.draws > 1
        rows.append({"method": r.method, "windows": int(r.n), "tokens": int(r.tokens),
                     "Spearman ρ": f"{r.rho:.3f}" + (f" [{r.rho_lo:.3f}, {r.rho_hi:.3f}]" if band else ""),
                     "best-plan PPL": f"{r.best_ppl:.1f}" + (f" [{r.ppl_lo:.1f}, {r.ppl_hi:.1f}]" if band else ""),
                     "lowest-proxy allocation": r.best + (" (most frequent)" if band else "")})
    return pd.DataFrame(rows)


def _conclusion(family: pd.DataFrame, sets: pd.DataFrame) -> list[str]:
    """Plain statements computed from the curves.

    ssp and loss are one deterministic set per size, so each is compared with the spread of random
    sets of the same size: above the 90th percentile of random = better than chance.
    """
    largest = int(family.n.max())
    target = family[(family.method == "random") & (family.n == largest)].iloc[0].rho
    random = family[family.method == "random"].set_index("n")
    draws = sets[sets.method == "random"]
    reach = {int(n): float((g.rho >= target - 1e-12).mean()) for n, g in draws.groupby("n")}

    def position(r) -> str:
        band = random.loc[r.n]
        if r.n == largest:
            return "same as random" if abs(r.rho - band.rho) < 1e-12 else ("above" if r.rho > band.rho else "below")
        return "above" if r.rho > band.rho_hi else ("below" if r.rho < band.rho_lo else "within")

    lines = ["- **random**: mean ρ " + ", ".join(f"{random.loc[n].rho:.3f}" for n in sorted(random.index))
             + f" at {', '.join(str(int(n)) for n in sorted(random.index))} windows; share of random sets that "
             f"reach the ρ of {largest} random windows ({target:.3f}): "
             + ", ".join(f"{reach[n]:.0%} at {n}" for n in sorted(reach)) + "."]
    robust, lucky, above = [], [], []
    for name, group in family[family.method != "random"].groupby("method"):
        group = group.sort_values("n")
        cells = [f"{r.rho:.3f} at {int(r.n)} ({position(r)})" for _, r in group.iterrows()]
        lines.append(f"- **{name}**: ρ {'; '.join(cells)} — position relative to random sets of the same size "
                     "(above/below their 10–90% band).")
        above += [f"{name} at {int(r.n)}" for _, r in group.iterrows() if position(r) == "above"]
        for _, r in group.iterrows():
            if r.n < largest and r.rho >= target - 1e-12:
                (robust if position(r) == "above" else lucky).append(r)
    if robust:
        best = min(robust, key=lambda r: (r.n, -r.rho))
        lines.append(f"- **Answer: yes.** {best.method} with {int(best.n)} windows ({int(best.tokens)} tokens, "
                     f"{best.n / largest:.0%} of the proxy's cost per trial) ranks the 20 allocations at least as "
                     f"faithfully (ρ {best.rho:.3f}) as {largest} random windows ({target:.3f}), and above the "
                     f"10–90% band of random sets of its size, so the selection, not luck, earns it.")
    elif lucky:
        best = min(lucky, key=lambda r: (r.n, -r.rho))
        lines.append(f"- **Answer: fewer windows suffice, but the selection does not earn it.** {best.method} with "
                     f"{int(best.n)} windows reaches the ρ of {largest} random windows ({best.rho:.3f} vs "
                     f"{target:.3f}), yet it lies within the band of random sets of that size, and "
                     f"{reach.get(int(best.n), 0.0):.0%} of random {int(best.n)}-window sets reach it too. "
                     + (f"Above random's band: {', '.join(above)}." if above else
                        "Neither SSP nor loss selection rose above random's band at any size."))
    else:
        lines.append(f"- **Answer: no.** No SSP- or loss-selected set smaller than {largest} windows reached the "
                     f"fidelity of {largest} random windows (ρ {target:.3f}) in this run.")
    return lines


def _plot(family: pd.DataFrame, oracle: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, group in family.groupby("method"):
        group = group.sort_values("n")
        for ax, col, lo, hi in ((left, "rho", "rho_lo", "rho_hi"), (right, "best_ppl", "ppl_lo", "ppl_hi")):
            line, = ax.plot(group.tokens, group[col], marker="o", label=name)
            if (group.draws > 1).any():
                ax.fill_between(group.tokens, group[lo], group[hi], color=line.get_color(), alpha=0.15)
    right.axhline(oracle, color="gray", ls="--", lw=1, label="best of the 20 allocations")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration tokens scored per trial (windows × seq_len)")
        ax.legend(fontsize=8)
    left.set_ylabel("Spearman ρ (proxy vs test PPL, 20 allocations)")
    left.set_title("proxy fidelity")
    right.set_ylabel("test PPL of the lowest-proxy allocation")
    right.set_title("plan chosen by the proxy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
