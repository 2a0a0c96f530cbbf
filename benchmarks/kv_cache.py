"""KV-cache quantization on SmolLM2: perplexity vs KV bytes, uniform and searched mixed bits, real cache memory.

Dense weights (no sparsity), so only the KV cache changes. Perplexity: WikiText-2 test, the first
``--windows`` windows of 512 tokens, K/V quantized in attention (KIVI layout, group 32, every token
quantized: residual 0). Plans at 3 bits on average (the bytes of uniform 3-bit exactly): K at 4 and V
at 2 bits, the reverse, and a plan searched on calibration data (WikiText-2 *valid*): each of the 60
(layer, K|V) slots is scored by the KL rise when it alone drops from 4 to 2 bits (all others at 4);
bits in {2, 3, 4} are then allocated greedily for Σ w·4^(−b) with w = sensitivity^alpha, and the
alpha whose allocation has the lowest calibration KL wins (alpha 0 is uniform 3-bit). Memory: the
packed cache (:mod:`sparsealloc.pruning.kv.cache`) after 512 greedily generated tokens, measured
against the exact analytic count and against the study objective (bytes per token × tokens).

    python benchmarks/kv_cache.py          # about 20 minutes on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from _common import ROOT, SEED, Timer, calib_windows, load_smollm2, machine, markdown_table, require_data, test_stream

GROUP = 32
SEARCHED = "searched (calibration)"
UNIFORM = (16, 8, 4, 3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=10, help="evaluation windows of 512 tokens")
    parser.add_argument("--sensitivity-windows", type=int, default=4, help="calibration windows scoring the slots")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt", default="The history of the city")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "kv_cache.md"))
    args = parser.parse_args()
    require_data()
    torch.set_num_threads(args.threads)
    from sparsealloc.core import progress
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.objectives.kv_memory import kv_bytes_per_token, kv_geometry
    from sparsealloc.pruning import model_layout

    progress.set_mode("quiet")
    with Timer() as t_load:
        model, tokenizer, _ = load_smollm2()
    layout = model_layout(model)
    attention = layout.attention
    heads, head_dim = kv_geometry(model.config)
    stream = test_stream(tokenizer)
    bytes_per_token = lambda bits: kv_bytes_per_token(attention, bits, heads, head_dim, GROUP)  # noqa: E731
    log(f"loaded in {t_load.seconds:.0f} s; {len(attention)} attention layers, {heads} KV heads × {head_dim}")

    with Timer() as t_search:
        kl = calibration_kl(model, calib_windows(tokenizer)[: args.sensitivity_windows])
        base_kl, sensitivity = slot_sensitivity(kl, attention)
        searched, candidates = search(kl, sensitivity, attention)
    log(f"sensitivity of {len(sensitivity)} slots and {len(candidates)} candidates in {t_search.seconds:.0f} s: "
        + ", ".join(f"alpha {c['alpha']}: KL {c['calibration KL']:.5f}" for c in candidates))
    plans = {f"uniform {b}-bit": uniform(attention, b, b) for b in UNIFORM}
    plans["K4 / V2"] = uniform(attention, 4, 2)
    plans["K2 / V4"] = uniform(attention, 2, 4)
    plans[SEARCHED] = searched

    rows = []
    for name, bits in plans.items():
        with Timer() as t:
            ppl = perplexity_with(model, stream, bits, args.windows)
        rows.append({"plan": name, "mean bits": mean_bits(bits), "KV bytes/token": bytes_per_token(bits),
                     "PPL": ppl, "eval s": round(t.seconds)})
        log(f"{name}: PPL {ppl:.4f} ({t.seconds:.0f} s)")
    base = rows[0]["PPL"]
    for row in rows:
        row["ΔPPL vs 16-bit"] = f"{100 * (row['PPL'] / base - 1):+.2f}%"
    ppl_table = pd.DataFrame(rows)

    memory = []
    for name in [f"uniform {b}-bit" for b in UNIFORM] + [SEARCHED]:
        memory.append(measure_generation(model, tokenizer, layout, plans[name], name, args, heads, head_dim))
        log(f"{name}: {memory[-1]['tokens/s']} tokens/s, cache {memory[-1]['measured bytes']} B")
    memory_table = pd.DataFrame(memory)

    plan_path = ROOT / "benchmarks" / "kv_cache_plan.json"
    AllocationPlan(kv_bits=searched, model={"name": "smollm2-135m", "n_layers": len(layout.blocks)},
                   provenance={"kv": {"group_size": GROUP, "residual": 0}, "source": "benchmarks/kv_cache.py",
                               "method": "per-slot KL sensitivity on calibration windows, greedy allocation "
                                         "of 2/3/4 bits at 3 on average"}
                   ).save(plan_path)
    plot = make_plot(ppl_table, memory_table, ROOT / "benchmarks" / "kv_cache.png")
    text = report(args, ppl_table, memory_table, (base_kl, sensitivity, candidates), searched, attention, t_load,
                  t_search, plot, plan_path)
    Path(args.out).write_text(text)
    print(text)


def log(message: str) -> None:
    print(f"# {message}", flush=True)


def uniform(attention, k: int, v: int) -> dict[str, dict[str, int]]:
    return {name: {"k": k, "v": v} for name in attention}


def mean_bits(kv_bits) -> float:
    values = [b for bits in kv_bits.values() for b in bits.values()]
    return sum(values) / len(values)


def perplexity_with(model, stream, kv_bits, windows: int, residual: int = 0) -> float:
    from sparsealloc.pruning import perplexity
    from sparsealloc.pruning.kv.quant import kv_fake_quant

    with kv_fake_quant(model, kv_bits, GROUP, residual):
        return perplexity(model, stream, 512, windows)


def calibration_kl(model, windows):
    """``kl(kv_bits)``: mean per-token KL(dense ‖ quantized KV) on ``windows`` (the study's ``kl`` proxy)."""
    import torch.nn.functional as F

    from sparsealloc.pruning.kv.quant import kv_fake_quant

    batches = windows.split(2)
    with torch.inference_mode():
        dense = [F.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1).half() for b in batches]

    @torch.inference_mode()
    def kl(kv_bits) -> float:
        total = 0.0
        with kv_fake_quant(model, kv_bits, GROUP):
            for batch, reference in zip(batches, dense):
                logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
                total += float(F.kl_div(logp, reference.float(), log_target=True, reduction="sum"))
        return total / windows.numel()

    return kl


