"""Datasets of the offline lm-eval tasks in this folder, read from the JSONL files beside it.

lm-eval calls these through ``custom_dataset: !function local_data.NAME``; the files are found
relative to this module, so the tasks run from any working directory and never touch the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _jsonl(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def cloze(**_metadata):
    """``cloze.jsonl``: {context, choices, label} per line."""
    return _jsonl("cloze.jsonl")


def text(**_metadata):
    """``text.jsonl``: {text} per line."""
    return _jsonl("text.jsonl")
