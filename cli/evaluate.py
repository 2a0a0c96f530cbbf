"""``sparsealloc evaluate``: perplexity of a model (dense, pruned directory, GGUF, embedded), or
lm-evaluation-harness tasks on it with ``--tasks`` (see :mod:`sparsealloc.pruning.model.lm_harness`)."""

from __future__ import annotations

import argparse
import json
import time

from sparsealloc.cli.common import add_model_args, eval_source, load, positive_int


def register(sub) -> None:
    parser = sub.add_parser("evaluate", help="perplexity of a model on a text file, or lm-eval tasks")
    add_model_args(parser)
    parser.add_argument("--text", metavar="FILE", help="text file (default: built-in held-out text)")
    parser.add_argument("--seq-len", type=positive_int, default=512)
    parser.add_argument("--windows", type=positive_int, default=20)
    parser.add_argument("--stride", type=positive_int, default=None)
    parser.add_argument("--report", action="store_true", help="also print the per-layer sparsity table")
    harness = parser.add_argument_group("lm-evaluation-harness (replaces the perplexity run)")
    harness.add_argument("--tasks", metavar="T1,T2", help="lm-eval task names, comma-separated")
    harness.add_argument("--include-path", metavar="DIR", help="folder of extra task YAML files "
                         "(e.g. tests/data/lm_eval: offline tasks over local JSONL)")
    harness.add_argument("--limit", type=positive_int, default=None, help="at most N documents per task")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    harness.add_argument("--batch-size", type=positive_int, default=8, help="lm-eval batch size (default 8)")
    parser.set_defaults(handler=run)


def run_harness(args: argparse.Namespace) -> int:
    """``--tasks``: check the task names, load the model, run lm-eval, print one line per metric."""
    from sparsealloc.core.errors import SpecError
    from sparsealloc.pruning.model.lm_harness import run_tasks, task_manager

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise SpecError(f"expected --tasks to name at least one lm-eval task, but got {args.tasks!r}")
    manager = task_manager(tasks, args.include_path)  # unknown names fail before the model loads
    model, tokenizer, _ = load(args)
    start = time.perf_counter()
    results = run_tasks(model, tokenizer, tasks, manager, batch_size=args.batch_size, limit=args.limit,
                        num_fewshot=args.num_fewshot)
    print(f"model: {args.model}")
    for task, metrics in results.items():
        for metric, value in metrics.items():
            print(f"{task} {metric}: {value:.4f}")
    print(f"lm-eval: {len(results)} tasks ({time.perf_counter() - start:.1f} s)")
    if args.log_format == "json":
        print(json.dumps({"model": args.model, "results": results}))
    return 0


def run(args: argparse.Namespace) -> int:
    from sparsealloc.pruning.calibration.text import tokenize_stream
    from sparsealloc.pruning.model.evaluation import perplexity, sparsity_report

    if args.tasks is not None:
        return run_harness(args)
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
