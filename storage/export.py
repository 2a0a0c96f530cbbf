"""Export of a study's result as AllocationPlan JSON files with provenance.

Single objective: the best trial → ``DIR/best.json``. Multi-objective: Optuna's constraint-aware
``study.best_trials`` (the Pareto set) → ``DIR/pareto/trial_NNNN.json``, with ``DIR/pareto/front.csv``:
one row per plan with its objective values, KV-cache bytes per token and mean KV bits, achieved
sparsity and validation perplexity (empty where the study was not validated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from sparsealloc.core.errors import StorageError
from sparsealloc.core.keys import ACHIEVED_SPARSITY, KV_BYTES, PLAN, SAMPLER, SPEC_HASH, VALIDATION, WARM_START
from sparsealloc.core.plan import AllocationPlan


def plan_of(study: optuna.Study, trial: FrozenTrial) -> AllocationPlan:
    """The trial's plan with provenance (study, trial, values, sampler, spec hash, validation)."""
    if PLAN not in trial.user_attrs:
        raise StorageError(f"trial {trial.number} of study {study.study_name!r} holds no plan")
    plan = AllocationPlan.from_dict(trial.user_attrs[PLAN])
    validation = study.user_attrs.get(VALIDATION) or {}
    provenance: dict[str, Any] = {
        **plan.provenance,
        "study": study.study_name,
        "trial": trial.number,
        "values": list(trial.values),
        "objectives": study.metric_names or [],
        "sampler": study.user_attrs.get(SAMPLER),
        "spec_hash": study.user_attrs.get(SPEC_HASH),
        "warm_start": trial.user_attrs.get(WARM_START),
    }
    if KV_BYTES in trial.user_attrs:
        provenance["kv_bytes_per_token"] = trial.user_attrs[KV_BYTES]
    if validation:
        provenance["validation"] = {
            "perplexity": validation.get("ppl", {}).get(str(trial.number)),
            "proxy_ppl_spearman": validation.get("spearman"),
        }
        if validation.get("by_text"):
            provenance["validation"]["perplexity_by_text"] = {
                text: ppl.get(str(trial.number)) for text, ppl in validation["by_text"].items()}
    return plan.replace(provenance=provenance)


def front_frame(study: optuna.Study, trials: list[FrozenTrial]) -> pd.DataFrame:
    """The exported plans as a table: objectives, KV bytes per token, mean KV bits, validation PPL."""
    ppl = (study.user_attrs.get(VALIDATION) or {}).get("ppl") or {}
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    rows = []
    for t in sorted(trials, key=lambda t: t.values[-1]):
        widths = [b for bits in (t.user_attrs.get(PLAN) or {}).get("kv_bits", {}).values() for b in bits.values()]
        rows.append({"trial": t.number, **dict(zip(names, t.values)), "kv_bytes_per_token": t.user_attrs.get(KV_BYTES),
                     "mean_kv_bits": sum(widths) / len(widths) if widths else 16.0,
                     "achieved_sparsity": t.user_attrs.get(ACHIEVED_SPARSITY),
                     "validation_ppl": ppl.get(str(t.number)), "warm_start": t.user_attrs.get(WARM_START)})
    return pd.DataFrame(rows)


def best_validated(study: optuna.Study) -> FrozenTrial | None:
    """The COMPLETE trial with the lowest held-out perplexity, when the study was validated."""
    ppl = (study.user_attrs.get(VALIDATION) or {}).get("ppl") or {}
    complete = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    scored = [(v, int(k)) for k, v in ppl.items() if int(k) in complete and v == v]
    return complete[min(scored)[1]] if scored else None


def best_trials(study: optuna.Study, by: str = "validation") -> list[FrozenTrial]:
    """Best trial (single objective) or the Pareto set; StorageError if nothing completed.

    Args:
        study: The study.
        by: Single objective: "validation" takes the trial with the lowest held-out perplexity when
            the study was validated (the proxy's best can overfit the calibration windows; measured in
            benchmarks/search_quality.md), else the lowest proxy; "proxy" always the lowest proxy.
    """
    if by not in ("validation", "proxy"):
        raise StorageError(f"expected the export choice 'validation' or 'proxy', but got {by!r}")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise StorageError(f"study {study.study_name!r} has no completed trial to export")
    if len(study.directions) == 1:
        validated = best_validated(study) if by == "validation" else None
        return [validated or study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.number)


def export_study(study: optuna.Study, out_dir: str | Path, pareto: bool | None = None,
                 by: str = "validation") -> list[Path]:
    """Write the study's best plan(s); returns the written paths.

    Args:
        study: The study.
        out_dir: Output folder (created).
        pareto: Write the Pareto set (default: when the study has several objectives).
        by: Which single-objective trial is best (:func:`best_trials`).
    """
    out_dir = Path(out_dir)
    multi = len(study.directions) > 1
    pareto = multi if pareto is None else pareto
    trials = best_trials(study, by)
    if pareto:
        folder = out_dir / "pareto"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("trial_*.json"):
            old.unlink()
        paths = [plan_of(study, t).save(folder / f"trial_{t.number:04d}.json") for t in trials]
        front_frame(study, trials).to_csv(folder / "front.csv", index=False)
        return paths
    if multi:
        raise StorageError(f"study {study.study_name!r} has {len(study.directions)} objectives; export it with --pareto")
    return [plan_of(study, trials[0]).save(out_dir / "best.json")]