def slot_sensitivity(kl, attention) -> tuple[float, dict[tuple[str, str], float]]:
    """KL of uniform 4-bit, and the KL rise when one (layer, K|V) slot alone drops from 4 to 2 bits."""
    from sparsealloc.core.progress import track

    base = kl(uniform(attention, 4, 4))
    slots = [(name, which) for name in attention for which in ("k", "v")]
    out = {}
    for name, which in track(slots, desc="sensitivity", total=len(slots), unit="slot"):
        bits = uniform(attention, 4, 4)
        bits[name] = {**bits[name], which: 2}
        out[(name, which)] = kl(bits) - base
    return base, out


def allocate(sensitivity, attention, alpha: float, mean: int = 3) -> dict[str, dict[str, int]]:
    """Bits in {2, 3, 4} averaging ``mean``: greedy marginal allocation for Σ w·4^(−b), w = sensitivity^alpha.

    A quantization step halves per bit, so a slot's error scales like 4^(−b); weighting it by the
    measured sensitivity (clipped at 1e-6) and giving bits one at a time to the largest reduction is
    exact for this separable convex model. ``alpha = 0`` gives uniform ``mean`` bits.
    """
    weight = {slot: max(value, 1e-6) ** alpha for slot, value in sensitivity.items()}
    bits = dict.fromkeys(sensitivity, 2)
    for _ in range((mean - 2) * len(bits)):
        slot = max((s for s in bits if bits[s] < 4), key=lambda s: weight[s] * (4.0 ** -bits[s] - 4.0 ** -(bits[s] + 1)))
        bits[slot] += 1
    return {name: {w: bits[(name, w)] for w in ("k", "v")} for name in attention}


