"""Uniform KV ladder at several quantization group sizes: held-out PPL against KV bytes (SmolLM2, 50% Wanda).

The evidence for (or against) a per-slot group-size rung in KV budgets (issue 20): at group 32 the fp16
scale and zero cost one bit per element, as much as a step of the bit ladder, so coarser groups may buy
more accuracy per byte than extra bits. Same protocol as ``kv_front.py`` (uniform 50% Wanda, calibration
from the first 70% of WikiText-2 valid, held-out PPL on WikiText-2 test, K and V fake-quantized for every
token, residual 0), every point measured in one run.

    python benchmarks/kv_group_ladder.py --groups 32 64 128 --bits 2 3 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from _common import (EVAL_SEQ_LEN, ROOT, WIKITEXT, Timer, machine, markdown_table, plan_ppl, require_data,
                     uniform_kv_plan, wanda_kv_evaluator)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "kv_group_ladder.md"))
    args = parser.parse_args()
    require_data()
    from sparsealloc.objectives import TrialEvaluator, kv_bytes_per_token
    from sparsealloc.pruning import tokenize_stream
    from sparsealloc.spaces.spec import KVSpec

    model, tokenizer, base, shared = wanda_kv_evaluator("sparsealloc-kvgroups-", args.target)
    test = tokenize_stream(tokenizer, (WIKITEXT / "test.txt").read_text())
    layout = shared.ctx.layout
    rows = []

    def record(name, group: int, evaluator, plan) -> None:
        nbytes = kv_bytes_per_token(layout.attention, plan.kv_bits, layout.kv_heads, layout.head_dim, group)
        rows.append({"bits": name, "group": group if name != 16 else "-", "KV bytes/token": nbytes,
                     "bits per element": 8 * nbytes / (2 * len(layout.attention) * layout.kv_heads * layout.head_dim),
                     "held-out PPL": plan_ppl(evaluator, plan, model, test, args.eval_windows)})
        print(rows[-1], flush=True)

    with Timer() as t_all:
        for group in args.groups:
            evaluator = TrialEvaluator(shared.ctx, base.override(kv=KVSpec(group_size=group)))
            for bits in [16, *args.bits] if group == args.groups[0] else args.bits:
                record(bits, group, evaluator, uniform_kv_plan(evaluator.space, bits))
        # Hand-made mixes at the bytes of uniform 3-bit at the first group (K and V cost the same per
        # token when head_dim is a multiple of the group): 4 and 3 bits at group 2× the first.
        mix_group = 2 * args.groups[0]
        evaluator = TrialEvaluator(shared.ctx, base.override(kv=KVSpec(group_size=mix_group)))
        plan = evaluator.space.decode(evaluator.space.defaults()).to_plan()
        half = len(layout.attention) // 2
        mixes = {
            "K 4 / V 3": {a: {"k": 4, "v": 3} for a in layout.attention},
            "K 3 / V 4": {a: {"k": 3, "v": 4} for a in layout.attention},
            "first half 4, last half 3": {a: dict.fromkeys("kv", 4 if i < half else 3)
                                          for i, a in enumerate(layout.attention)},
            "first half 3, last half 4": {a: dict.fromkeys("kv", 3 if i < half else 4)
                                          for i, a in enumerate(layout.attention)},
        }
        for name, kv_bits in mixes.items():
            record(name, mix_group, evaluator, plan.replace(kv_bits=kv_bits))
    frame = pd.DataFrame(rows).sort_values("KV bytes/token", ascending=False, kind="stable")
    command = "python benchmarks/kv_group_ladder.py --groups " + " ".join(map(str, args.groups)) + " --bits " + \
        " ".join(map(str, args.bits))
    text = (f"# Uniform KV ladder at several group sizes (benchmarks/kv_group_ladder.py)\n\nMachine: {machine()}. "
            f"SmolLM2-135M-Instruct (embedded GGUF, fp32), uniform Wanda at {args.target:.0%}; KIVI quantization "
            f"(keys per channel, values per token), residual 0, every token fake-quantized; held-out PPL on "
            f"WikiText-2 test, first {args.eval_windows}×{EVAL_SEQ_LEN}. All points in one run ({t_all.seconds:.0f} s).\n\n"
            f"Command: `{command}`\n\n{markdown_table(frame)}\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
