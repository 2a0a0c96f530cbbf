"""``sparsealloc evaluate``: perplexity of a model (dense, pruned directory, GGUF, embedded)."""

from __future__ import annotations

import argparse
import time

from sparsealloc.cli.common import add_model_args, eval_source, load, positive_int


def register(sub) -> None:
    parser = sub.add_parser("evaluate", help="perplexity of a model on a text file")
    add_model_args(parser)
    parser.add_argument("--text", metavar="FILE", help="text file (default: built-in held-out text)")
    parser.add_argument("--seq-len", type=positive_int, default=512)
    parser.add_argument("--windows", type=positive_int, default=20)
    parser.add_argument("--stride", type=positive_int, default=None)
    parser.add_argument("--report", action="store_true", help="also print the per-layer sparsity table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sparsealloc.pruning.calibration import tokenize_stream
    from sparsealloc.pruning.evaluation import perplexity, sparsity_report

    source = eval_source(args.text)
    text = source.read()  # a missing file fails before the (slow) model load
    model, tokenizer, _ = load(args)
    stream = tokenize_stream(tokenizer, text)
    start = time.perf_counter()
    ppl = perplexity(model, stream, args.seq_len, args.windows, args.stride)
    report = sparsity_report(model)
    if args.report:
        print(report.to_string(index=False))
    print(f"model: {args.model}")
    print(f"text: {source.describe()}  windows: {args.windows} x {args.seq_len}")
    print(f"sparsity (prunable linears): {report.attrs['total_sparsity']:.4f}")
    print(f"perplexity: {ppl:.3f}  ({time.perf_counter() - start:.1f} s)")
    return 0
