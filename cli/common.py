"""Options shared by several commands: model, device, calibration and evaluation text."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sparsealloc.core.errors import SpecError

DEFAULT_MODEL = "smollm2-135m"


def _checked(cast, accept, expected: str):
    """An argparse ``type``: ``cast`` the text, keep it where ``accept(value)``, else say what was expected."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, but got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, but got {value}")
        return value
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def key_value(text: str) -> tuple[str, Any]:
    """Parse ``k=v``; v as int, float, true/false or string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, but got {text!r}")
    key, _, raw = text.partition("=")
    value: Any = raw
    for cast in (int, float):
        try:
            value = cast(raw)
            break
        except ValueError:
            continue
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    return key.strip(), value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, local directory, .gguf file or {DEFAULT_MODEL!r} (default)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--calib-text", metavar="FILE", help="plain text file")
    source.add_argument("--calib-dataset", metavar="NAME[:CONFIG[:SPLIT]]", help="Hugging Face dataset")
    source.add_argument("--calib-windows", metavar="CALIB.jsonl",
                        help="windows from 'sparsealloc calib select' (replaces text, samples, seq-len, seed)")
    group.add_argument("--calib-text-field", default="text", help="dataset text column (default: text)")
    group.add_argument("--calib-samples", type=positive_int, default=None,
                       help="windows (default: the plan's calibration, else 16)")
    group.add_argument("--calib-seq-len", type=positive_int, default=None,
                       help="tokens per window (default: the plan's calibration, else 256)")
    group.add_argument("--calib-batch-size", type=positive_int, default=None,
                       help="windows per forward (default: the plan's calibration, else 4)")
    group.add_argument("--seed", type=int, default=None, help="window sampling seed (default: the plan's, else 0)")
    group.add_argument("--sequential", action="store_true",
                       help="compress block by block on the inputs of the already-compressed blocks (SparseGPT's "
                            "order; one calibration pass per block) instead of each Linear from the dense model's "
                            "inputs as a study's level database does: a different model than the study scored")


#: Calibration when neither the flags nor the plan say otherwise.
CALIBRATION_DEFAULTS = {"calib_samples": 16, "calib_seq_len": 256, "calib_batch_size": 4, "seed": 0}
#: Plan provenance key → flag destination.
RECORDED_CALIBRATION = {"samples": "calib_samples", "seq_len": "calib_seq_len", "batch_size": "calib_batch_size",
                        "seed": "seed"}


def add_eval_args(parser: argparse.ArgumentParser, required: bool = False, prefix: str = "eval-") -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument(f"--{prefix}text", metavar="FILE", required=required,
                       help="text file for perplexity (default: built-in held-out text)")
    group.add_argument(f"--{prefix}seq-len", type=positive_int, default=512, help="window length (default 512)")
    group.add_argument(f"--{prefix}windows", type=positive_int, default=20, help="number of windows (default 20)")
    group.add_argument(f"--{prefix}stride", type=positive_int, default=None,
                       help="step between windows (default: seq-len, no overlap)")


def calibration_source(args: argparse.Namespace, plan=None):
    """A TextSource, or the CalibrationSet of ``--calib-windows`` (read and checked before the model loads).

    Without calibration flags, a plan made by a study brings the study's calibration (text, windows,
    window length, seed, batch size; recorded in its provenance), so the model applied is the one
    the study scored; flags given override it, and what is still unset takes
    :data:`CALIBRATION_DEFAULTS`. Fills those values into ``args``.
    """
    from sparsealloc.pruning.calibration.text import TextSource

    recorded = dict((plan.provenance.get("calibration") or {}) if plan is not None else {})
    builtin = "calib"
    several = None  # a study's calibration.domains: several files read as one text
    if recorded.get("source") and not (getattr(args, "calib_windows", None) or args.calib_text
                                       or getattr(args, "calib_dataset", None)):
        source = str(recorded["source"])
        if source.startswith("windows:"):
            args.calib_windows = source[len("windows:"):]
        else:
            parsed = TextSource.parse(source)
            if parsed.kind == "file":
                args.calib_text = parsed.location
            elif parsed.kind == "files":
                several = parsed
            elif parsed.kind == "dataset":
                args.calib_dataset = parsed.location
            else:
                builtin = parsed.location or "calib"
        for key, dest in RECORDED_CALIBRATION.items():
            if getattr(args, dest, None) is None and recorded.get(key) is not None:
                setattr(args, dest, recorded[key])
    for dest, default in CALIBRATION_DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    if getattr(args, "calib_windows", None):
        from sparsealloc.pruning.calibration.select import read_calibration_set

        return read_calibration_set(args.calib_windows)
    if several is not None:
        return several
    return TextSource.of(args.calib_text, getattr(args, "calib_dataset", None), args.calib_text_field, builtin)


def eval_source(path: str | None):
    from sparsealloc.pruning.calibration.text import TextSource

    return TextSource("file", path) if path else TextSource("builtin", "eval")


def check_sequential(args: argparse.Namespace, plan) -> None:
    """``--sequential`` compresses the plan's blocks in order; a plan that drops blocks (Prune&Comp's
    scales fitted on the dense model) or ``--drop-blocks`` cannot go with it."""
    if getattr(args, "sequential", False) and (plan is not None and plan.dropped_layers
                                               or getattr(args, "drop_blocks", 0)):
        raise SpecError("expected a plan without dropped blocks for --sequential, but it drops blocks")


def check_plan_modules(plan, model_name: str) -> None:
    """Check a plan's module names against the model's structure read from its config alone (the
    model built on the ``meta`` device: no weights read, no GGUF de-quantized), before any load.

    Where the config cannot be read this way (a hub id not in the local cache, an architecture
    transformers cannot build from a config), nothing is decided here: the same check runs again
    after the model has loaded.

    Raises:
        SpecError: the plan names a module the model lacks (or misses one), with the names.
    """
    from sparsealloc.pruning import resolve_plan
    from sparsealloc.pruning.model.models import load_layout

    try:
        layout = load_layout(model_name)
    except SpecError:
        return
    resolve_plan(plan, layout)


def load(args: argparse.Namespace):
    """Load the model named by ``--model`` on ``--device`` (checked by ``load_model`` before any weight is read)."""
    from sparsealloc.pruning.model.models import load_model

    return load_model(args.model, device=args.device)


def print_result(args: argparse.Namespace, result: dict[str, Any], **json_only: Any) -> None:
    """``key: value`` per line, then with ``--log-format json`` the result (plus ``json_only``) as one JSON line."""
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.log_format == "json":
        print(json.dumps({**result, **json_only}))


def prune_from_args(args: argparse.Namespace, model, tokenizer, layout, plan, calib, calib_text: str,
                    adjust=None):
    """Record the calibration in the plan, then :func:`~sparsealloc.pruning.pipeline.calibrate_and_prune_`
    on the windows of ``calib`` (a CalibrationSet, ``--calib-windows``) or sampled from ``calib_text``
    (``--calib-samples/--calib-seq-len/--seed``), with ``--calib-batch-size``, ``--drop-blocks``,
    ``--no-compensation`` and ``--sequential``. ``adjust(plan, stats) -> plan``: ``prune --allocator``.

    Returns:
        (plan as applied, PruneReport, {"calibration_s": ..., "prune_s": ...}).
    """
    import time

    from sparsealloc.pruning import sample_windows, tokenize_stream
    from sparsealloc.pruning.calibration.select import CalibrationSet
    from sparsealloc.pruning.pipeline import calibrate_and_prune_

    selected = isinstance(calib, CalibrationSet)  # --calib-windows: the windows are given
    plan = plan.replace(provenance={**plan.provenance, "calibration": calib.provenance() if selected else {
        "source": calib.describe(), "samples": args.calib_samples, "seq_len": args.calib_seq_len,
        "seed": args.seed, "batch_size": args.calib_batch_size}})
    start = time.perf_counter()
    if selected:
        calib.check_tokenizer(tokenizer)
        windows = calib.windows
    else:
        windows = sample_windows(tokenize_stream(tokenizer, calib_text), args.calib_samples,
                                 args.calib_seq_len, args.seed)
    sampling = time.perf_counter() - start
    plan, report, timings = calibrate_and_prune_(
        model, plan, windows, layout=layout, batch_size=args.calib_batch_size, adjust=adjust,
        drop_blocks=getattr(args, "drop_blocks", 0), compensate=not getattr(args, "no_compensation", False),
        sequential=getattr(args, "sequential", False))
    timings["calibration_s"] += sampling
    return plan, report, timings
