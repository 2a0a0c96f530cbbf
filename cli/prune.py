"""``sparsealloc prune``: calibrate, prune by a plan (or a uniform ratio), evaluate, save."""

from __future__ import annotations

import argparse
import time

from sparsealloc.cli.common import (
    add_calibration_args,
    add_eval_args,
    add_model_args,
    calibration_source,
    check_plan_modules,
    check_sequential,
    eval_source,
    fraction,
    key_value,
    load,
    non_negative_int,
    print_result,
    prune_from_args,
)
from sparsealloc.cli.save_options import add_save_format_args, check_save_args, save_with_format
from sparsealloc.core.errors import SpecError, check_output_dir, writing


def register(sub) -> None:
    parser = sub.add_parser("prune", help="prune a model by a plan or a uniform sparsity")
    add_model_args(parser)
    parser.add_argument("--metric", default=None, help="pruning metric (default wanda)")
    parser.add_argument("--metric-arg", type=key_value, action="append", default=[], metavar="K=V",
                        help="metric parameter, repeatable (e.g. bias=true for stade)")
    parser.add_argument("--sparsity", type=fraction, default=None,
                        help="sparsity: uniform, or the target of --allocator (default 0.5)")
    parser.add_argument("--pattern", default=None, help="unstructured (default), 2:4 or 4:8")
    parser.add_argument("--plan", metavar="PLAN.json", help="AllocationPlan JSON (replaces the three above)")
    parser.add_argument("--allocator", default=None, metavar="NAME",
                        help="layerwise allocator for --sparsity (uniform, owl, alphapruning, mrp, dp, ...)")
    parser.add_argument("--allocator-arg", type=key_value, action="append", default=[], metavar="K=V",
                        help="allocator parameter, repeatable (e.g. m=5 for owl)")
    parser.add_argument("--drop-blocks", type=non_negative_int, default=0, metavar="K",
                        help="also drop the K lowest Block-Influence decoder blocks (counted in the sparsity)")
    parser.add_argument("--no-compensation", action="store_true",
                        help="with --drop-blocks: plain dropping, no Prune&Comp magnitude compensation")
    add_calibration_args(parser)
    add_eval_args(parser)
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    parser.add_argument("--save", metavar="DIR", help="write the pruned checkpoint and plan.json here")
    add_save_format_args(parser)
    parser.add_argument("--report", action="store_true", help="print the per-layer sparsity table")
    parser.set_defaults(handler=run)


def check_flags(args: argparse.Namespace) -> None:
    """Reject a bad or contradictory plan, pattern, sparsity or metric; needs no model."""
    from sparsealloc.core.plan import AllocationPlan, parse_pattern
    from sparsealloc.pruning.metrics import check_params

    _check_allocator_flags(args)
    if args.no_compensation and not args.drop_blocks:
        raise SpecError("expected --no-compensation only with --drop-blocks K, but got no --drop-blocks")
    if args.plan:
        given = [flag for flag, value in (("--sparsity", args.sparsity), ("--metric", args.metric),
                                          ("--pattern", args.pattern), ("--allocator", args.allocator),
                                          ("--drop-blocks", args.drop_blocks or None))
                 if value is not None]
        if given or args.metric_arg:
            raise SpecError(f"expected either --plan or {'/'.join(given or ['--metric-arg'])}, but got both")
        metric = AllocationPlan.load(args.plan).metric
        check_params(metric.name, dict(metric.params))
        return
    pattern = args.pattern or "unstructured"
    nm = parse_pattern(pattern)
    if nm is not None and args.sparsity is not None and abs(args.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise SpecError(
            f"pattern {pattern} means sparsity {1 - nm[0] / nm[1]}, but --sparsity {args.sparsity} was given"
        )
    check_params(args.metric or "wanda", dict(args.metric_arg))


def _check_allocator_flags(args: argparse.Namespace) -> None:
    """Reject an unknown allocator, bad allocator parameters or a contradictory pattern."""
    from sparsealloc.pruning.allocators import check_allocator

    if args.allocator is None:
        if args.allocator_arg:
            raise SpecError("expected --allocator NAME with --allocator-arg, but got no --allocator")
        return
    check_allocator(args.allocator, dict(args.allocator_arg))  # unknown name → lists valid names
    if (args.pattern or "unstructured") != "unstructured" and args.allocator != "uniform":
        raise SpecError(f"pattern {args.pattern} needs the same sparsity everywhere, but --allocator "
                        f"{args.allocator} allocates per layer; use --pattern unstructured")


def allocate_plan(args: argparse.Namespace, plan, layout, model, stats):
    """Replace the uniform ratios of ``plan`` by those of ``--allocator`` (exact budget)."""
    from sparsealloc.pruning.allocators import AllocationInputs, allocate

    if args.allocator is None:
        return plan
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight.detach() for name in layout.linears}
    target = args.sparsity if args.sparsity is not None else 0.5
    params = dict(args.allocator_arg)
    ratios = allocate(args.allocator, AllocationInputs(layout, weights, stats), target, **params)
    return plan.replace(sparsity=ratios, provenance={
        **plan.provenance, "allocator": {"name": args.allocator, "params": params, "target": target}})


