"""Calibration-set scaling on SmolLM2: random vs SSP (Sorscher et al. 2022) vs loss-selected windows.

Protocol (all numbers from one run, resumable through ``--cache``):

1. A candidate pool of ``--pool`` non-overlapping windows of ``--seq-len`` tokens from WikiText-2
   valid (seed 0). One dense pass gives every window's embedding (block 15's output, mean-pooled)
   and its dense loss. Each method ranks the pool once; the set of size n is the first n windows
   of its ranking (so the sets of one method are nested):
   ``ssp`` = hardest first by cosine distance to the nearest of k=8 k-means prototypes,
   ``loss`` = highest dense loss first (EL2N analogue), ``random`` = seeded shuffles.
2. 20 fixed allocations at 65% mean sparsity (uniform, depth ramps, an inverted ramp, OWL, and
   seeded random smooth shapes), each projected onto the exact budget; Wanda masks.
3. Ground truth: every allocation pruned with a fixed reference calibration set (64 random
   windows of the same length, seed 1), WikiText-2 test perplexity (first ``--eval-windows`` windows
   of 512; default 20, the engine protocol).
4. For every method and size n: the study's KL proxy (``TrialEvaluator``: masks from that set's
   statistics, KL on that set) of the 20 allocations; proxy fidelity = Spearman ρ of those proxies
   with the ground-truth PPL; "best plan" = the allocation with the lowest proxy, pruned with that
   set's statistics, test PPL measured.

    python benchmarks/calibration_scaling.py --sizes 4 8 16 32 --seq-len 128 --cache runs/calib_scaling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import EVAL_SEQ_LEN, ROOT, WIKITEXT, load_smollm2, machine, markdown_table, require_data, test_stream

TARGET = 0.65
LO, HI = 0.35, 0.95  # the study space's window: target ± 0.3, capped by layerwise.max_sparsity
REFERENCE_WINDOWS, REFERENCE_SEED = 64, 1


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


def rankings(features, methods: list[str], random_seeds: int, k: int) -> dict[str, list[int]]:
    """Method label → pool indices, most preferred first."""
    from sparsealloc.pruning.data_selection import score_windows, select

    out = {}
    for method in methods:
        name, _, keep = method.partition("-")
        if name == "random":
            for seed in range(random_seeds):
                scored = score_windows("random", features, seed=seed)
                out[f"random s{seed}"] = select(scored.scores, features.count, "hard", seed=seed).tolist()
        else:
            scored = score_windows(name, features, k=k, seed=0)
            out[method] = select(scored.scores, features.count, keep or "hard", seed=0).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pool", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["ssp-hard", "loss-hard", "random"])
    parser.add_argument("--random-seeds", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=20, help="test windows of 512 tokens per PPL")
    parser.add_argument("--cache", default=None, help="JSON file of finished units (resume after a kill)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "calibration_scaling.md"))
    args = parser.parse_args()
    require_data()
    from scipy.stats import spearmanr
    from tqdm import tqdm

    from sparsealloc.core import progress
    from sparsealloc.core.plan import MetricChoice
    from sparsealloc.objectives import EvalContext, TrialEvaluator
    from sparsealloc.pruning import TextSource, perplexity, prune_, tokenize_stream
    from sparsealloc.pruning.allocators import AllocationInputs
    from sparsealloc.pruning.calibration_select import candidate_offsets, candidate_pool, embedding_block, window_features
    from sparsealloc.spaces.space import SearchSpace
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

    prior_s = cache.get("elapsed_s", 0.0)

    def save() -> None:
        cache["elapsed_s"] = prior_s + time.perf_counter() - started
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=1))

    model, tokenizer, _ = load_smollm2()
    stream = tokenize_stream(tokenizer, TextSource("file", str(WIKITEXT / "valid.txt")).read())
    evaluation = test_stream(tokenizer)

    def test_ppl(m) -> float:
        return perplexity(m, evaluation, EVAL_SEQ_LEN, args.eval_windows)
    pool, _ = candidate_pool(stream, args.pool, args.seq_len, seed=0)
    block = embedding_block(model, None)
    if "features" not in cache:
        t = time.perf_counter()
        f = window_features(model, pool, block, {"embeddings", "losses"})
        cache["features"] = {"embeddings": f.embeddings.tolist(), "losses": f.losses.tolist(),
                             "seconds": time.perf_counter() - t}
        save()
    from sparsealloc.pruning.data_selection import WindowFeatures

    features = WindowFeatures(args.pool, torch.tensor(cache["features"]["embeddings"]),
                              torch.tensor(cache["features"]["losses"]))
    ranks = rankings(features, args.methods, args.random_seeds, args.k)

    ref_offsets = candidate_offsets(stream.numel(), REFERENCE_WINDOWS, args.seq_len, seed=REFERENCE_SEED)
    ref_windows = torch.stack([stream[o : o + args.seq_len] for o in ref_offsets])
    ref = EvalContext.build(model, ref_windows, 4, model_info={"name": "smollm2-135m"}, tokenizer=tokenizer)
    wanda = MetricChoice("wanda", {})
    ref.cache_orders(wanda)
    spec = StudySpec(name="calib-scaling", target_sparsity=TARGET, trials=20)
    space = SearchSpace(spec, ref.layout)
    allocations = block_allocations(ref.layout, AllocationInputs(ref.layout, ref.weights(), ref.stats))
    values = {label: space.encode_sparsity(r) for label, r in allocations.items()}
    plans = {label: space.decode(v).to_plan(model={"name": "smollm2-135m"}) for label, v in values.items()}

    def ppl_of(ctx, plan) -> float:
        ctx.restore_()
        prune_(ctx.model, plan, ctx.stats, layout=ctx.layout, orders=ctx.orders if ctx.orders_metric == wanda else None)
        value = test_ppl(ctx.model)
        ctx.restore_()
        return value

    units = [("reference", label) for label in plans]
    units += [(f"{method}|{n}", None) for n in args.sizes for method in ranks]
    bar = tqdm(total=len(units), desc="calibration scaling", unit="unit", dynamic_ncols=True)
    reference = cache.setdefault("reference", {})
    if "dense" not in cache:
        cache["dense"] = test_ppl(model)
    for label, plan in plans.items():
        if label not in reference:
            reference[label] = ppl_of(ref, plan)
            save()
        bar.update(1)
    del ref
    gc.collect()
    sets = cache.setdefault("sets", {})
    for n in args.sizes:
        for method, order in ranks.items():
            key = f"{method}|{n}"
            if key in sets:
                bar.update(1)
                continue
            bar.set_postfix_str(key)
            t = time.perf_counter()
            ctx = EvalContext.build(model, pool[order[:n]], 4, model_info={"name": "smollm2-135m"}, tokenizer=tokenizer)
            evaluator = TrialEvaluator(ctx, spec)
            setup_s = time.perf_counter() - t
            proxies, trial_s = {}, []
            for label, v in values.items():
                outcome = evaluator(v)
                proxies[label] = outcome.values[0]
                trial_s.append(outcome.attrs["trial_seconds"])
            best = min(proxies, key=proxies.get)
            rho = spearmanr([proxies[a] for a in plans], [reference[a] for a in plans]).statistic
            sets[key] = {"method": method, "n": n, "tokens": n * args.seq_len, "rho": float(rho), "best": best,
                         "best_ppl": ppl_of(ctx, plans[best]), "proxies": proxies, "setup_s": setup_s,
                         "trial_s": float(np.mean(trial_s))}
            save()
            del evaluator, ctx
            gc.collect()
            bar.update(1)
    bar.close()
    save()
    report(cache, args)


def report(cache: dict, args) -> None:
    """Tables, plot and the stated conclusion."""
    sets = pd.DataFrame(cache["sets"].values())
    sets["family"] = sets["method"].str.replace(r" s\d+$", "", regex=True)
    family = (sets.groupby(["family", "n"])
              .agg(tokens=("tokens", "first"), rho=("rho", "mean"), rho_min=("rho", "min"), rho_max=("rho", "max"),
                   best_ppl=("best_ppl", "mean"), ppl_min=("best_ppl", "min"), ppl_max=("best_ppl", "max"),
                   trial_s=("trial_s", "mean"))
              .reset_index())
    reference = cache["reference"]
    oracle = min(reference.values())
    plot = _plot(family, oracle, reference["uniform"], Path(args.out).with_suffix(".png"))
    conclusion = _conclusion(family)
    per_set = sets[["method", "n", "tokens", "rho", "best", "best_ppl", "trial_s"]].rename(
        columns={"rho": "Spearman ρ", "best": "best plan (lowest proxy)", "best_ppl": "its test PPL",
                 "trial_s": "s / trial"})
    ref_table = pd.DataFrame({"allocation": list(reference), "test PPL (reference masks)": list(reference.values())})
    text = [
        "# Calibration-set scaling (benchmarks/calibration_scaling.py)", "",
        f"Machine: {machine()}; the 2 cores were shared with other jobs during the run, so seconds are "
        f"inflated. Total wall time {cache['elapsed_s'] / 60:.1f} min (summed over resumed invocations).", "",
        f"Model SmolLM2-135M-Instruct, Wanda masks, target {TARGET:.0%} (exact budget). Candidate pool: "
        f"{args.pool} non-overlapping windows × {args.seq_len} tokens of WikiText-2 valid (seed 0); "
        f"SSP: block 15 output mean-pooled over positions 1…L−1, centered, k={args.k} cosine k-means, score = "
        "distance to the nearest prototype, hardest first; loss: dense mean next-token loss, highest first; "
        f"random: {args.random_seeds} seeded shuffles of the pool (mean shown, min–max in brackets). "
        f"Ground truth: each of the 20 allocations pruned with a fixed reference set "
        f"({REFERENCE_WINDOWS} random windows × {args.seq_len}, seed {REFERENCE_SEED}), WikiText-2 test PPL "
        f"(first {args.eval_windows} windows of 512). Proxy: KL(dense ‖ pruned) on the set, masks from the set's statistics "
        "(exactly a study trial). Best plan: lowest proxy among the 20, pruned with the set, test PPL.", "",
        f"Dense PPL {cache['dense']:.2f}. Over the 20 allocations, reference-mask PPL ranges "
        f"{oracle:.1f} (best: {min(reference, key=reference.get)}) to {max(reference.values()):.1f}; "
        f"uniform {reference['uniform']:.1f}.", "",
        "## Conclusion", "", *conclusion, "",
        "## Per method and size", "", markdown_table(_pretty(family)), "",
        f"![fidelity and best-plan PPL vs calibration size]({plot.name})", "",
        "## Every calibration set", "", markdown_table(per_set), "",
        "## Reference perplexities of the 20 allocations", "", markdown_table(ref_table), "",
    ]
    Path(args.out).write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))


def _pretty(family: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in family.iterrows():
        spread = r.rho_max > r.rho_min
        rows.append({"method": r.family, "windows": int(r.n), "tokens": int(r.tokens),
                     "Spearman ρ": f"{r.rho:.3f}" + (f" [{r.rho_min:.3f}–{r.rho_max:.3f}]" if spread else ""),
                     "best-plan PPL": f"{r.best_ppl:.1f}" + (f" [{r.ppl_min:.1f}–{r.ppl_max:.1f}]" if spread else ""),
                     "s / trial": f"{r.trial_s:.2f}"})
    return pd.DataFrame(rows)


def _conclusion(family: pd.DataFrame) -> list[str]:
    """Plain statements computed from the curves: who reaches random's largest-set fidelity, and when."""
    largest = int(family.n.max())
    random_top = family[(family.family == "random") & (family.n == largest)].iloc[0]
    lines = []
    for name, group in family.groupby("family"):
        group = group.sort_values("n")
        reach_rho = group[group.rho >= random_top.rho]
        reach_ppl = group[group.best_ppl <= random_top.best_ppl]
        first_rho = f"{int(reach_rho.n.iloc[0])} windows" if len(reach_rho) else f"no size up to {largest}"
        first_ppl = f"{int(reach_ppl.n.iloc[0])} windows" if len(reach_ppl) else f"no size up to {largest}"
        wins = sum(1 for _, r in group.iterrows()
                   if r.rho > family[(family.family == "random") & (family.n == r.n)].rho.iloc[0])
        lines.append(f"- **{name}**: reaches random's ρ at {largest} windows ({random_top.rho:.3f}) with {first_rho}; "
                     f"reaches random's best-plan PPL at {largest} windows ({random_top.best_ppl:.1f}) with {first_ppl}; "
                     f"ρ above random's at {wins} of {len(group)} sizes.")
    pruned = family[family.family != "random"]
    fewer = [r for _, r in pruned.iterrows() if r.n < largest and r.rho >= random_top.rho]
    if fewer:
        best = min(fewer, key=lambda r: r.n)
        lines.append(f"- **Answer:** yes — {best.family} with {int(best.n)} windows ({int(best.tokens)} tokens) is at "
                     f"least as faithful (ρ {best.rho:.3f}) as {largest} random windows, so trials on it cost "
                     f"{best.trial_s:.2f} s instead of {random_top.trial_s:.2f} s.")
    else:
        lines.append(f"- **Answer:** no — no pruned calibration set smaller than {largest} windows reached the "
                     f"proxy fidelity of {largest} random windows (ρ {random_top.rho:.3f}) in this run.")
    return lines


def _plot(family: pd.DataFrame, oracle: float, uniform: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, group in family.groupby("family"):
        group = group.sort_values("n")
        for ax, col, lo, hi in ((left, "rho", "rho_min", "rho_max"), (right, "best_ppl", "ppl_min", "ppl_max")):
            line, = ax.plot(group.tokens, group[col], marker="o", label=name)
            if (group[hi] > group[lo]).any():
                ax.fill_between(group.tokens, group[lo], group[hi], color=line.get_color(), alpha=0.15)
    right.axhline(oracle, color="gray", ls="--", lw=1, label="best of the 20 (reference masks)")
    right.axhline(uniform, color="gray", ls=":", lw=1, label="uniform (reference masks)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration tokens (windows × seq_len)")
        ax.legend(fontsize=8)
    left.set_ylabel("Spearman ρ (proxy vs test PPL, 20 allocations)")
    left.set_title("proxy fidelity")
    right.set_ylabel("test PPL of the lowest-proxy plan")
    right.set_title("best plan chosen by the proxy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
