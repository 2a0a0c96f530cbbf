"""Independent vs sequential SparseGPT at the same allocation, on SmolLM2: what ``--sequential`` buys.

A level database compresses every Linear from the *dense* model's calibration inputs (so that any
stitching of levels is consistent, EvoPress); SparseGPT's reference order compresses block by block
on the inputs of the already-compressed blocks (``apply/prune --sequential``,
:mod:`sparsealloc.pruning.sequential`). Both at the same ratios, same calibration windows (the first
70% of WikiText-2 valid, ``--calib-samples`` × 256 tokens, seed 0), measured in one run on WikiText-2
test and the built-in Python-docs text (``--eval-windows`` × 512 each). Allocations: uniform, the
depth ramp at each ``--ramp-betas``, and any plan files given with ``--plans``.

    python benchmarks/sequential_sparsegpt.py     # → benchmarks/sequential_sparsegpt.md
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import pandas as pd
import torch

from _common import ROOT, WIKITEXT, Timer, load_smollm2, machine, markdown_table, require_data
from search_quality import EVAL_SEQ_LEN, split_valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--ramp-betas", type=float, nargs="+", default=[0.006, 0.01])
    parser.add_argument("--plans", nargs="*", default=[], help="AllocationPlan JSON files (e.g. a study's export)")
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "sequential_sparsegpt.md"))
    args = parser.parse_args()
    require_data()
    from sparsealloc.core import progress
    from sparsealloc.core.plan import AllocationPlan, MetricChoice
    from sparsealloc.pruning import TextSource, collect_stats, model_layout, perplexity, prune_, tokenize_stream
    from sparsealloc.pruning.allocators import AllocationInputs, allocate
    from sparsealloc.pruning.calibration.text import sample_windows
    from sparsealloc.pruning.sequential import prune_sequential_

    progress.set_mode("quiet")
    work = Path(tempfile.mkdtemp(prefix="sparsealloc-seq-"))
    calib_text, _ = split_valid(work)
    dense_model, tokenizer, _ = load_smollm2()
    layout = model_layout(dense_model)
    windows = sample_windows(tokenize_stream(tokenizer, calib_text.read_text()), args.calib_samples, 256, 0)
    streams = {"wikitext2-test": tokenize_stream(tokenizer, (WIKITEXT / "test.txt").read_text()),
               "python-docs": tokenize_stream(tokenizer, TextSource("builtin", "eval").read())}
    with Timer() as t_stats:
        stats = collect_stats(dense_model, windows, batch_size=4, gram=True, layout=layout)
    inputs = AllocationInputs(layout, {n: m.weight.detach() for n, m in dense_model.named_modules()
                                       if n in layout.numels}, stats)
    allocations = {"uniform": allocate("uniform", inputs, args.target)}
    allocations |= {f"depth ramp β={b}": allocate("depth_ramp", inputs, args.target, beta=b) for b in args.ramp_betas}
    for path in args.plans:
        plan = AllocationPlan.load(path)
        allocations[f"plan {Path(path).name}"] = plan.expand(layout.linears)
    rows = []
    for label, ratios in allocations.items():
        plan = AllocationPlan(sparsity=ratios, metric=MetricChoice("sparsegpt"))
        for mode in ("independent", "sequential"):
            model = copy.deepcopy(dense_model)
            with Timer() as t_prune:
                if mode == "independent":
                    prune_(model, plan, stats, layout=layout)
                else:
                    prune_sequential_(model, plan, windows, batch_size=4, layout=layout)
            ppl = {k: perplexity(model, s, EVAL_SEQ_LEN, args.eval_windows) for k, s in streams.items()}
            rows.append({"allocation": label, "compression": mode, **{k: round(v, 2) for k, v in ppl.items()},
                         "compress s": round(t_prune.seconds, 1)})
            print(rows[-1], flush=True)
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    table = pd.DataFrame(rows)
    ratios = []
    for label in allocations:
        ind = table[(table.allocation == label) & (table.compression == "independent")].iloc[0]
        seq = table[(table.allocation == label) & (table.compression == "sequential")].iloc[0]
        ratios.append({"allocation": label, **{f"{k} seq/ind": round(seq[k] / ind[k], 3) for k in streams}})
    text = ["# Independent vs sequential SparseGPT (benchmarks/sequential_sparsegpt.py)", "",
            f"Machine: {machine()}. SmolLM2-135M-Instruct (embedded GGUF, fp32), SparseGPT at "
            f"{args.target:.0%} mean sparsity. Calibration: {args.calib_samples}×256 tokens from the first 70% "
            f"of WikiText-2 valid (seed 0; statistics {t_stats.seconds:.0f} s); held-out: WikiText-2 test and the "
            f"built-in Python-docs text, {args.eval_windows}×512 each. *independent*: every Linear from the dense "
            "model's inputs (what a level database stores and a study scores); *sequential*: block by block on "
            "the compressed blocks' outputs (`apply --sequential`).", "",
            markdown_table(table), "", "Sequential / independent perplexity:", "",
            markdown_table(pd.DataFrame(ratios)), ""]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