def build_plan(args: argparse.Namespace, layout, model_name: str):
    """The plan from ``--plan``, or a uniform plan from ``--sparsity/--metric/--pattern``.

    The flags must have passed :func:`check_flags`.
    """
    from sparsealloc.core.plan import AllocationPlan, MetricChoice, parse_pattern

    if args.plan:
        return AllocationPlan.load(args.plan)
    pattern = args.pattern or "unstructured"
    nm = parse_pattern(pattern)
    sparsity = args.sparsity if args.sparsity is not None else 0.5
    if nm is not None:
        sparsity = 1 - nm[0] / nm[1]
    metric = MetricChoice(args.metric or "wanda", dict(args.metric_arg))
    return AllocationPlan.uniform(layout.linears, sparsity, metric, pattern,
                                  model={"name": model_name, "n_layers": len(layout.blocks)})


def run(args: argparse.Namespace) -> int:
    from sparsealloc.pruning import (
        model_layout,
        perplexity,
        resolve_plan,
        sparsity_report,
        tokenize_stream,
    )

    # Validate everything that needs no model before the (slow) model load.
    check_flags(args)
    if args.save:
        check_output_dir(args.save, "--save")
    check_save_args(args, args.save)
    from sparsealloc.core.plan import AllocationPlan

    given = AllocationPlan.load(args.plan) if args.plan else None
    calib = calibration_source(args, given)
    calib_text = calib.read()
    evaluation = None if args.no_eval else eval_source(args.eval_text)
    eval_text = evaluation.read() if evaluation is not None else None
    check_sequential(args, given)
    if given is not None:
        check_plan_modules(given, args.model)  # a plan for another model fails before the model loads
    model, tokenizer, _ = load(args)
    layout = model_layout(model)
    plan = build_plan(args, layout, args.model)
    resolve_plan(plan, layout)  # fail on a bad plan before the calibration pass
    plan, report, timings = prune_from_args(
        args, model, tokenizer, layout, plan, calib, calib_text,
        adjust=lambda plan, stats: allocate_plan(args, plan, layout, model, stats))
    result = {"model": args.model, "metric": plan.metric.name, "pattern": plan.pattern,
              "requested_sparsity": round(report.requested_mean, 6),
              "achieved_sparsity": round(report.achieved_mean, 6)}
    if evaluation is not None:
        start = time.perf_counter()
        stream = tokenize_stream(tokenizer, eval_text)
        result["perplexity"] = round(perplexity(model, stream, args.eval_seq_len, args.eval_windows,
                                                args.eval_stride), 4)
        result["eval_text"] = evaluation.describe()
        timings["evaluation_s"] = time.perf_counter() - start
    if args.save:
        with writing(f"the pruned checkpoint to {args.save!r}"):
            _, saved = save_with_format(args, model, tokenizer, args.save, plan)
        result["saved"] = args.save
        result.update(saved)
    if args.report:
        print(sparsity_report(model).to_string(index=False))
    result.update({k: round(v, 2) for k, v in timings.items()})
    print_result(args, result)
    return 0
