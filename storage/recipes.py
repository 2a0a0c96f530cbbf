"""An AllocationPlan as an *llm-compressor-style* recipe (YAML).

The recipe has the shape of an llm-compressor one-shot sparsity stage::

    sparsity_stage:
      run_type: oneshot
      sparsity_modifiers:
        WandaPruningModifier:            # SparseGPTModifier for metric sparsegpt
          sparsity: {model.layers.0.self_attn.q_proj: 0.55, ...}
          mask_structure: "0:0"          # or "2:4" / "4:8"
          targets: [model.layers.0.self_attn.q_proj, ...]
          ignore: ["re:.*lm_head"]

It is *llm-compressor-style*, not a file llm-compressor loads as is: there ``sparsity`` is one
float (or one per sequential target), while here it maps every prunable Linear module's FQN (as
``named_modules()`` of the original model yields it) to its ratio, exactly the plan's per-module
sparsity after :meth:`~sparsealloc.core.plan.AllocationPlan.expand`. ``targets`` lists the same
modules. Pruning metrics other than Wanda and SparseGPT have no llm-compressor modifier; they are
written as ``WandaPruningModifier`` and the real metric is named in the header comment. KV-cache
bits and dropped blocks have no recipe field; the header comment names them and ``plan.json``
holds them.
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


def modifier_name(metric: str) -> str:
    return MODIFIERS.get(metric, DEFAULT_MODIFIER)


def mask_structure(pattern: str) -> str:
    """llm-compressor's ``mask_structure``: "0:0" for unstructured, else the N:M pattern."""
    return "0:0" if pattern == "unstructured" else pattern


def plan_recipe(plan: AllocationPlan, linear_names: Sequence[str]) -> dict[str, Any]:
    """The recipe as a dict: one sparsity stage with one modifier keyed by module FQN.

    Args:
        plan: The plan (its keys may be blocks, sub-modules or ``"*"``; they are expanded).
        linear_names: The model's prunable Linear FQNs (``ModelLayout.linears``), in order.
    """
    ratios = plan.expand(linear_names)
    modifier: dict[str, Any] = {
        "sparsity": {name: float(ratios[name]) for name in linear_names},
        "mask_structure": mask_structure(plan.pattern),
        "targets": list(linear_names),
        "ignore": ["re:.*lm_head"],
    }
    return {"sparsity_stage": {"run_type": "oneshot",
                               "sparsity_modifiers": {modifier_name(plan.metric.name): modifier}}}


def recipe_sparsity(recipe: dict[str, Any]) -> dict[str, float]:
    """Module FQN → ratio of a recipe written by :func:`plan_recipe` (its single modifier)."""
    modifiers = recipe["sparsity_stage"]["sparsity_modifiers"]
    (modifier,) = modifiers.values()
    return {str(k): float(v) for k, v in modifier["sparsity"].items()}


def _header(plan: AllocationPlan) -> str:
    lines = ["llm-compressor-style recipe written by sparsealloc (keys are module FQNs of the original model).",
             "'sparsity' maps each module to its ratio, which llm-compressor's modifiers do not accept as is;",
             "the plan itself is plan.json beside this file."]
    metric = plan.metric.name + (f" {dict(plan.metric.params)}" if plan.metric.params else "")
    lines.append(f"metric: {metric}")
    if plan.metric.name not in MODIFIERS:
        lines.append(f"(llm-compressor has no {plan.metric.name!r} modifier; written as {DEFAULT_MODIFIER})")
    quantized = {k: v for k, v in plan.kv_bits.items() if min(v["k"], v["v"]) < 16}
    if quantized:
        lines.append(f"kv_bits (not expressible here, applied at inference): {len(quantized)} attention layers "
                     "below 16 bits; see plan.json")
    if plan.dropped_layers:
        lines.append(f"dropped blocks (removed from the saved checkpoint): {', '.join(plan.dropped_layers)}")
    provenance = {k: plan.provenance[k] for k in ("study", "trial") if k in plan.provenance}
    if provenance:
        lines.append("provenance: " + ", ".join(f"{k}={v}" for k, v in provenance.items()))
    return "".join(f"# {line}\n" for line in lines)


def write_recipe(plan: AllocationPlan, linear_names: Sequence[str], path: str | Path) -> Path:
    """Write :func:`plan_recipe` as YAML with an explanatory header comment; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(plan_recipe(plan, linear_names), sort_keys=False, default_flow_style=False)
    path.write_text(_header(plan) + body, encoding="utf-8")
    return path
