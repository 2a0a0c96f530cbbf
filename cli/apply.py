"""``sparsealloc apply``: prune a model by a plan file and save it for evaluation elsewhere.

Writes a Hugging Face checkpoint (``--format dense`` or ``compressed-tensors`` sparse-bitmask, at
``--dtype``; see :mod:`sparsealloc.pruning.model.checkpoint_formats`) with ``plan.json`` beside it (as
``prune --save`` does) and an llm-compressor ``recipe.yaml`` that ``llmcompressor.oneshot`` runs (see
:mod:`sparsealloc.storage.recipes`), then prints the checkpoint's size next to the dense size and the
lm-evaluation-harness command for it.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from sparsealloc.cli.common import (add_calibration_args, add_model_args, calibration_source, check_plan_modules,
                                    check_sequential, load, prune_from_args)
from sparsealloc.cli.save_options import add_save_format_args, check_save_args, save_with_format
from sparsealloc.core.errors import check_output_dir, writing

LM_EVAL_TASKS = "wikitext,hellaswag,arc_easy"


def register(sub) -> None:
    parser = sub.add_parser("apply", help="prune a model by a plan; save checkpoint, plan.json and recipe.yaml")
    parser.add_argument("--plan", required=True, metavar="PLAN.json", help="AllocationPlan JSON (e.g. from export)")
    add_model_args(parser)
    parser.add_argument("--save", required=True, metavar="DIR", help="output folder for the pruned checkpoint")
    add_save_format_args(parser)
    add_calibration_args(parser)
    parser.set_defaults(handler=run)


def eval_command(directory: str | Path, dense: bool) -> str:
    """The lm-evaluation-harness command line that evaluates the checkpoint in ``directory``; for a
    checkpoint that only sparsealloc decompresses (not ``dense``), ``sparsealloc evaluate --tasks``."""
    if dense:
        return f"lm_eval --model hf --model_args {shlex.quote(f'pretrained={directory}')} --tasks {LM_EVAL_TASKS} " \
               "--batch_size 8"
    return f"sparsealloc evaluate --model {shlex.quote(str(directory))} --tasks {LM_EVAL_TASKS} --batch-size 8"


def check_plan(path: str):
    """Load ``--plan`` and check its metric and parameters; needs no model."""
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.pruning.metrics import check_params

    plan = AllocationPlan.load(path)
    check_params(plan.metric.name, dict(plan.metric.params))
    return plan


def run(args: argparse.Namespace) -> int:
    from sparsealloc.pruning import model_layout, resolve_plan
    from sparsealloc.storage.recipes import write_recipe

    # Everything that needs no model first: plan file, metric, calibration text.
    plan = check_plan(args.plan)
    check_sequential(args, plan)
    check_output_dir(args.save, "--save")
    check_save_args(args, args.save)
    calib = calibration_source(args, plan)  # the study's calibration unless flags say otherwise
    calib_text = calib.read()
    check_plan_modules(plan, args.model)  # a plan for another model fails before the model loads
    model, tokenizer, _ = load(args)
    layout = model_layout(model)
    resolve_plan(plan, layout)
    plan, report, timings = prune_from_args(args, model, tokenizer, layout, plan, calib, calib_text)
    save = Path(args.save)
    with writing(f"the pruned checkpoint to {args.save!r}"):
        _, saved = save_with_format(args, model, tokenizer, save, plan)
        recipe = write_recipe(plan, layout.linears, save / "recipe.yaml")
    dense = args.format == "dense"
    command = eval_command(save.resolve(), dense)
    result = {"model": args.model, "plan": args.plan, "metric": plan.metric.name, "pattern": plan.pattern,
              "requested_sparsity": round(report.requested_mean, 6),
              "achieved_sparsity": round(report.achieved_mean, 6),
              "saved": str(save), **saved, "plan_json": str(save / "plan.json"), "recipe": str(recipe)}
    quantized = sum(1 for bits in plan.kv_bits.values() if min(bits["k"], bits["v"]) < 16)
    if quantized:
        result["kv_bits"] = f"{quantized} attention layers below 16 bits: kept in plan.json, not in the weights"
    result.update({k: round(v, 2) for k, v in timings.items()})
    for key, value in result.items():
        print(f"{key}: {value}")
    if dense:
        print("# evaluate the checkpoint with lm-evaluation-harness:")
    else:  # transformers 5 / compressed-tensors >= 0.15 no longer decompress sparse-bitmask
        print("# evaluate with lm-evaluation-harness through sparsealloc (it decompresses the bitmasks):")
    print(command)
    if args.log_format == "json":
        print(json.dumps({**result, "lm_eval": command}))
    return 0
