"""``--format`` and ``--dtype`` of the commands that save a checkpoint (``prune --save``, ``apply``)."""

from __future__ import annotations

import argparse

from sparsealloc.core.errors import SpecError

MIB = 1024 * 1024


def add_save_format_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--format dense|compressed-tensors`` and ``--dtype fp32|bf16|fp16``."""
    from sparsealloc.pruning.model.checkpoint_formats import DTYPES, FORMATS

    group = parser.add_argument_group("checkpoint")
    group.add_argument("--format", choices=FORMATS, default="dense",
                       help="dense safetensors (default) or compressed-tensors sparse-bitmask")
    group.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                       help="dtype of the saved tensors (default: the model's, fp32)")


def check_save_args(args: argparse.Namespace, save: str | None) -> None:
    """Reject ``--format``/``--dtype`` without a folder to save to, or a format whose package is
    missing; needs no model."""
    from sparsealloc.pruning.model.checkpoint_formats import check_format

    if save is None and (args.format != "dense" or args.dtype is not None):
        raise SpecError("expected --format/--dtype only with --save DIR, but got no --save")
    check_format(args.format)


def save_with_format(args: argparse.Namespace, model, tokenizer, directory, plan):
    """Save by ``--format``/``--dtype``; returns (CheckpointInfo, result fields to print)."""
    from sparsealloc.pruning.model.checkpoint_formats import DTYPES, save_checkpoint

    info = save_checkpoint(model, tokenizer, directory, plan, format=args.format,
                           dtype=DTYPES[args.dtype] if args.dtype else None)
    ratio = info.bytes_on_disk / max(info.dense_bytes, 1)
    fields = {"format": info.format + (" (sparse-bitmask)" if info.format == "compressed-tensors" else ""),
              "dtype": info.dtype,
              "size_on_disk": f"{info.bytes_on_disk / MIB:.2f} MiB (dense {info.dtype}: "
                              f"{info.dense_bytes / MIB:.2f} MiB, {ratio:.3f}x)"}
    if info.format == "compressed-tensors":
        fields["compressed_modules"] = len(info.compressed)
        fields["load_with"] = ("sparsealloc (--model DIR, pruning.load_model): transformers 5 does not "
                               "decompress sparse-bitmask")
    return info, fields
