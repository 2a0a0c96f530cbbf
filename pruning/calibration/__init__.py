"""Calibration data and statistics, and the selection of calibration sets beside them.

:mod:`~sparsealloc.pruning.calibration.text` reads calibration or evaluation text (a file, a
Hugging Face dataset or the built-in Python docs) and draws seeded token windows from it;
:mod:`~sparsealloc.pruning.calibration.stats` runs the dense model once over those windows and
collects every Linear's input statistics; :mod:`~sparsealloc.pruning.calibration.select` (lifecycle,
file format) and :mod:`~sparsealloc.pruning.calibration.data_selection` (the math) choose a
calibration set from a pool of candidate windows. Import from the submodules
(the package's public entry points are re-exported once, by :mod:`sparsealloc.pruning`).
"""
