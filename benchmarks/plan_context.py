"""How a searched plan's lead over hand rules depends on the evaluation window's length.

The held-out texts of ``search_quality.py`` scored in windows of 128, 256 and 512 tokens (the same
10,240 tokens each: 80, 40 and 20 windows): uniform Wanda, the depth ramp β = 0.01 and the given plans,
all pruned with that protocol's calibration (``--calib-mix``, 32 × 256 tokens unless told). The
search's fitness is a KL over windows of ``--calib-seq-len`` tokens; the bars are read at 512.

    python benchmarks/plan_context.py benchmarks/search_quality_wanda70_mix_defaults_rerun_seed1_epyc_wanda70_evo_plan.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from _common import ROOT, Timer, from_root, load_smollm2, machine, markdown_table, require_data
from search_quality import heldout_streams, protocol_evaluator

LENGTHS = ((128, 80), (256, 40), (512, 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", help="AllocationPlan JSON files (Wanda, the protocol's target)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "plan_context.md"))
    args = parser.parse_args()
    require_data()
    from sparsealloc.core import progress
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.pruning import perplexity
    from sparsealloc.pruning.allocators import AllocationInputs, allocate

    progress.set_mode("quiet")
    model, tokenizer, _ = load_smollm2()
    streams = heldout_streams(tokenizer)
    evaluator = protocol_evaluator(model, tokenizer, samples=args.calib_samples, seq_len=args.calib_seq_len)
    ctx = evaluator.ctx
    inputs = AllocationInputs(ctx.layout, ctx.weights(), ctx.stats)
    target = evaluator.spec.target_sparsity
    plans = {"uniform": evaluator.space.decode({}).to_plan(sparsity=allocate("uniform", inputs, target)),
             "depth ramp β=0.01": evaluator.space.decode({}).to_plan(
                 sparsity=allocate("depth_ramp", inputs, target, beta=0.01))}
    plans |= {Path(p).name: AllocationPlan.load(p) for p in args.plans}
    rows = []
    with Timer() as timer:
        for name, plan in plans.items():
            with evaluator.applied(plan):
                for text, stream in streams.items():
                    for length, windows in LENGTHS:
                        rows.append({"plan": name, "text": text, "window": length,
                                     "ppl": perplexity(model, stream, length, windows)})
    frame = pd.DataFrame(rows)
    frame["/ uniform"] = frame["ppl"] / frame.merge(frame[frame.plan == "uniform"], on=["text", "window"])["ppl_y"]
    table = frame.pivot_table(index=["plan", "text"], columns="window", values=["ppl", "/ uniform"], sort=False)
    table.columns = [f"{value} @{window}" for value, window in table.columns]
    table = table.reset_index().round(3)
    out = Path(args.out)
    out.write_text("\n".join([
        "# Plans against hand rules by evaluation window (benchmarks/plan_context.py)", "",
        f"Machine: {machine()}. Wanda at {target:g}, calibration {args.calib_samples}×{args.calib_seq_len} tokens "
        f"(search_quality.py's --calib-mix pool); every row measured in this run ({timer.seconds / 60:.1f} min).", "",
        f"Command: `python benchmarks/plan_context.py {' '.join(from_root(p) for p in args.plans)}"
        f"{f' --calib-samples {args.calib_samples}' if args.calib_samples != 32 else ''}"
        f"{f' --calib-seq-len {args.calib_seq_len}' if args.calib_seq_len != 256 else ''}`", "",
        markdown_table(table), ""]))
    print(out.read_text())


if __name__ == "__main__":
    main()
