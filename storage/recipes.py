"""An AllocationPlan as an llm-compressor recipe (YAML) that ``llmcompressor.oneshot`` runs.

The recipe is one one-shot sparsity stage::

    sparsity_stage:
      run_type: oneshot
      sparsity_modifiers:
        WandaPruningModifier:            # SparseGPTModifier for metric sparsegpt
          sparsity: [0.55, 0.55, ...]    # one ratio per target, in module order
          mask_structure: "0:0"          # or "2:4" / "4:8"
          targets: [model.layers.0.self_attn.q_proj, ...]
          ignore: ["re:.*lm_head"]

llm-compressor's sparsity modifiers (``SparsityModifierBase``) take ``sparsity`` as one float or as a
list with one ratio per module matched by ``targets``, taken in ``named_modules()`` order. The targets
here are the model's prunable Linear FQNs in that order, so every Linear gets exactly its planned
ratio, whether the plan is per block, per projection or per Linear: ``oneshot(model, recipe=...)``
reproduces the allocation (checked with llmcompressor 0.14 in ``tests/storage/test_interop.py``).

What llm-compressor cannot express, written in the file's header comment when it applies:

* metrics other than Wanda and SparseGPT: they have no modifier and are written as
  ``WandaPruningModifier``, so llm-compressor prunes the same *amounts* with Wanda's masks;
* STADE's bias compensation, the plan's KV-cache bits and its dropped blocks (``plan.json`` holds
  them; the saved checkpoint has the blocks removed and the biases folded in).

Even for Wanda and SparseGPT the masks are llm-compressor's, not sparsealloc's: it calibrates block by
block on the already pruned blocks' outputs, with its own calibration data, and prunes ⌊C·s⌋ weights
per row where sparsealloc prunes round(R·C·s) per layer, so the achieved ratios agree within one
weight per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from sparsealloc.core.plan import AllocationPlan

#: Plan metric → llm-compressor modifier; any other metric is written as the Wanda modifier.
MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}
DEFAULT_MODIFIER = "WandaPruningModifier"
#: SparseGPTModifier settings equal to sparsealloc's SparseGPT (``pruning/sparsegpt.py``).
SPARSEGPT_SETTINGS = {"block_size": 128, "dampening_frac": 0.01}


def modifier_name(metric: str) -> str:
    """The llm-compressor modifier for plan metric ``metric``."""
    return MODIFIERS.get(metric, DEFAULT_MODIFIER)


def mask_structure(pattern: str) -> str:
    """llm-compressor's ``mask_structure``: "0:0" for unstructured, else the N:M pattern."""
    return "0:0" if pattern == "unstructured" else pattern


def plan_recipe(plan: AllocationPlan, linear_names: Sequence[str]) -> dict[str, Any]:
    """The recipe as a dict: one sparsity stage whose modifier lists one ratio per Linear.

    Args:
        plan: The plan (its keys may be blocks, sub-modules or ``"*"``; they are expanded).
        linear_names: The model's prunable Linear FQNs (``ModelLayout.linears``) in
            ``named_modules()`` order, which is the order llm-compressor pairs them with ratios.
    """
    ratios = plan.expand(linear_names)
    modifier: dict[str, Any] = {
        "sparsity": [float(ratios[name]) for name in linear_names],
        "mask_structure": mask_structure(plan.pattern),
        "targets": list(linear_names),
        "ignore": ["re:.*lm_head"],
    }
    name = modifier_name(plan.metric.name)
    if name == "SparseGPTModifier":
        modifier.update(SPARSEGPT_SETTINGS)
    return {"sparsity_stage": {"run_type": "oneshot", "sparsity_modifiers": {name: modifier}}}


def recipe_sparsity(recipe: dict[str, Any]) -> dict[str, float]:
    """Module FQN → ratio of a recipe written by :func:`plan_recipe` (its single modifier).

    Also reads the earlier, non-runnable form whose ``sparsity`` mapped FQNs to ratios.
    """
    modifiers = recipe["sparsity_stage"]["sparsity_modifiers"]
    (modifier,) = modifiers.values()
    sparsity = modifier["sparsity"]
    if isinstance(sparsity, dict):
        return {str(k): float(v) for k, v in sparsity.items()}
    return {str(k): float(v) for k, v in zip(modifier["targets"], sparsity, strict=True)}


def _block_of(name: str) -> str:
    """The block FQN of a Linear FQN: up to its first numeric part (``model.layers.3``)."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[: index + 1])


def is_per_block(plan: AllocationPlan, linear_names: Sequence[str]) -> bool:
    """Whether every decoder block's Linears share one ratio."""
    ratios = plan.expand(linear_names)
    blocks: dict[str, set[float]] = {}
    for name in linear_names:
        blocks.setdefault(_block_of(name), set()).add(ratios[name])
    return all(len(values) == 1 for values in blocks.values())


def _header(plan: AllocationPlan, linear_names: Sequence[str]) -> str:
    granularity = "per block" if is_per_block(plan, linear_names) else "per Linear"
    lines = ["llm-compressor recipe written by sparsealloc: llmcompressor.oneshot(model=..., recipe=<this file>,",
             "dataset=...) prunes each target Linear to its ratio ('sparsity' lists one ratio per target, in the",
             f"model's module order). The plan's allocation ({granularity}) is expressed exactly; the masks are",
             "llm-compressor's own (sequential calibration on its data, floor(C*s) weights per row).",
             "The plan itself is plan.json beside this file."]
    metric = plan.metric.name + (f" {dict(plan.metric.params)}" if plan.metric.params else "")
    lines.append(f"metric: {metric}")
    if plan.metric.name not in MODIFIERS:
        lines.append(f"not expressible: llm-compressor has no {plan.metric.name!r} modifier; written as "
                     f"{DEFAULT_MODIFIER} (same ratios, Wanda's masks)")
    if plan.metric.params:
        lines.append(f"not expressible: the metric parameters {dict(plan.metric.params)} (e.g. STADE's bias "
                     "compensation) have no recipe field")
    quantized = {k: v for k, v in plan.kv_bits.items() if min(v["k"], v["v"]) < 16}
    if quantized:
        lines.append(f"not expressible: kv_bits ({len(quantized)} attention layers below 16 bits, applied at "
                     "inference); see plan.json")
    if plan.dropped_layers:
        lines.append(f"not expressible: dropped blocks {', '.join(plan.dropped_layers)} (removed from the saved "
                     "checkpoint, kept and pruned by this recipe)")
    provenance = {k: plan.provenance[k] for k in ("study", "trial") if k in plan.provenance}
    if provenance:
        lines.append("provenance: " + ", ".join(f"{k}={v}" for k, v in provenance.items()))
    return "".join(f"# {line}\n" for line in lines)


def write_recipe(plan: AllocationPlan, linear_names: Sequence[str], path: str | Path) -> Path:
    """Write :func:`plan_recipe` as YAML with an explanatory header comment; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(plan_recipe(plan, linear_names), sort_keys=False, default_flow_style=False)
    path.write_text(_header(plan, linear_names) + body, encoding="utf-8")
    return path
