"""lm-evaluation-harness on a loaded model (``sparsealloc evaluate --tasks``).

The model is handed to lm-eval as an instance (``HFLM(pretrained=model, tokenizer=...)``), so
everything :func:`~sparsealloc.pruning.model.models.load_model` reads works, the compressed-tensors
sparse-bitmask checkpoints included. Tasks are lm-eval's own or YAML files under ``include_path``
(``tests/data/lm_eval`` ships two offline tasks over local JSONL files).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsealloc.core.errors import SpecError

INSTALL_HINT = "pip install 'sparsealloc[interop]'"


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``; checked before any model loads.

    Raises:
        SpecError: lm-eval is not installed, ``include_path`` is not a folder, or a task is unknown.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SpecError(f"--tasks needs the package lm-eval: {INSTALL_HINT}") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise SpecError(f"expected --include-path to be a folder of lm-eval task YAML files, but got {include_path!r}")
    manager = TaskManager(include_path=include_path, verbosity="ERROR")
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        where = f" (nor under {include_path})" if include_path else ""
        raise SpecError(f"expected lm-eval task names, but {', '.join(map(repr, unknown))} is not one{where}; "
                        "see 'lm_eval ls tasks'")
    return manager


def run_tasks(model, tokenizer, tasks: Sequence[str], manager, batch_size: int = 8,
              limit: int | None = None, num_fewshot: int | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on lm-eval ``tasks``; returns task → {metric: value} (stderr entries dropped).

    Args:
        model: A loaded causal LM (any device).
        tokenizer: Its tokenizer.
        tasks: lm-eval task names known to ``manager``.
        manager: From :func:`task_manager`.
        batch_size: Requests per forward.
        limit: At most this many documents per task (None: all).
        num_fewshot: Few-shot examples (None: the task's default).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {key.split(",")[0]: value for key, value in metrics.items()
                     if key.split(",")[0] not in ("alias", "sample_len") and "_stderr" not in key
                     and isinstance(value, (int, float))}
    return out
