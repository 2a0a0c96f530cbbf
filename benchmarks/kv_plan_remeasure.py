"""Saved KV plans re-measured on more held-out text, beside the uniform bit-widths at the same group sizes.

A study's exported plan is scored on the first 8×512 tokens of WikiText-2 test by kv_front.py and
kv_group_search.py. This script measures the saved plans again on ``--windows``×512 tokens of
WikiText-2 test and of the built-in Python-docs evaluation text, with the uniform ``--bits`` at group 32
(the ladder the bars compare with) and at each plan's group size, all in one run. Same model, Wanda
50% and calibration text as kv_group_search.py (the plans' sparsity is re-applied from that
calibration, so their trial is reproduced).

    python benchmarks/kv_plan_remeasure.py --plans benchmarks/kv_group_search_2p5_g128_plan.json \
        benchmarks/kv_group_search_2p5_plan.json --windows 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from _common import (ROOT, WIKITEXT, from_root, machine, markdown_table, plan_ppl, require_data, uniform_kv_plan,
                     wanda_kv_evaluator)

LADDER_GROUP = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="+", required=True, help="AllocationPlan JSON files with kv_bits")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4], help="uniform widths measured beside them")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--sparsity-plans", nargs="*", default=[],
                        help="plans whose sparsity is also measured with the uniform widths at group 32 "
                             "(what a searched sparsity alone gives, without the KV allocation)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "kv_plan_remeasure.md"))
    args = parser.parse_args()
    require_data()
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.objectives import TrialEvaluator, kv_bytes_per_token
    from sparsealloc.pruning import TextSource, tokenize_stream
    from sparsealloc.spaces.spec import KVSpec

    model, tokenizer, base, shared = wanda_kv_evaluator("sparsealloc-kvremeasure-")
    texts = {"wikitext2-test": tokenize_stream(tokenizer, (WIKITEXT / "test.txt").read_text()),
             "python-docs": tokenize_stream(tokenizer, TextSource("builtin", "eval").read())}
    plans = {Path(p).name: AllocationPlan.load(p) for p in args.plans}
    layout = shared.ctx.layout
    evaluators: dict[int, TrialEvaluator] = {}

    def evaluator(group: int) -> TrialEvaluator:
        if group not in evaluators:
            evaluators[group] = TrialEvaluator(shared.ctx, base.override(kv=KVSpec(group_size=group)))
        return evaluators[group]

    def record(label: str, group: int, plan) -> dict:
        kv_bytes = kv_bytes_per_token(layout.attention, plan.kv_bits, layout.kv_heads, layout.head_dim, group)
        row = {"plan": label, "group": group, "KV bytes/token": round(kv_bytes)}
        row |= {name: plan_ppl(evaluator(group), plan, model, stream, args.windows) for name, stream in texts.items()}
        print(row, flush=True)
        return row

    groups = sorted({LADDER_GROUP} | {int(p.provenance.get("kv", {}).get("group_size", LADDER_GROUP))
                                      for p in plans.values()})
    rows = []
    for group in groups:
        for bits in args.bits:
            rows.append(record(f"uniform {bits}-bit, uniform sparsity", group, uniform_kv_plan(shared.space, bits)))
    for path in args.sparsity_plans:
        searched = AllocationPlan.load(path)
        for bits in args.bits:
            uniform_bits = uniform_kv_plan(shared.space, bits).kv_bits
            rows.append(record(f"uniform {bits}-bit, sparsity of {Path(path).name}", LADDER_GROUP,
                               searched.replace(kv_bits=uniform_bits)))
    for name, plan in plans.items():
        rows.append(record(name, int(plan.provenance.get("kv", {}).get("group_size", LADDER_GROUP)), plan))
    frame = pd.DataFrame(rows)
    reference = frame[(frame["plan"] == f"uniform {min(args.bits)}-bit, uniform sparsity")
                      & (frame["group"] == LADDER_GROUP)].iloc[0]
    for name in texts:
        frame[f"{name} / uniform {min(args.bits)}-bit/{LADDER_GROUP}"] = (frame[name] / reference[name]).round(3)
    command = (f"python benchmarks/kv_plan_remeasure.py --plans {' '.join(map(from_root, args.plans))} --bits "
               f"{' '.join(map(str, args.bits))} --windows {args.windows}"
               + (f" --sparsity-plans {' '.join(map(from_root, args.sparsity_plans))}" if args.sparsity_plans else "")
               + (f" --out {from_root(args.out)}" if Path(args.out).resolve() != ROOT / "benchmarks" / "kv_plan_remeasure.md"
                  else ""))
    text = (f"# Saved KV plans re-measured on more held-out text (benchmarks/kv_plan_remeasure.py)\n\n"
            f"Machine: {machine()}. SmolLM2-135M-Instruct (embedded GGUF, fp32), Wanda 50% (calibration as in "
            f"kv_group_search.py); held-out PPL on the first {args.windows}×512 tokens of WikiText-2 test and of "
            f"the built-in Python-docs evaluation text, all rows in one run.\n\nCommand: `{command}`\n\n"
            f"{markdown_table(frame)}\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
