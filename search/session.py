"""Wiring a study from its spec: worker context, store, sampler, warm starts, validation.

This is lifecycle code; the math lives in spaces/, pruning/ and objectives/.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sparsealloc.core.errors import SpecError, StorageError
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.core.keys import PLAN, SAMPLER, SPEC_ATTR, SPEC_HASH, VALIDATION, WARM_START, WARM_START_GRID
from sparsealloc.core.progress import track
from sparsealloc.objectives.context import EvalContext
from sparsealloc.objectives.trial import TrialEvaluator
from sparsealloc.pruning.allocators import AllocationInputs, allocate
from sparsealloc.pruning.calibration.select import read_calibration_set
from sparsealloc.pruning.calibration.text import (DOMAIN_SEPARATOR, TextSource, disjoint_starts, domain_starts,
                                                  sample_windows, tokenize_stream, window_starts, windows_at)
from sparsealloc.pruning.calibration.text import window_domains as text_window_domains
from sparsealloc.pruning.metrics import check_params, metric_traits
from sparsealloc.pruning.model.evaluation import perplexity
from sparsealloc.pruning.model.models import load_model, resolve_device, resolve_source
from sparsealloc.search.pruners import make_pruner
from sparsealloc.search.samplers.base import SAMPLERS, Sampler
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import StudySpec
from sparsealloc.storage.optuna_adapter import experimental_api
from sparsealloc.storage.rdb import create_or_load_study, load_study, study_names


def calibration_source(spec: StudySpec) -> TextSource:
    return TextSource.of(spec.calibration.text, spec.calibration.dataset, domains=spec.calibration.domains)


def validation_source(spec: StudySpec) -> TextSource:
    return TextSource("file", spec.validation.text) if spec.validation.text else TextSource("builtin", "eval")


def validation_sources(spec: StudySpec) -> list[TextSource]:
    """Every held-out text of validation: :func:`validation_source`, then ``validation.extra_texts``."""
    return [validation_source(spec), *(TextSource("file", path) for path in spec.validation.extra_texts)]


def geometric_mean(values: Sequence[float]) -> float:
    """exp(mean log): the validation perplexity of a plan over several texts (``validation.extra_texts``)."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if all(v > 0 for v in values) else math.nan


def build_evaluator(spec: StudySpec, model=None, tokenizer=None, windows=None, score_windows=None,
                    window_domains=None) -> TrialEvaluator:
    """Load the model (unless given), draw (or read) the calibration windows, build the worker context.

    Args:
        spec: The study spec.
        model: The dense model (default: loaded from ``spec.model``).
        tokenizer: Its tokenizer.
        windows: Calibration token ids already drawn (Ray workers get the driver's), else drawn here.
        score_windows: The held-out windows trials are scored on (``calibration.score_samples``)
            already drawn, with ``windows``; else drawn here when the spec asks for them.
        window_domains: The domain of each scored window (``calibration.domains``), with
            ``windows``; else found here.
    """
    selected = None
    if windows is None and spec.calibration.windows_file:
        selected = read_calibration_set(spec.calibration.windows_file)
    source = calibration_source(spec)
    parts = None if selected is not None or windows is not None else source.parts()
    if model is None:
        model, tokenizer, _ = load_model(spec.model, device=spec.device)
    c = spec.calibration
    if selected:
        selected.check_tokenizer(tokenizer)
        windows = selected.windows
        window_domains = selected.clusters
    elif windows is None:
        stream = tokenize_stream(tokenizer, DOMAIN_SEPARATOR.join(parts))
        windows = sample_windows(stream, c.samples, c.seq_len, c.seed)  # checks the sizes first
        scored_starts = taken = window_starts(stream.numel(), c.samples, c.seq_len, c.seed)
        if c.score_samples:
            scored_starts = disjoint_starts(stream.numel(), c.score_samples, c.seq_len, taken, c.seed)
            score_windows = windows_at(stream, scored_starts, c.seq_len)
        if c.domains:  # the file holding each scored window's middle token
            window_domains = text_window_domains(scored_starts, c.seq_len, domain_starts(tokenizer, parts))
    else:
        if c.score_samples and score_windows is None:
            raise ValueError(f"calibration.score_samples is {c.score_samples}: expected the held-out score_windows "
                             "with the given windows, but got none")
        if c.domains and window_domains is None:
            raise ValueError("calibration.domains is set: expected the domain of each scored window "
                             "with the given windows, but got none")
    if c.domain_weights is not None and window_domains is None:
        raise SpecError("calibration.domain_weights needs domains: expected calibration.domains or a windows_file "
                        "whose windows all have a cluster, but the windows have none")
    layer_grams = spec.early_stopping.uses_gram_rung or "layer_local" in spec.objectives
    gram = "metric" not in spec.space and metric_traits(spec.metric.name).gram == "required"  # SparseGPT
    ctx = EvalContext.build(model, windows, spec.calibration.batch_size, model_info={"name": spec.model},
                            tokenizer=tokenizer, layer_grams=layer_grams, lazy_pristine=True, gram=gram,
                            score_windows=score_windows, window_domains=window_domains,
                            domain_weights=c.domain_weights)
    return TrialEvaluator(ctx, spec)


