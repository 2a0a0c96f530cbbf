"""``sparsealloc generate``: try a compressed model — prune by a plan, generate through the real
quantized KV cache of the plan's per-layer bits, print the text, tokens/s and the cache's bytes.

The cache (:mod:`sparsealloc.pruning.kv.cache`) stores packed low-bit codes plus fp16 scales and
zeros; its measured bytes are printed beside the analytic count
(:func:`sparsealloc.objectives.kv_memory.kv_cache_bytes`) and the bytes an fp16 cache would hold.
"""

from __future__ import annotations

import argparse

from sparsealloc.cli.common import (add_calibration_args, add_model_args, calibration_source, load, positive_int,
                                    print_result, prune_from_args)
from sparsealloc.core.errors import SpecError

DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL = 32, 0


def register(sub) -> None:
    parser = sub.add_parser("generate", help="generate text with a pruned model and its quantized KV cache")
    add_model_args(parser)
    parser.add_argument("--plan", metavar="PLAN.json", help="AllocationPlan JSON: sparsity and per-layer KV bits")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's; 1 is often fastest on a busy machine)")
    kv = parser.add_argument_group("KV cache")
    kv.add_argument("--kv-bits", type=kv_bits_arg, default=None, metavar="BITS[,V_BITS]",
                    help="the same bits for every layer (e.g. 4 or 2,4), replacing the plan's")
    kv.add_argument("--kv-group-size", type=positive_int, default=None,
                    help=f"quantization group size (default: the plan's study, else {DEFAULT_GROUP_SIZE})")
    kv.add_argument("--kv-residual", type=non_negative_int, default=None,
                    help=f"full-precision window of recent tokens (default: the plan's study, else {DEFAULT_RESIDUAL})")
    add_calibration_args(parser)
    parser.set_defaults(handler=run)


def kv_bits_arg(text: str) -> tuple[int, int]:
    """``"4"`` → (4, 4); ``"2,4"`` → (2, 4); bits in {2, 3, 4, 8, 16}."""
    from sparsealloc.core.plan import KV_BIT_CHOICES

    parts = text.split(",")
    try:
        bits = tuple(int(p) for p in parts)
    except ValueError:
        bits = ()
    if len(bits) not in (1, 2) or any(b not in KV_BIT_CHOICES for b in bits):
        raise argparse.ArgumentTypeError(f"expected BITS or K_BITS,V_BITS with bits in {list(KV_BIT_CHOICES)}, but got {text!r}")
    return (bits[0], bits[-1])


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, but got {text!r}")
    return value


def kv_settings(args: argparse.Namespace, plan) -> tuple[int, int]:
    """(group size, residual): the flags, else what the plan's study used, else the defaults."""
    recorded = plan.provenance.get("kv", {}) if plan is not None else {}
    group = args.kv_group_size or int(recorded.get("group_size", DEFAULT_GROUP_SIZE))
    residual = args.kv_residual if args.kv_residual is not None else int(recorded.get("residual", DEFAULT_RESIDUAL))
    return group, residual


def run(args: argparse.Namespace) -> int:
    from sparsealloc.cli.apply import check_plan
    from sparsealloc.objectives.kv_memory import kv_cache_bytes, kv_geometry
    from sparsealloc.pruning import model_layout, resolve_plan
    from sparsealloc.pruning.kv.cache import packed_cache
    from sparsealloc.pruning.kv.generation import generate_text

    # Everything that needs no model first: prompt, plan, calibration text (only if the plan prunes).
    if not args.prompt:
        raise SpecError("expected a non-empty --prompt, but got ''")
    plan = check_plan(args.plan) if args.plan else None
    prunes = plan is not None and (any(r > 0 for r in plan.sparsity.values()) or bool(plan.dropped_layers))
    calib = calib_text = None
    if prunes:
        calib = calibration_source(args, plan)
        calib_text = calib.read()
    group, residual = kv_settings(args, plan)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load(args)
    layout = model_layout(model)
    kv_bits = dict(plan.kv_bits) if plan is not None else {}
    if args.kv_bits is not None:
        kv_bits = {name: {"k": args.kv_bits[0], "v": args.kv_bits[1]} for name in layout.attention}
    dropped = tuple(plan.dropped_layers) if plan is not None else ()
    cache = packed_cache(layout, kv_bits, group, residual, dropped)  # unknown attention names fail here
    result = {"model": args.model}
    if plan is not None:
        resolve_plan(plan, layout)
        result["plan"] = args.plan
    if prunes:
        plan, report, _ = prune_from_args(args, model, tokenizer, layout, plan, calib, calib_text)
        result["achieved_sparsity"] = round(report.achieved_mean, 6)
    generation = generate_text(model, tokenizer, args.prompt, cache, args.max_new_tokens, args.do_sample,
                               args.temperature, args.top_p, args.seed, args.ignore_eos)
    attention = [name for name in layout.attention if not name.startswith(tuple(f"{d}." for d in dropped))]
    heads, head_dim = kv_geometry(model.config)
    tokens = cache.get_seq_length()
    measured = cache.nbytes()
    analytic = kv_cache_bytes(attention, kv_bits, heads, head_dim, tokens, group, residual)
    fp16 = kv_cache_bytes(attention, {}, heads, head_dim, tokens)
    bits = [b for name in attention for b in (kv_bits.get(name, {"k": 16, "v": 16}).values())]
    result.update({
        "prompt_tokens": generation.prompt_tokens, "new_tokens": generation.new_tokens,
        "decoding": "sampled" if args.do_sample else "greedy", "seconds": round(generation.seconds, 3),
        "tokens_per_s": round(generation.tokens_per_second, 2),
        "kv_mean_bits": round(sum(bits) / len(bits), 3), "kv_group_size": group, "kv_residual": residual,
        "cache_tokens": tokens, "cache_bytes": measured, "cache_bytes_analytic": analytic,
        "cache_bytes_fp16": fp16, "cache_vs_fp16": round(measured / fp16, 4) if fp16 else None,
    })
    print(generation.full_text)
    print("---")
    print_result(args, result, text=generation.text)
    return 0
