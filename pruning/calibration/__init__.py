"""Calibration data and statistics, and the selection of calibration sets beside them.

:mod:`~sparsealloc.pruning.calibration.text` reads calibration or evaluation text (a file, a
Hugging Face dataset or the built-in Python docs) and draws seeded token windows from it;
:mod:`~sparsealloc.pruning.calibration.stats` runs the dense model once over those windows and
collects every Linear's input statistics; :mod:`~sparsealloc.pruning.calibration.select` (lifecycle,
file format) and :mod:`~sparsealloc.pruning.calibration.data_selection` (the math) choose a
calibration set from a pool of candidate windows. The names below are re-exported so that
``from sparsealloc.pruning.calibration import collect_stats`` keeps working; the selection modules
are imported only where they are used.
"""

from sparsealloc.pruning.calibration.stats import collect_stats, decoder_trunk, stats_sharing
from sparsealloc.pruning.calibration.text import (
    BUILTIN_SOURCE,
    TextSource,
    builtin_text,
    calibration_windows,
    dataset_text,
    read_text_file,
    sample_windows,
    tokenize_stream,
)

__all__ = [
    "BUILTIN_SOURCE",
    "TextSource",
    "builtin_text",
    "calibration_windows",
    "collect_stats",
    "dataset_text",
    "decoder_trunk",
    "read_text_file",
    "sample_windows",
    "stats_sharing",
    "tokenize_stream",
]