def preflight(spec: StudySpec, validate: bool = True) -> None:
    """Check what a study needs from outside before anything is loaded or written.

    The model's files (not its weights), the device, the metric and its parameters, and the
    calibration and validation files. So a typo fails in a second, before the model is loaded and
    before the store is touched.

    Raises:
        SpecError: saying what was expected and what was received.
    """
    resolve_source(spec.model)
    resolve_device(spec.device)
    check_params(spec.metric.name, dict(spec.metric.params))
    if spec.calibration.windows_file:
        read_calibration_set(spec.calibration.windows_file)
    elif spec.calibration.text or spec.calibration.domains:
        calibration_source(spec).read()
    if validate and spec.validation.top_k > 0:
        for source in validation_sources(spec):
            if source.kind == "file":
                source.read()
    for path in spec.seed_plans:
        AllocationPlan.load(path)


def open_sampler(spec: StudySpec, storage: optuna.storages.BaseStorage, space: SearchSpace) -> Sampler:
    """Create or load the study ``spec.name`` with the spec's sampler; record the spec in it."""
    cls = SAMPLERS.get(spec.sampler)
    directions = ["minimize"] * len(spec.objectives)
    optuna_sampler = cls.make_optuna_sampler(len(directions), spec.seed, spec.population_size)
    study = create_or_load_study(storage, spec.name, directions, sampler=optuna_sampler,
                                 pruner=make_pruner(spec.early_stopping))
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        study.set_user_attr(SPEC_HASH, spec.spec_hash())
        study.set_user_attr(SAMPLER, spec.sampler)
        with experimental_api():  # the dashboard shows the names
            study.set_metric_names(list(spec.objectives))
    else:
        check_same_spec(spec, stored)
    return cls(study, space)


def check_same_spec(spec: StudySpec, stored: Mapping[str, Any]) -> None:
    """SpecError unless ``stored`` (a study's recorded spec) has ``spec``'s hash."""
    if StudySpec.from_stored(stored).spec_hash() != spec.spec_hash():
        raise SpecError(f"study {spec.name!r} exists with a different spec "
                        f"({spec_difference(StudySpec.from_stored(stored), spec)}); "
                        f"resume it with 'sparsealloc study resume' or choose another --name")


def check_existing_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> None:
    """Before any model is loaded: a study of this name stored with another spec is an error."""
    if spec.name in study_names(storage):
        stored = load_study(storage, spec.name).user_attrs.get(SPEC_ATTR)
        if stored is not None:
            check_same_spec(spec, stored)


def spec_difference(stored: StudySpec, given: StudySpec, limit: int = 4) -> str:
    """``"key: stored X, given Y; ..."`` over the fields that enter the spec hash."""

    def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, Mapping) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    skip = ("name", "trials", "timeout", "device", "validation")
    a = flat({k: v for k, v in stored.to_dict().items() if k not in skip})
    b = flat({k: v for k, v in given.to_dict().items() if k not in skip})
    diffs = [f"{k}: stored {a.get(k)!r}, given {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more if diffs else f"hash {stored.spec_hash()} vs {given.spec_hash()}"


def stored_spec(storage: optuna.storages.BaseStorage, name: str) -> StudySpec:
    """The spec a study was started with."""
    study = load_study(storage, name)
    data = study.user_attrs.get(SPEC_ATTR)
    if data is None:
        raise StorageError(f"study {name!r} was not created by sparsealloc (no spec stored)")
    return StudySpec.from_stored(data)


#: Parameter grids of the parametric hand rules (ATP's β, OWL's λ at M=5, AlphaPruning's ε): each
#: warm start is the grid point with the lowest proxy (:func:`screen_grid`).
WARM_START_GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "depth_ramp": ("beta", (0.002, 0.004, 0.006, 0.008, 0.010, 0.012, 0.014)),
    "owl": ("lam", (0.04, 0.08, 0.12, 0.16)),
    "alphapruning": ("epsilon", (0.1, 0.2, 0.3, 0.4)),
}
#: Calibration windows the grid screening scores each point on.
SCREEN_WINDOWS = 4