def search(kl, sensitivity, attention, alphas=(0.0, 0.25, 0.5, 0.75, 1.0)) -> tuple[dict, list[dict]]:
    """Allocations for several ``alpha``; the one with the lowest calibration KL wins."""
    candidates = []
    for alpha in alphas:
        bits = allocate(sensitivity, attention, alpha)
        counts = {b: sum(1 for kv in bits.values() for x in kv.values() if x == b) for b in (2, 3, 4)}
        candidates.append({"alpha": alpha, "slots at 2/3/4 bits": "/".join(str(counts[b]) for b in (2, 3, 4)),
                           "calibration KL": kl(bits), "bits": bits})
    best = min(candidates, key=lambda c: c["calibration KL"])
    return best["bits"], candidates


def measure_generation(model, tokenizer, layout, kv_bits, name, args, heads, head_dim) -> dict:
    from sparsealloc.objectives.kv_memory import kv_bytes_per_token, kv_cache_bytes
    from sparsealloc.pruning.kv.cache import packed_cache
    from sparsealloc.pruning.kv.generation import generate_text

    cache = packed_cache(layout, kv_bits, GROUP)
    generation = generate_text(model, tokenizer, args.prompt, cache, args.new_tokens, seed=SEED, ignore_eos=True)
    tokens = cache.get_seq_length()
    measured = cache.nbytes()
    exact = kv_cache_bytes(layout.attention, kv_bits, heads, head_dim, tokens, GROUP)
    objective = kv_bytes_per_token(layout.attention, kv_bits, heads, head_dim, GROUP) * tokens
    return {"plan": name, "new tokens": generation.new_tokens, "cache tokens": tokens, "measured bytes": measured,
            "exact analytic": exact, "objective × tokens": round(objective),
            "measured / objective": f"{100 * (measured / objective - 1):+.2f}%",
            "tokens/s": round(generation.tokens_per_second, 2),
            "text (first 60 chars)": " ".join(generation.text.split())[:60].replace("|", "/")}


