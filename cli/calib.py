"""``sparsealloc calib select``: prune a candidate pool of calibration windows to a small set;
``sparsealloc calib mix``: equal shares of windows from several texts.

Scores each candidate with a selection metric (ssp: distance to the nearest k-means prototype of the
model's own hidden states, Sorscher et al. 2022; loss: dense-model loss; random), keeps ``--n`` of
them and writes ``calib.jsonl``, which ``prune``, ``apply`` and ``study run`` take as
``--calib-windows``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from sparsealloc.cli.common import add_model_args, calibration_source, load, positive_int, print_result
from sparsealloc.core.errors import SpecError


def register(sub) -> None:
    parser = sub.add_parser("calib", help="select calibration windows (data pruning)")
    calib_sub = parser.add_subparsers(dest="calib_command", metavar="ACTION", parser_class=type(parser))
    calib_sub.required = True
    select = calib_sub.add_parser("select", help="score a candidate pool and keep N windows")
    add_model_args(select)
    source = select.add_mutually_exclusive_group()
    source.add_argument("--calib-text", metavar="FILE", help="plain text file (default: built-in text)")
    source.add_argument("--calib-dataset", metavar="NAME[:CONFIG[:SPLIT]]", help="Hugging Face dataset")
    select.add_argument("--calib-text-field", default="text", help="dataset text column (default: text)")
    select.add_argument("--n", type=positive_int, required=True, help="windows to keep")
    select.add_argument("--metric", default="ssp", help="selection metric: ssp (default), loss or random")
    select.add_argument("--keep", default="hard", choices=("hard", "easy"),
                        help="keep the highest (hard, default) or lowest (easy) scores")
    select.add_argument("--balanced", action="store_true", help="take turns over the ssp clusters")
    select.add_argument("--k", type=positive_int, default=8, help="k-means clusters for ssp (default 8)")
    select.add_argument("--layer", type=int, default=None,
                        help="block whose mean-pooled output embeds a window (default: the middle block)")
    select.add_argument("--pool", type=positive_int, default=None,
                        help="candidate windows (default 8 × N, at most what the text holds)")
    select.add_argument("--calib-seq-len", type=positive_int, default=256, help="tokens per window (default 256)")
    select.add_argument("--calib-batch-size", type=positive_int, default=4, help="windows per forward (default 4)")
    select.add_argument("--seed", type=int, default=0, help="seeds the pool, k-means and ties (default 0)")
    select.add_argument("--out", required=True, metavar="CALIB.jsonl", help="where to write the selected set")
    select.set_defaults(handler=select_command)
    mix = calib_sub.add_parser("mix", help="draw equal shares of windows from several texts (one cluster per text)")
    add_model_args(mix)
    mix.add_argument("--calib-text", nargs="+", required=True, metavar="FILE",
                     help="two or more text files, or 'builtin' for the built-in calibration text")
    mix.add_argument("--n", type=positive_int, required=True, help="windows in all, split evenly over the texts")
    mix.add_argument("--calib-seq-len", type=positive_int, default=256, help="tokens per window (default 256)")
    mix.add_argument("--seed", type=int, default=0, help="seeds each text's draw (default 0)")
    mix.add_argument("--out", required=True, metavar="CALIB.jsonl", help="where to write the set")
    mix.set_defaults(handler=mix_command)


def check_flags(args: argparse.Namespace) -> None:
    """Reject an unknown metric or contradictory flags before the model loads."""
    from sparsealloc.pruning.calibration.data_selection import SELECTION_METRICS

    SELECTION_METRICS.get(args.metric)  # lists the valid names
    if args.balanced and args.metric != "ssp":
        raise SpecError(f"expected --balanced with --metric ssp (it needs clusters), but got --metric {args.metric}")
    if args.pool is not None and args.n > args.pool:
        raise SpecError(f"expected --n ≤ --pool, but got --n {args.n} and --pool {args.pool}")
    if args.metric == "ssp" and args.pool is not None and args.k > args.pool:
        raise SpecError(f"expected --k ≤ --pool, but got --k {args.k} and --pool {args.pool}")


def select_command(args: argparse.Namespace) -> int:
    from sparsealloc.pruning.calibration.select import select_calibration_set, write_calibration_set
    from sparsealloc.pruning.calibration.text import tokenize_stream

    check_flags(args)
    source = calibration_source(args)
    text = source.read()
    start = time.perf_counter()
    model, tokenizer, _ = load(args)
    stream = tokenize_stream(tokenizer, text)
    selected = select_calibration_set(
        model, tokenizer, stream, args.n, metric=args.metric, keep=args.keep, balanced=args.balanced,
        seq_len=args.calib_seq_len, pool=args.pool, k=args.k, layer=args.layer, seed=args.seed,
        batch_size=args.calib_batch_size, info={"model": args.model, "source": source.describe()})
    path = write_calibration_set(selected, args.out)
    scores = [r["score"] for r in selected.records]
    result = {"windows": len(selected.records), "pool": selected.header["pool"], "metric": args.metric,
              "keep": args.keep, "seq_len": args.calib_seq_len, "score_min": min(scores), "score_max": max(scores)}
    if args.metric == "ssp":
        counts = Counter(r["cluster"] for r in selected.records)
        result["clusters"] = " ".join(f"{c}:{counts[c]}" for c in sorted(counts))
        result["layer"] = selected.header["layer"]
    result.update({"out": str(path), "seconds": round(time.perf_counter() - start, 2)})
    print_result(args, result)
    return 0


def mix_command(args: argparse.Namespace) -> int:
    """Write a mixed-domain calibration set: ``--n`` windows in equal shares from each ``--calib-text``.

    Each window's cluster is its text, so the evo sampler draws its stage windows in proportion to
    the texts (``study run --calib-windows``), and ``prune``/``apply`` calibrate on the same windows.
    """
    from sparsealloc.pruning.calibration.select import mix_calibration_set, write_calibration_set
    from sparsealloc.pruning.calibration.text import TextSource, tokenize_stream
    from sparsealloc.pruning.model.models import load_tokenizer, resolve_source

    if len(args.calib_text) < 2:
        raise SpecError(f"expected two or more --calib-text to mix, but got {len(args.calib_text)}")
    if args.n < len(args.calib_text):
        raise SpecError(f"expected --n of at least one window per text ({len(args.calib_text)}), but got {args.n}")
    sources = [TextSource("builtin", "calib") if t == "builtin" else TextSource("file", t) for t in args.calib_text]
    texts = [source.read() for source in sources]  # a missing file fails before the tokenizer loads
    start = time.perf_counter()
    tokenizer = load_tokenizer(resolve_source(args.model))
    streams = [(source.describe(), tokenize_stream(tokenizer, text)) for source, text in zip(sources, texts)]
    mixed = mix_calibration_set(tokenizer, streams, args.n, args.calib_seq_len, args.seed, {"model": args.model})
    path = write_calibration_set(mixed, args.out)
    counts = Counter(r["cluster"] for r in mixed.records)
    result = {"windows": len(mixed.records), "texts": len(sources), "seq_len": args.calib_seq_len,
              "clusters": " ".join(f"{c}:{counts[c]}" for c in sorted(counts)), "out": str(path),
              "seconds": round(time.perf_counter() - start, 2)}
    print_result(args, result)
    return 0