def screen_grid(evaluator: TrialEvaluator, name: str) -> tuple[dict[str, Any], dict[str, float]]:
    """The best point of allocator ``name``'s grid by the study's proxy (few windows), and its parameters.

    Returns:
        (parameter values in the space, {grid parameter: value, "proxy": value}).
    """
    space, spec, ctx = evaluator.space, evaluator.spec, evaluator.ctx
    inputs = AllocationInputs(ctx.layout, ctx.weights(), ctx.stats)
    key, grid = WARM_START_GRIDS[name]
    windows = tuple(range(min(SCREEN_WINDOWS, len(ctx.scored))))
    best: tuple[float, dict[str, Any], dict[str, float]] | None = None
    for point in track(grid, desc=f"warm start {name}", total=len(grid), unit="point"):
        try:
            values = space.encode_sparsity(allocate(name, inputs, spec.target_sparsity, **{key: point}))
        except SpecError:
            continue  # this point does not fit the ratio window
        outcome = evaluator(values, windows=windows)
        if outcome.state == "complete" and (best is None or outcome.values[0] < best[0]):
            best = (outcome.values[0], values, {key: point, "proxy": outcome.values[0]})
    if best is None:
        return space.encode_sparsity(allocate(name, inputs, spec.target_sparsity)), {}
    return best[1], best[2]


def warm_start_values(evaluator: TrialEvaluator, names: tuple[str, ...],
                      screened: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, Any]]:
    """Parameter values of the hand-made allocations (uniform, OWL, depth ramp...) in this space.

    In a space with KV bits, "uniform" stands for the uniform allocation at every uniform
    bit-width (16, then ``uniform-kv8``, ``uniform-kv4``...), so NSGA-III starts from the whole
    uniform KV front. A rule with a parameter grid (:data:`WARM_START_GRIDS`) contributes its best
    grid point by the proxy, so every sampler starts from the best hand rule; ``screened`` receives
    the chosen parameters.
    """
    space, spec, ctx = evaluator.space, evaluator.spec, evaluator.ctx
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "uniform":
            out[name] = space.defaults()
            out.update(space.uniform_kv())
        elif "layerwise" in spec.space and name in WARM_START_GRIDS:
            out[name], chosen = screen_grid(evaluator, name)
            if screened is not None:
                screened[name] = chosen
        elif "layerwise" in spec.space:
            inputs = AllocationInputs(ctx.layout, ctx.weights(), ctx.stats)
            out[name] = space.encode_sparsity(allocate(name, inputs, spec.target_sparsity))
        elif "allocator" in spec.space and spec.allocator.name == name:
            out[name] = space.defaults()
    for label, path in seed_plan_labels(spec.seed_plans).items():
        out[label] = space.encode_plan(AllocationPlan.load(path))
    return out


def seed_plan_labels(paths: tuple[str, ...]) -> dict[str, str]:
    """Warm-start name of each seed plan: ``plan:<file stem>``, with its folder where stems repeat
    (``runs/kv3/best.json`` and ``runs/kv4/best.json`` → ``plan:kv3/best``, ``plan:kv4/best``)."""
    stems = [Path(p).stem for p in paths]
    out: dict[str, str] = {}
    for path, stem in zip(paths, stems):
        label = f"plan:{stem}" if stems.count(stem) == 1 else f"plan:{Path(path).parent.name}/{stem}"
        while label in out:
            label += "'"
        out[label] = path
    return out


def enqueue_warm_starts(sampler: Sampler, evaluator: TrialEvaluator) -> list[str]:
    """Queue the warm starts once (only into a study with no trials yet)."""
    if sampler.study.get_trials(deepcopy=False):
        return []
    screened: dict[str, dict[str, float]] = {}
    values = warm_start_values(evaluator, evaluator.spec.warm_start, screened)
    if screened:
        sampler.study.set_user_attr(WARM_START_GRID, screened)
    for name, v in values.items():
        sampler.enqueue(v, name)
    return list(values)