def make_plot(ppl_table: pd.DataFrame, memory_table: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    uniform_rows = ppl_table[ppl_table.plan.str.startswith("uniform")]
    left.plot(uniform_rows["KV bytes/token"], uniform_rows["PPL"], "o-", color="C0", label="uniform bits")
    for _, row in uniform_rows.iterrows():
        left.annotate(row.plan.split()[1], (row["KV bytes/token"], row["PPL"]), textcoords="offset points", xytext=(4, 4))
    markers = {"K4 / V2": ("s", "C2"), "K2 / V4": ("^", "C1"), SEARCHED: ("*", "C3")}
    for name, (marker, color) in markers.items():
        row = ppl_table[ppl_table.plan == name].iloc[0]
        left.scatter([row["KV bytes/token"]], [row["PPL"]], marker=marker, s=110, color=color, label=f"{name} (3 bits avg)",
                     zorder=3)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("KV-cache bytes per token (analytic, all 30 layers)")
    left.set_ylabel("WikiText-2 test perplexity")
    left.set_title("SmolLM2-135M, dense weights")
    left.legend(fontsize=8)
    x = range(len(memory_table))
    right.bar([i - 0.2 for i in x], memory_table["measured bytes"] / 2**20, width=0.4, label="measured (packed cache)")
    right.bar([i + 0.2 for i in x], memory_table["objective × tokens"] / 2**20, width=0.4, label="objective × tokens")
    right.set_xticks(list(x), [p.replace("uniform ", "").replace(SEARCHED, "searched") for p in memory_table.plan])
    right.set_ylabel("MiB")
    right.set_title(f"KV cache after {memory_table['new tokens'].iloc[0]} generated tokens")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def report(args, ppl_table, memory_table, search_data, searched, attention, t_load, t_search, plot, plan_path) -> str:
    base_kl, sensitivity, candidates = search_data
    ppl = dict(zip(ppl_table.plan, ppl_table.PPL))
    gap = (memory_table["measured bytes"] / memory_table["objective × tokens"] - 1).abs().max()
    exact = bool((memory_table["measured bytes"] == memory_table["exact analytic"]).all())
    checks = [
        ("8-bit KV within 1% of 16-bit", abs(ppl["uniform 8-bit"] / ppl["uniform 16-bit"] - 1) < 0.01,
         f"PPL {ppl['uniform 8-bit']:.4f} vs {ppl['uniform 16-bit']:.4f}"),
        ("2-bit uniform degrades measurably", ppl["uniform 2-bit"] > 1.05 * ppl["uniform 16-bit"],
         f"PPL {ppl['uniform 2-bit']:.4f} vs {ppl['uniform 16-bit']:.4f}"),
        ("searched plan at 3 bits on average beats uniform 3-bit", ppl[SEARCHED] < ppl["uniform 3-bit"],
         f"PPL {ppl[SEARCHED]:.4f} vs {ppl['uniform 3-bit']:.4f}"),
        ("measured cache within 5% of the objective × tokens", gap < 0.05, f"largest gap {100 * gap:.2f}%"),
        ("measured cache equals the exact analytic count", exact, "every row" if exact else "no"),
    ]
    per_layer = pd.DataFrame([{"layer": i, "K sensitivity": sensitivity[(name, "k")],
                               "V sensitivity": sensitivity[(name, "v")], "searched K bits": searched[name]["k"],
                               "searched V bits": searched[name]["v"]} for i, name in enumerate(attention)])
    candidate_table = pd.DataFrame([{k: v for k, v in c.items() if k != "bits"} for c in candidates])
    k_sum = per_layer["K sensitivity"].sum()
    v_sum = per_layer["V sensitivity"].sum()
    lines = [
        "# KV-cache quantization on SmolLM2-135M (benchmarks/kv_cache.py)", "",
        f"Machine: {machine()}; torch threads set to {args.threads} (the 2 cores are shared with other jobs). "
        f"Model load {t_load.seconds:.0f} s.", "",
        "Dense weights (no sparsity). KIVI group quantization, group 32: keys per channel (groups of 32 tokens), "
        "values per token (groups of 32 channels), fp16 scale and zero per group; residual window 0.",
        f"Perplexity: WikiText-2 test, the first {args.windows} windows × 512 tokens (not the 20 of the other "
        "benchmarks, to save time), with K/V quantized in attention for every token (the study proxy's "
        "simulation).", "",
        "## Acceptance", "",
        *[f"- [{'x' if ok else ' '}] {what}: {detail}" for what, ok, detail in checks], "",
        "## Perplexity vs KV bytes", "",
        markdown_table(ppl_table), "",
        "The three mixed plans hold exactly the bytes of uniform 3-bit (slot bits average 3; bytes are linear in "
        "bits below 16).", "",
        "**Search (calibration data only).** "
        f"{args.sensitivity_windows} windows × 256 tokens of WikiText-2 *valid* (seed 0), the KL proxy "
        f"(mean per-token KL, dense ‖ quantized KV). Uniform 4-bit has KL {base_kl:.5f}; each of the 60 "
        "(layer, K|V) slots is scored by the KL rise when it alone drops to 2 bits. Bits in {2, 3, 4} are then "
        "given one at a time to the slot with the largest reduction of Σ w·4^(−b), w = sensitivity^alpha (a "
        "quantization step halves per bit), for a few alphas; the allocation with the lowest calibration KL is "
        f"the searched plan. {len(attention) * 2 + 1 + len(candidates)} calibration passes, "
        f"{t_search.seconds:.0f} s.", "",
        markdown_table(candidate_table), "",
        f"Summed sensitivity: keys {k_sum:.4f}, values {v_sum:.4f}. Per layer:", "",
        markdown_table(per_layer), "",
        f"Plan file: `{plan_path.relative_to(ROOT)}`; try it with "
        f"`sparsealloc generate --plan {plan_path.relative_to(ROOT)} --prompt ...`.", "",
        f"## Real cache memory after {args.new_tokens} generated tokens", "",
        f"Greedy generation from the prompt {args.prompt!r} through the packed cache (`PackedKVCache`), "
        "end-of-sequence ignored. The cache holds prompt + new tokens − 1 (the last token is never fed back). "
        "*Measured* sums the storage of every tensor the cache holds (packed uint8 codes, fp16 scales and zeros, "
        "the fp16 part); *exact analytic* is `kv_cache_bytes`, which also counts the incomplete key group the "
        "cache keeps in fp16; *objective × tokens* is the study's `kv_bytes` objective times the tokens held. "
        "tokens/s includes the prefill and the dequantization of the whole cache at every step (pure PyTorch, "
        "one thread).", "",
        markdown_table(memory_table), "",
        f"![PPL vs KV bytes and measured cache memory]({plot.name})", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
