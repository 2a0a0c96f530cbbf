"""Engine baselines on SmolLM2: dense, magnitude, Wanda, STADE, RIA at 50/60/70% uniform, and 2:4.

Also the seed-methods tables (``--part methods``: every metric × every allocator at 50/60/70%;
``--part layers``: Block-Influence layer pruning of 2/4/6 blocks with and without Prune&Comp),
implemented in ``benchmarks/methods.py``.

Protocol of the engine issue: calibration 16×256 of WikiText-2 valid (seed 0, one dense forward pass
collecting the statistics every metric shares), evaluation = WikiText-2 test as one stream, the first
20 non-overlapping windows of 512 tokens. Prints and writes a Markdown table.

    python benchmarks/baselines.py                   # engine table → baselines.md
    python benchmarks/baselines.py --part methods    # → baselines_methods.md
    python benchmarks/baselines.py --part layers     # → baselines_layers.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from _common import (ROOT, Timer, calib_windows, load_smollm2, machine, markdown_table, require_data,
                     test_ppl, test_stream)

METRICS = ("magnitude", "wanda", "stade", "ria")
SPARSITIES = (0.5, 0.6, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "baselines.md"))
    parser.add_argument("--part", choices=("engine", "methods", "layers"), default="engine")
    args, rest = parser.parse_known_args()
    if args.part != "engine":
        import methods

        methods.main(["--part", args.part, *rest])
        return
    require_data()
    from sparsealloc.core import AllocationPlan, MetricChoice, progress
    from sparsealloc.pruning import collect_stats, model_layout, prune_

    progress.set_mode("quiet")
    model, tokenizer, _ = load_smollm2()
    layout = model_layout(model)
    windows = calib_windows(tokenizer)
    stream = test_stream(tokenizer)
    with Timer() as t_calib:
        stats = collect_stats(model, windows, layout=layout)
    pristine = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in layout.numels}
    modules = dict(model.named_modules())

    def restore() -> None:
        for name, weight in pristine.items():
            modules[name].weight.data.copy_(weight)

    with Timer() as t_eval:
        dense = test_ppl(model, stream)
    rows = [{"metric": "dense", "pattern": "-", "sparsity": 0.0, "test PPL": dense, "achieved": 0.0}]
    configs = [(m, "unstructured", s) for s in SPARSITIES for m in METRICS]
    configs += [(m, "2:4", 0.5) for m in METRICS]
    for metric, pattern, sparsity in configs:
        restore()
        plan = AllocationPlan.uniform(layout.linears, sparsity, MetricChoice(metric), pattern)
        report = prune_(model, plan, stats, layout=layout)
        rows.append({"metric": metric, "pattern": pattern, "sparsity": sparsity,
                     "test PPL": test_ppl(model, stream), "achieved": report.achieved_mean})
        print(rows[-1], flush=True)
    restore()
    frame = pd.DataFrame(rows)
    pivot = frame[frame.metric != "dense"].pivot_table(index="metric", columns=["pattern", "sparsity"], values="test PPL")
    pivot.columns = [f"{p} {s:.0%}" if p == "unstructured" else p for p, s in pivot.columns]
    pivot = pivot.reset_index()
    text = [
        "# Engine baselines (benchmarks/baselines.py)", "",
        f"Machine: {machine()}. SmolLM2-135M-Instruct (embedded GGUF, de-quantized to fp32). "
        "Calibration 16×256 tokens of WikiText-2 valid (seed 0); evaluation WikiText-2 test, first 20 "
        "windows of 512 tokens. Uniform sparsity over all 210 block Linear layers, per-output-row masks.", "",
        f"Dense PPL **{dense:.2f}**. Calibration pass (one forward over 16×256 tokens with statistics "
        f"hooks): **{t_calib.seconds:.1f} s**; one evaluation: {t_eval.seconds:.1f} s.", "",
        "Test perplexity:", "", markdown_table(pivot), "",
        "Every run's achieved parameter-weighted sparsity:", "", markdown_table(frame), "",
    ]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