@dataclass
class ValidationResult:
    """Held-out perplexity of re-scored trials and its rank correlation with the proxy."""

    ppl: dict[int, float]  # over several texts: the geometric mean of by_text's
    proxy: dict[int, float]
    spearman: float | None
    skipped: tuple[int, ...] = ()  # chosen trials left out by the time bound
    seconds: float = 0.0
    #: Perplexity per held-out text (its source's description), when there are several texts.
    by_text: dict[str, dict[int, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {"ppl": {str(k): v for k, v in self.ppl.items()},
                "proxy": {str(k): v for k, v in self.proxy.items()}, "spearman": self.spearman,
                "skipped": list(self.skipped), "seconds": round(self.seconds, 1)}
        if self.by_text:
            data["by_text"] = {text: {str(k): v for k, v in ppl.items()} for text, ppl in self.by_text.items()}
        return data


def trials_to_validate(study: optuna.Study, top_k: int) -> list[optuna.trial.FrozenTrial]:
    """The evo sampler's latest parents first (newest first: its own choice; its trials' values come
    from different windows per generation, so the lowest ones are not the best plans), then top-k by
    the first objective (single objective) or the Pareto set, then the warm starts, lowest first
    objective first (a seed plan that continues an earlier search before the uniform start). The
    order is what a time-bounded validation keeps."""
    from sparsealloc.search.samplers.evo import recent_parents

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if PLAN in t.user_attrs]
    by_number = {t.number: t for t in done}
    chosen = [by_number[n] for n in recent_parents(study, top_k) if n in by_number]
    if len(study.directions) == 1:
        chosen += sorted(done, key=lambda t: t.values[0])[:top_k]
    else:
        chosen += list(study.best_trials)
    chosen += sorted((t for t in done if t.user_attrs.get(WARM_START)), key=lambda t: t.values[0])
    unique: dict[tuple, optuna.trial.FrozenTrial] = {}
    for t in chosen:  # an evo parent re-scored is the same plan under another number
        unique.setdefault(tuple(sorted(t.params.items())), t)
    return list(unique.values())


#: Least time bound of validation when it follows the search's duration (``validation.max_seconds`` null).
MIN_VALIDATION_SECONDS = 120.0
_clock = time.perf_counter  # (tests replace it)


def validate(study: optuna.Study, evaluator: TrialEvaluator, spec: StudySpec,
             budget_seconds: float | None = None) -> ValidationResult:
    """Re-score chosen trials by perplexity on held-out text; store the result on the study.

    Trials go in :func:`trials_to_validate`'s order; once the next one would end past ``budget_seconds`` (estimated
    from the mean time per plan so far) the rest are skipped and listed in the result. The first
    one is always validated. None: no bound. With ``validation.extra_texts`` a plan's perplexity is the
    geometric mean over the texts (:func:`geometric_mean`), each text's own kept in ``by_text``.
    """
    from scipy.stats import spearmanr

    ctx = evaluator.ctx
    streams = {source.describe(): tokenize_stream(ctx.tokenizer, source.read()) for source in validation_sources(spec)}
    by_text: dict[str, dict[int, float]] = {text: {} for text in streams}
    ppl, proxy = {}, {}
    trials = trials_to_validate(study, spec.validation.top_k)
    start, skipped = _clock(), ()
    for i, trial in enumerate(track(trials, desc="validation", total=len(trials), unit="plan")):
        elapsed = _clock() - start
        if budget_seconds is not None and i > 0 and elapsed * (i + 1) / i > budget_seconds:
            skipped = tuple(t.number for t in trials[i:])
            break
        plan = AllocationPlan.from_dict(trial.user_attrs[PLAN])
        with evaluator.applied(plan):  # pruned, dropped blocks out, KV bits fake-quantized
            for text, stream in streams.items():
                by_text[text][trial.number] = perplexity(ctx.model, stream, spec.validation.seq_len,
                                                         spec.validation.windows)
        ppl[trial.number] = geometric_mean([by_text[text][trial.number] for text in streams])
        proxy[trial.number] = trial.values[0]
    ctx.restore_()
    rho = None
    if len(ppl) >= 3:
        value = spearmanr([proxy[n] for n in ppl], [ppl[n] for n in ppl]).statistic
        rho = None if math.isnan(value) else float(value)
    result = ValidationResult(ppl, proxy, rho, skipped, _clock() - start, by_text if len(streams) > 1 else {})
    study.set_user_attr(VALIDATION, result.to_dict())
    return result


def warm_start_trials(study: optuna.Study) -> Mapping[str, optuna.trial.FrozenTrial]:
    """Completed warm-start trials by name."""
    return {t.user_attrs[WARM_START]: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get(WARM_START)}
