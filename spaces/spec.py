"""StudySpec: the declarative, validated study configuration (YAML or JSON).

Example::

    name: demo
    model: smollm2-135m
    target_sparsity: 0.7
    space: [layerwise]            # any of: layerwise, metric, kv, allocator, layer_drop
    layerwise: {granularity: block, radius: 0.3}
    metric: {name: wanda}
    kv: {bits: [2, 3, 4, 8, 16], group_size: 32, residual: 0, budget: null, budget_bytes: null}  # mean bits | bytes/token
    allocator: {name: owl}        # low-dimensional alternative to layerwise
    layer_drop: {max_blocks: 4, compensate: true}   # searched number of dropped blocks
    objectives: [hidden]          # first one is the error proxy (hidden, kl, reconstruction, layer_local)
    early_stopping: {pruner: successive_halving, reduction_factor: 3}   # multi-fidelity trials
    sampler: tpe                  # tpe, cmaes, random, nsga3, optuna-nsga3, evo
    evo: {offspring: 16, stages: [[2, 2], [8, 1]], max_swaps: 3, switch_sparsity: 0}   # sampler evo only
    trials: 40
    calibration: {text: null, samples: 16, seq_len: 256, seed: 0}
    validation: {text: null, seq_len: 512, windows: 20, top_k: 5, max_seconds: null}
    warm_start: [uniform, owl, depth_ramp]
    proxy_dtype: null             # trial forwards: float32, bfloat16, auto (null: auto for evo, else float32)

CLI flags override fields. Unknown keys, wrong types and out-of-range values raise SpecError saying
what was expected and what was received.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sparsealloc.core.errors import SpecError, read_user_file
from sparsealloc.core.plan import parse_pattern

SPACE_COMPONENTS = ("layerwise", "metric", "kv", "allocator", "layer_drop")
GRANULARITIES = ("block", "bins", "projection", "module")
SAMPLER_NAMES = ("tpe", "nsga3", "optuna-nsga3", "random", "cmaes", "evo")
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes", "evo")
OBJECTIVE_NAMES = ("reconstruction", "kl", "hidden", "layer_local", "remaining_weights", "kv_bytes")
#: Objectives that can come first (the error proxy); the forward ones report per calibration batch.
ERROR_PROXIES = ("kl", "reconstruction", "hidden", "layer_local")
FORWARD_PROXIES = ("kl", "reconstruction", "hidden")
PRUNER_NAMES = ("none", "median", "successive_halving")
ALLOCATOR_SPACES = ("owl", "depth_ramp")
WARM_STARTS = ("uniform", "owl", "depth_ramp", "alphapruning", "mrp", "dp")
#: Compute dtype of trial forwards (spec.proxy_dtype); "auto": bfloat16 where the trial device runs
#: it faster than float32, else float32 (resolved by the evaluator, ``resolve_proxy_dtype``).
PROXY_DTYPES = ("float32", "bfloat16", "float16", "auto")
#: Default ``layerwise.radius`` (each group's sparsity within target ± radius), and the evo sampler's:
#: per Linear, the evo plans of Wanda 70% pressed the first block's MLP against the lower bound of
#: ±0.3, and ±0.5 let it go to 0.25 (README, issue-18 results).
RADIUS, EVO_RADIUS = 0.3, 0.5
#: evo.guide_fit: the switch model's columns (changes from each stage's parent, or each Linear's sparsity).
GUIDE_FITS = ("changes", "sparsity")
#: Values that fields had before they existed or before their default changed, per section. A stored
#: spec lacking a key ran with this value (:meth:`StudySpec.from_stored`), and the spec hash leaves a
#: key out at this value, so studies made before keep their hash (:meth:`StudySpec.spec_hash`).
LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {"layerwise": {"level_step": 0.02},
                                               "calibration": {"score_samples": 0, "domains": [],
                                                               "domain_weights": None},
                                               "evo": {"switch_sparsity": 0.0, "merge": False, "guide": 0,
                                                       "guide_fit": "changes", "block_switch": 0.0}}


def _expect(cond: bool, what: str, got: Any) -> None:
    if not cond:
        raise SpecError(f"{what}, but got {_shown(got)}")


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened (with its length) when it is long."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_text(value: Any) -> bool:
    return value is None or (isinstance(value, str) and bool(value))


def _unknown_keys(data: Mapping[Any, Any], names: set[str]) -> list[str]:
    return sorted(str(k) for k in data if k not in names)


def _section(data: Mapping[str, Any], key: str, cls: type) -> Any:
    value = {} if data.get(key) is None else data[key]
    _expect(isinstance(value, Mapping), f"spec '{key}' must be a mapping", value)
    names = {f.name for f in fields(cls)}
    unknown = _unknown_keys(value, names)
    _expect(not unknown, f"spec '{key}' accepts keys {sorted(names)}", unknown)
    try:
        return cls(**value)
    except TypeError as exc:
        raise SpecError(f"spec '{key}': {exc}") from None


@dataclass(frozen=True)
class LayerwiseSpec:
    """Per-layer sparsity variables: granularity, window around the target, optional grid step."""

    granularity: str | None = None  # None: "module" for the evo sampler, else "block"
    bins: int = 8
    radius: float | None = None  # None: 0.5 for the evo sampler, else 0.3 (:data:`EVO_RADIUS`)
    step: float | None = None
    max_sparsity: float = 0.95
    #: Evo and weight-updating metrics: weights per level as a fraction of the mean group size (0.02
    #: before the default changed, see :data:`LEGACY_DEFAULTS`).
    level_step: float = 0.01

    def validate(self) -> None:
        _expect(self.granularity is None or self.granularity in GRANULARITIES, f"layerwise.granularity must be one of {list(GRANULARITIES)}", self.granularity)
        _expect(_is_int(self.bins) and self.bins >= 1, "layerwise.bins must be an integer >= 1", self.bins)
        _expect(_is_number(self.radius) and 0 < self.radius < 1, "layerwise.radius must be in (0, 1)", self.radius)
        _expect(self.step is None or (_is_number(self.step) and 0 < self.step <= self.radius),
                "layerwise.step must be null or in (0, radius]", self.step)
        _expect(_is_number(self.max_sparsity) and 0 < self.max_sparsity < 1,
                "layerwise.max_sparsity must be in (0, 1)", self.max_sparsity)
        _expect(_is_number(self.level_step) and 0 < self.level_step <= 1,
                "layerwise.level_step must be in (0, 1] (weights per level as a fraction of the mean group size)",
                self.level_step)


@dataclass(frozen=True)
class MetricSpec:
    """The pruning metric: fixed by name, or searched (generalized meta-metric) when in the space."""

    name: str = "wanda"
    params: Mapping[str, Any] = field(default_factory=dict)
    exponent_range: tuple[float, float] = (0.0, 2.0)

    def validate(self) -> None:
        _expect(isinstance(self.name, str) and self.name, "metric.name must be a metric name", self.name)
        _expect(isinstance(self.params, Mapping), "metric.params must be a mapping", self.params)
        lo_hi = tuple(self.exponent_range)
        _expect(len(lo_hi) == 2 and all(_is_number(x) for x in lo_hi) and 0 <= lo_hi[0] < lo_hi[1] <= 8,
                "metric.exponent_range must be [low, high] within [0, 8]", self.exponent_range)


@dataclass(frozen=True)
class KVSpec:
    """Per-layer KV-cache bit-widths for K and V (KIVI group quantization).

    ``residual`` is the full-precision window of recent tokens; 0 quantizes every token in the
    proxy (see :mod:`sparsealloc.pruning.kv.quant`).
    """

    bits: tuple[int, ...] = (2, 3, 4, 8, 16)
    group_size: int = 32
    separate_kv: bool = True
    residual: int = 0
    #: Mean bits per K/V slot every candidate meets (:mod:`sparsealloc.spaces.kv_budget`); None: free.
    budget: float | None = None
    #: KV-cache bytes per token (all layers; the ``kv_bytes`` objective's unit) every candidate
    #: meets, instead of ``budget``; None: free.
    budget_bytes: float | None = None

    def validate(self) -> None:
        bits = tuple(self.bits)
        _expect(len(bits) >= 1 and all(_is_int(b) and b in (2, 3, 4, 8, 16) for b in bits),
                "kv.bits must be a non-empty subset of [2, 3, 4, 8, 16]", self.bits)
        _expect(_is_int(self.group_size) and self.group_size >= 1, "kv.group_size must be a positive integer", self.group_size)
        _expect(_is_int(self.residual) and self.residual >= 0, "kv.residual must be an integer >= 0", self.residual)
        _expect(isinstance(self.separate_kv, bool), "kv.separate_kv must be true or false", self.separate_kv)
        if self.budget is not None:
            _expect(_is_number(self.budget) and min(bits) <= self.budget <= max(bits),
                    f"kv.budget must be null or mean bits within the ladder [{min(bits)}, {max(bits)}]", self.budget)
        if self.budget_bytes is not None:
            _expect(_is_number(self.budget_bytes) and self.budget_bytes > 0,
                    "kv.budget_bytes must be null or a positive number of bytes per token", self.budget_bytes)
            _expect(self.budget is None, "kv.budget and kv.budget_bytes are alternatives; set one of them",
                    {"budget": self.budget, "budget_bytes": self.budget_bytes})


@dataclass(frozen=True)
class AllocatorSpec:
    """Low-dimensional allocator space (OWL M/λ, depth ramp β) used instead of per-layer ratios."""

    name: str = "owl"

    def validate(self) -> None:
        _expect(self.name in ALLOCATOR_SPACES, f"allocator.name must be one of {list(ALLOCATOR_SPACES)}", self.name)


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration windows: text file (None = built-in text) or dataset, N × L tokens, seed.

    ``windows_file`` names a set from ``sparsealloc calib select`` instead; its windows replace
    text, dataset, samples, seq_len and seed.

    ``score_samples``: 0 scores trials on the ``samples`` windows the pruning statistics come from
    (Wanda's norms, SparseGPT's Hessians). n > 0 scores them on ``n`` other windows of the same text,
    disjoint from those (:func:`~sparsealloc.pruning.calibration.text.disjoint_windows`): a
    train/validation split of the calibration text, so that a search cannot prefer the Linears whose
    masks merely fit the statistics windows (the plan records only the statistics windows, which
    are all ``apply`` needs). The evo sampler's stages draw from these windows. Off by default: at
    Wanda 70% on SmolLM2, 128 such windows gave 179.4 / 103.1 WikiText-2 test / Python docs PPL
    against 158.7 / 101.5 with the default (25 minutes, seed 1, same machine), and on held-out
    windows the searched plans rank as on the statistics windows (README, issue-18 results).

    ``domains``: text files read as one calibration text (in order, a blank line between them),
    each a *domain* (e.g. prose and code); instead of ``text``. Windows are drawn from the joined
    text as from one file, and each window's domain is the file holding its middle token. The evo
    sampler's stages then draw windows in proportion to each domain's share of the pool (stratified),
    so a 2-window stage does not miss a domain by chance. A ``windows_file`` whose windows all have a
    cluster (``calib mix``, ``calib select --metric ssp``) has domains too: its clusters.

    ``domain_weights``: one relative weight per domain (``[1, 1]``: each domain counts the same),
    or null: every scored token counts the same, so the larger domain decides. With weights, a
    forward proxy (``kl``, ``hidden``, ``reconstruction``) is the weighted mean of its per-domain
    values over the domains a trial's windows hold (Williams & Aletras, 2024, on how calibration
    data's domain changes what pruning keeps; EvoPress scores one mixed set per token). Off by
    default: at Wanda 70% on SmolLM2, half WikiText-2 and half Python docs, ``[1, 1]`` gave 155.1 /
    94.2 WikiText-2 test / Python docs PPL against 148.4 / 90.9 per token (25 minutes, seed 1, same
    machine; README, issue-18 results).
    """

    text: str | None = None
    dataset: str | None = None
    samples: int = 16
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 4
    windows_file: str | None = None
    score_samples: int = 0
    domains: tuple[str, ...] = ()
    domain_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for key in ("domains", "domain_weights"):  # YAML and JSON give lists
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))

    def validate(self) -> None:
        for key in ("samples", "seq_len", "batch_size"):
            value = getattr(self, key)
            _expect(_is_int(value) and value >= 1, f"calibration.{key} must be a positive integer", value)
        _expect(_is_int(self.score_samples) and self.score_samples >= 0,
                "calibration.score_samples must be an integer >= 0 (0: score on the statistics windows)",
                self.score_samples)
        _expect(not (self.score_samples and self.windows_file),
                "calibration.score_samples draws from calibration text; expected 0 with windows_file",
                self.score_samples)
        for key in ("text", "dataset", "windows_file"):
            _expect(_optional_text(getattr(self, key)), f"calibration.{key} must be null or a non-empty string",
                    getattr(self, key))
        _expect(_is_int(self.seed), "calibration.seed must be an integer", self.seed)
        _expect(isinstance(self.domains, tuple) and all(isinstance(d, str) and d for d in self.domains)
                and len(self.domains) != 1,
                "calibration.domains must be a list of at least two text file paths (one per domain), or empty",
                self.domains)
        sources = [s for s in (self.text, self.dataset, self.windows_file, list(self.domains)) if s]
        _expect(len(sources) <= 1, "calibration takes one of text, dataset, windows_file or domains", sources)
        weights = self.domain_weights
        if weights is not None:
            _expect(isinstance(weights, tuple) and len(weights) >= 2
                    and all(_is_number(w) and 0 < w < float("inf") for w in weights),
                    "calibration.domain_weights must be null or a list of positive numbers, one per domain", weights)
            _expect(bool(self.domains) or bool(self.windows_file),
                    "calibration.domain_weights needs domains (or a windows_file with clusters)", weights)
            _expect(not self.domains or len(weights) == len(self.domains),
                    f"calibration.domain_weights must hold one weight per domain ({len(self.domains)})", weights)


@dataclass(frozen=True)
class LayerDropSpec:
    """Searched number of dropped decoder blocks (0..max_blocks), Block Influence order, Prune&Comp.

    The blocks are the first ``k`` of one iterative Block-Influence schedule computed on the
    calibration windows (ShortGPT; Prune&Comp, arXiv:2507.18212); dropped blocks count as fully
    sparse toward ``target_sparsity`` and the remaining blocks share the rest of the budget.
    """

    max_blocks: int = 4
    compensate: bool = True

    def validate(self) -> None:
        _expect(_is_int(self.max_blocks) and self.max_blocks >= 1, "layer_drop.max_blocks must be an integer >= 1",
                self.max_blocks)
        _expect(isinstance(self.compensate, bool), "layer_drop.compensate must be true or false", self.compensate)


@dataclass(frozen=True)
class EarlyStoppingSpec:
    """Multi-fidelity trials: the proxy is reported after every calibration batch and an Optuna
    pruner stops trials that fall behind.

    ``successive_halving`` (Jamieson & Talwalkar 2016; Optuna's ASHA-style SuccessiveHalvingPruner)
    keeps the best ``1/reduction_factor`` of the trials at each rung; with ``gram_rung: true`` its
    first rung is the zero-forward summed layer-local error. The Gram rung is off by default: on
    SmolLM2 the layer-local sum ranks allocations of one budget backwards (Spearman ρ −0.6 with
    perplexity, benchmarks/proxy_choice.md), and in benchmarks/trial_cost.md it stopped the best warm
    start (depth ramp) at step 1. ``median`` (Optuna's MedianPruner)
    stops a trial whose best value so far is worse than the median of the completed trials at the
    same step, after ``startup_trials`` completed trials and ``warmup_steps`` steps; because it takes
    a trial's best value over all steps, it cannot use the Gram rung, whose values have another scale.
    """

    pruner: str = "none"
    gram_rung: bool | None = None
    reduction_factor: int = 3
    startup_trials: int = 5
    warmup_steps: int = 0

    @property
    def enabled(self) -> bool:
        return self.pruner != "none"

    @property
    def uses_gram_rung(self) -> bool:
        """The zero-forward rung is on (only when asked for, with successive halving)."""
        return self.enabled and bool(self.gram_rung)

    def validate(self) -> None:
        _expect(self.pruner in PRUNER_NAMES, f"early_stopping.pruner must be one of {list(PRUNER_NAMES)}", self.pruner)
        _expect(self.gram_rung is None or isinstance(self.gram_rung, bool),
                "early_stopping.gram_rung must be true, false or null", self.gram_rung)
        _expect(_is_int(self.reduction_factor) and self.reduction_factor >= 2,
                "early_stopping.reduction_factor must be an integer >= 2", self.reduction_factor)
        for key in ("startup_trials", "warmup_steps"):
            value = getattr(self, key)
            _expect(_is_int(value) and value >= 0, f"early_stopping.{key} must be an integer >= 0", value)
        _expect(not (self.pruner == "median" and self.gram_rung),
                "early_stopping.gram_rung needs pruner successive_halving (the median pruner compares a trial's "
                "best value over all steps, and the Gram rung's values have another scale)", self.gram_rung)


@dataclass(frozen=True)
class EvoSpec:
    """The evo sampler: (1+λ) level-switch search with multi-stage selection (EvoPress).

    Every generation mutates the parent into ``offspring`` distinct children (each by 1 to
    ``max_swaps`` level swaps). ``stages`` lists ``[windows, survivors]``: in stage ``i`` the
    remaining candidates are scored on ``windows`` calibration windows drawn afresh from the pool
    (``calibration.samples``, or the windows of ``calibration.windows_file``, stratified by its
    clusters where it has them) and the best ``survivors`` go on; the last stage also re-scores the
    parent on its windows, and the best of them becomes the next parent. Sieberling et al., ICML
    2025 (arXiv:2410.14649), fast variant: 16 offspring, 1 survivor on 512 tokens, then 8,192.

    ``switch_sparsity``: 0 moves one level per switch, EvoPress's mutation. A level is a
    fixed number of weights, so one level is a large step in sparsity for a small Linear (0.18 for
    a SmolLM2 ``k_proj`` at ``level_step`` 0.04) and a small one for a large Linear (0.023 for its
    MLP). With ``switch_sparsity`` s > 0 a switch between groups ``a`` and ``b`` moves
    ``max(1, round(s · min(n_a, n_b) / weights per level))`` levels (within the bounds), so the
    smaller of the two changes its sparsity by about s; the budget stays exact. With a fine
    ``level_step`` this lets small Linears move finely and large ones fast. The defaults
    (``switch_sparsity`` 0.05 with ``layerwise.level_step`` 0.01) led one level per switch at step
    0.02 by 7–8% on both held-out texts at Wanda 70% (README, issue-18 results).

    ``merge``: when two or more offspring of the last stage beat the re-scored parent, the parent
    plus the level changes of all of them (budget-exact, as each switch is) and the best of them are
    scored on fresh windows of the last stage's size; the merged candidate is the next parent only
    if it wins there. Small switches on different Linears tend to add up, so a generation can take
    several improving mutations at once; fresh windows keep the merge from adding up the chance gains
    that made its parts win (the winner's curse). Off by default: judged on the windows that
    selected its parts, merging led for 19 of 25 minutes at Wanda 70% on SmolLM2 and then fell
    behind (165.5 against 159.0 WikiText-2 test PPL, one run; README, issue-18 results).

    ``guide``: 0 draws every child's switches uniformly (EvoPress). With ``guide`` m ≥ 2, each child
    is the best of m random switch sets under a fresh posterior draw of a model of the fitness
    linear in each group's sparsity change and its square, fitted to every stage's scores so far
    (:class:`~sparsealloc.search.samplers.switch_model.SwitchModel`; linear Thompson sampling);
    1 draws uniformly but records the model's predictions (trial attr ``evo_predicted``), to measure
    them. Children are drawn uniformly until the model has seen one generation; a resumed study
    refits it on the stored stages. m = 8 led uniform switches at every point of two runs at Wanda
    70% on SmolLM2 (WikiText-2 test 170.7 against 180.9 and Python docs 112.8 against 122.5 in 25
    minutes, seed 1; 168.9 against 196.3 and 113.7 against 129.1 in 15 minutes, seed 2), and the
    default 32 led m = 8 at every point of one run (183.7 against 217.5 and 124.0 against 131.9 in
    20 minutes on an AVX2-only CPU) and uniform switches at every point of another (160.8 against
    177.8 and 102.7 against 121.0 in 25 minutes, seed 1; README, issue-18 results).

    ``guide_fit``: the model's columns. "changes" (the default): each Linear's sparsity change from
    the parent of the stage and its square, a quadratic around each parent. "sparsity": each
    Linear's sparsity and its square, one quadratic per Linear that stages scored around earlier
    parents still fit exactly. In one run "sparsity" was 3% lower on WikiText-2 test and 15% higher
    on Python docs (178.1 and 143.1), so the default stays "changes".

    ``block_switch``: the probability that a switch is a *block switch*: every Linear of one decoder
    block switches with the Linear of the same role in another (``q_proj`` with ``q_proj``, ...), each
    pair moving as a switch does, so a whole block gives up sparsity to another in one step and the
    budget stays exact. The depth profile of a plan (its sparsity per block, what OWL and the depth
    ramp set) otherwise moves one Linear at a time. Needs one group per Linear (granularity
    ``module``); 0: none. Off by default: at Wanda 70% on SmolLM2, 0.25 made 31 of the 37 new parents
    of the first 20 generations of two 25-minute runs, but the end results tied with the defaults
    (161.5 / 99.1 against 160.8 / 102.7 with seed 1, 157.7 / 106.5 against 157.3 / 106.6 with seed 2,
    WikiText-2 test / Python docs; README, issue-18 results).
    """

    offspring: int = 16
    stages: tuple[tuple[int, int], ...] = ((2, 2), (8, 1))
    max_swaps: int = 3
    switch_sparsity: float = 0.05
    merge: bool = False
    guide: int = 32
    guide_fit: str = "changes"
    block_switch: float = 0.0

    def validate(self) -> None:
        _expect(_is_number(self.block_switch) and 0 <= self.block_switch <= 1,
                "evo.block_switch must be a probability in [0, 1]", self.block_switch)
        _expect(isinstance(self.merge, bool), "evo.merge must be true or false", self.merge)
        _expect(_is_int(self.guide) and self.guide >= 0,
                "evo.guide must be an integer >= 0 (0: uniform switches; m: best of m under the switch model)",
                self.guide)
        _expect(self.guide_fit in GUIDE_FITS, f"evo.guide_fit must be one of {list(GUIDE_FITS)}", self.guide_fit)
        _expect(_is_int(self.offspring) and self.offspring >= 1, "evo.offspring must be an integer >= 1", self.offspring)
        _expect(_is_int(self.max_swaps) and self.max_swaps >= 1, "evo.max_swaps must be an integer >= 1", self.max_swaps)
        _expect(_is_number(self.switch_sparsity) and 0 <= self.switch_sparsity < 1,
                "evo.switch_sparsity must be a number in [0, 1)", self.switch_sparsity)
        stages = self.stages
        ok = isinstance(stages, (list, tuple)) and len(stages) >= 1 and all(
            isinstance(st, (list, tuple)) and len(st) == 2 and all(_is_int(x) and x >= 1 for x in st) for st in stages)
        _expect(ok, "evo.stages must be a non-empty list of [windows, survivors] pairs of positive integers", stages)
        survivors = [st[1] for st in stages]
        _expect(survivors[-1] == 1 and all(a >= b for a, b in zip(survivors, survivors[1:])),
                "evo.stages must keep fewer or equal survivors at each stage and exactly 1 at the last", stages)


@dataclass(frozen=True)
class ValidationSpec:
    """Held-out perplexity of the top trials after a study (None text = built-in held-out text).

    ``extra_texts``: more held-out texts (files), e.g. one per calibration domain. With them a plan's
    validation perplexity is the geometric mean of its perplexity on every text (``text`` first), so a
    relative gain counts the same on each text whatever its scale; each text's own perplexity is stored
    too. The exported plan is the one with the lowest such mean.
    """

    text: str | None = None
    extra_texts: tuple[str, ...] = ()
    seq_len: int = 512
    windows: int = 20
    top_k: int = 5
    #: Time bound of validation; None: as long as the run's search took, at least 2 minutes (the
    #: best plan by the proxy is always validated).
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.extra_texts, list):  # YAML and JSON give lists
            object.__setattr__(self, "extra_texts", tuple(self.extra_texts))

    def validate(self) -> None:
        _expect(isinstance(self.extra_texts, tuple) and all(isinstance(t, str) and t for t in self.extra_texts),
                "validation.extra_texts must be a list of text file paths", self.extra_texts)
        for key in ("seq_len", "windows"):
            value = getattr(self, key)
            _expect(_is_int(value) and value >= 1, f"validation.{key} must be a positive integer", value)
        _expect(_is_int(self.top_k) and self.top_k >= 0, "validation.top_k must be an integer >= 0", self.top_k)
        _expect(_optional_text(self.text), "validation.text must be null or a non-empty string", self.text)
        _expect(self.max_seconds is None or (_is_number(self.max_seconds) and 0 < self.max_seconds < float("inf")),
                "validation.max_seconds must be null or a positive number of seconds", self.max_seconds)


@dataclass(frozen=True)
class StudySpec:
    """A whole study: model, target, space, objectives, sampler, budget, data."""

    name: str = "study"
    model: str = "smollm2-135m"
    target_sparsity: float = 0.5
    pattern: str = "unstructured"
    space: tuple[str, ...] = ("layerwise",)
    layerwise: LayerwiseSpec = field(default_factory=LayerwiseSpec)
    metric: MetricSpec = field(default_factory=MetricSpec)
    kv: KVSpec = field(default_factory=KVSpec)
    allocator: AllocatorSpec = field(default_factory=AllocatorSpec)
    layer_drop: LayerDropSpec = field(default_factory=LayerDropSpec)
    objectives: tuple[str, ...] | None = None  # None: ("kl",) for evo, else ("hidden",) (see README)
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    sampler: str = "tpe"
    evo: EvoSpec = field(default_factory=EvoSpec)
    population_size: int = 24
    trials: int = 40
    timeout: float | None = None
    seed: int = 0
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    warm_start: tuple[str, ...] = ("uniform", "owl", "depth_ramp")
    #: AllocationPlan JSON files queued as extra warm starts (e.g. budgeted optima seeding a front).
    seed_plans: tuple[str, ...] = ()
    device: str | None = None
    proxy_dtype: str | None = None  # None: "auto" for evo, else "float32" (see README)

    def __post_init__(self) -> None:
        # Defaults that depend on the sampler (measured in benchmarks/search_quality.md): the evo
        # sampler searches one level per Linear with the KL proxy; the others one ratio per block
        # with the hidden-state proxy (benchmarks/proxy_choice.md).
        evo = self.sampler == "evo"
        if self.objectives is None:
            object.__setattr__(self, "objectives", ("kl",) if evo else ("hidden",))
        if isinstance(self.layerwise, LayerwiseSpec) and self.layerwise.granularity is None:
            object.__setattr__(self, "layerwise", replace(self.layerwise, granularity="module" if evo else "block"))
        if isinstance(self.layerwise, LayerwiseSpec) and self.layerwise.radius is None:
            object.__setattr__(self, "layerwise", replace(self.layerwise, radius=EVO_RADIUS if evo else RADIUS))
        if self.proxy_dtype is None:
            object.__setattr__(self, "proxy_dtype", "auto" if evo else "float32")
        if isinstance(self.evo, EvoSpec) and isinstance(self.evo.stages, list):
            object.__setattr__(self, "evo", replace(self.evo, stages=tuple(
                tuple(st) if isinstance(st, list) else st for st in self.evo.stages)))
        self.validate()

    def validate(self) -> None:
        _expect(isinstance(self.name, str) and 0 < len(self.name) <= 200 and self.name.strip() == self.name
                and self.name.isprintable(),
                "name must be a non-empty string of at most 200 printable characters without surrounding spaces",
                self.name)
        _expect(isinstance(self.model, str) and bool(self.model) and self.model.isprintable(),
                "model must be a model name or path", self.model)
        _expect(self.device is None or (isinstance(self.device, str) and bool(self.device)),
                "device must be null or a torch device name such as 'cpu' or 'cuda:0'", self.device)
        _expect(self.proxy_dtype in PROXY_DTYPES, f"proxy_dtype must be null or one of {list(PROXY_DTYPES)}",
                self.proxy_dtype)
        try:
            parse_pattern(self.pattern)
        except SpecError as exc:
            raise SpecError(f"spec {exc}") from None
        _expect(_is_number(self.target_sparsity) and 0 <= self.target_sparsity < 1,
                "target_sparsity must be in [0, 1)", self.target_sparsity)
        space = tuple(self.space)
        _expect(len(space) > 0 and all(s in SPACE_COMPONENTS for s in space) and len(set(space)) == len(space),
                f"space must be distinct names among {list(SPACE_COMPONENTS)}", self.space)
        _expect(not ("layerwise" in space and "allocator" in space),
                "space takes either layerwise or allocator, not both", self.space)
        objectives = tuple(self.objectives)
        _expect(len(objectives) > 0 and all(o in OBJECTIVE_NAMES for o in objectives) and len(set(objectives)) == len(objectives),
                f"objectives must be distinct names among {list(OBJECTIVE_NAMES)}", self.objectives)
        _expect(objectives[0] in ERROR_PROXIES, f"the first objective must be an error proxy ({', '.join(ERROR_PROXIES)})",
                objectives[0])
        _expect(self.sampler in SAMPLER_NAMES, f"sampler must be one of {list(SAMPLER_NAMES)}", self.sampler)
        if self.sampler in SINGLE_OBJECTIVE_SAMPLERS:
            _expect(len(objectives) == 1, f"sampler {self.sampler} optimises one objective; use nsga3 or "
                    "optuna-nsga3 for several", list(objectives))
        for key in ("trials", "population_size"):
            value = getattr(self, key)
            _expect(_is_int(value) and value >= 1, f"{key} must be a positive integer", value)
        _expect(self.timeout is None or (_is_number(self.timeout) and 0 < self.timeout < float("inf")),
                "timeout must be null or a positive number of seconds", self.timeout)
        _expect(_is_int(self.seed), "seed must be an integer", self.seed)
        _expect(all(w in WARM_STARTS for w in self.warm_start), f"warm_start must be names among {list(WARM_STARTS)}", self.warm_start)
        _expect(all(isinstance(p, str) and p for p in self.seed_plans), "seed_plans must be a list of plan file paths",
                self.seed_plans)
        if self.pattern != "unstructured":
            _expect("layerwise" not in space and "allocator" not in space,
                    "N:M patterns fix the sparsity; drop layerwise/allocator from the space", self.pattern)
        if "layerwise" in space:
            _expect(self.target_sparsity + 1e-9 < self.layerwise.max_sparsity,
                    f"target_sparsity must be below layerwise.max_sparsity={self.layerwise.max_sparsity}", self.target_sparsity)
        for section in (self.layerwise, self.metric, self.kv, self.allocator, self.layer_drop, self.calibration,
                        self.validation, self.early_stopping, self.evo):
            section.validate()
        if self.kv.budget is not None or self.kv.budget_bytes is not None:
            _expect("kv" in space, "kv.budget / kv.budget_bytes need kv in the space", list(space))
        if self.sampler == "evo" and self.evo.block_switch:
            _expect("layerwise" in space and self.layerwise.granularity == "module",
                    "evo.block_switch needs one search group per Linear (layerwise.granularity module)",
                    self.layerwise.granularity if "layerwise" in space else list(space))
        if self.sampler == "evo":
            pool = self.calibration.score_samples or self.calibration.samples
            _expect(pool >= max(st[0] for st in self.evo.stages),
                    f"calibration.{'score_samples' if self.calibration.score_samples else 'samples'} "
                    "(the window pool) must hold the largest evo stage", pool)
        if self.early_stopping.enabled:
            _expect(len(objectives) == 1, "early_stopping needs a single-objective study (Optuna's pruners do not "
                    "support several objectives); set early_stopping.pruner to none", list(objectives))
            _expect(objectives[0] in FORWARD_PROXIES, f"early_stopping needs a forward proxy ({', '.join(FORWARD_PROXIES)}) "
                    "to report per calibration batch", objectives[0])
            _expect(self.sampler in ("tpe", "random"), "early_stopping needs sampler tpe or random", self.sampler)

    # ------------------------------------------------------------------ loading and identity
    @classmethod
    def from_stored(cls, data: Any) -> StudySpec:
        """The spec a study recorded (its ``to_dict()``), with :data:`LEGACY_DEFAULTS` for the keys it
        lacks: a stored spec holds every field that existed when it was made, so a missing one ran
        with that field's value of the time, not today's default."""
        if isinstance(data, Mapping):
            data = dict(data)
            for section, values in LEGACY_DEFAULTS.items():
                stored = data.get(section)
                if stored is None or isinstance(stored, Mapping):
                    data[section] = {**values, **(stored or {})}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> StudySpec:
        """Validate parsed YAML/JSON."""
        _expect(isinstance(data, Mapping), "a study spec must be a mapping", type(data).__name__)
        names = {f.name for f in fields(cls)}
        unknown = _unknown_keys(data, names)
        _expect(not unknown, f"spec accepts keys {sorted(names)}", unknown)
        sections = {"layerwise": LayerwiseSpec, "metric": MetricSpec, "kv": KVSpec, "allocator": AllocatorSpec,
                    "layer_drop": LayerDropSpec, "calibration": CalibrationSpec, "validation": ValidationSpec,
                    "early_stopping": EarlyStoppingSpec, "evo": EvoSpec}
        kwargs = {k: v for k, v in data.items() if k not in sections}
        for key in ("space", "objectives", "warm_start", "seed_plans"):
            if key in kwargs:
                value = kwargs[key]
                if value is None:  # the default (objectives: chosen by the sampler)
                    del kwargs[key]
                    continue
                if isinstance(value, str):
                    value = [v.strip() for v in value.split(",") if v.strip()]
                _expect(isinstance(value, (list, tuple)), f"{key} must be a list", value)
                kwargs[key] = tuple(value)
        for key, section in sections.items():
            if key in data:
                kwargs[key] = _section(data, key, section)
        if "kv" in kwargs:
            _expect(isinstance(kwargs["kv"].bits, (list, tuple)), "kv.bits must be a list of bit-widths", kwargs["kv"].bits)
            kwargs["kv"] = replace(kwargs["kv"], bits=tuple(kwargs["kv"].bits))
        if "metric" in kwargs:
            _expect(isinstance(kwargs["metric"].exponent_range, (list, tuple)),
                    "metric.exponent_range must be [low, high] within [0, 8]", kwargs["metric"].exponent_range)
            kwargs["metric"] = replace(kwargs["metric"], exponent_range=tuple(kwargs["metric"].exponent_range))
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SpecError(f"spec: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> StudySpec:
        """Read a YAML or JSON spec file."""
        import yaml

        text = read_user_file(path, "spec file (YAML or JSON)")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"expected a YAML or JSON spec in {str(path)!r}, but parsing failed: {' '.join(str(exc).split())}") from None
        except RecursionError:
            raise SpecError(f"expected a YAML or JSON spec in {str(path)!r}, but it is nested too deeply to parse") from None
        return cls.from_dict(data or {})

    def override(self, **changes: Any) -> StudySpec:
        """Copy with top-level fields replaced (None values ignored), validated again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return json.loads(json.dumps(asdict(self)))

    def spec_hash(self) -> str:
        """Short hash of what determines the search (not name, trials, timeout, device)."""
        data = self.to_dict()
        for key in ("name", "trials", "timeout", "device", "validation"):
            data.pop(key, None)
        # Fields at their "off" value are left out: keeps the hashes of studies made before they existed
        # (proxy_dtype: trials were computed in float32 before the field existed).
        unused = {"layer_drop": "layer_drop" not in self.space, "early_stopping": not self.early_stopping.enabled,
                  "evo": self.sampler != "evo", "seed_plans": not self.seed_plans,
                  "proxy_dtype": self.proxy_dtype == "float32"}
        for key in [k for k, off in unused.items() if off]:
            data.pop(key, None)
        for key in ("budget", "budget_bytes"):  # likewise
            if data["kv"].get(key) is None:
                data["kv"].pop(key, None)
        # Fields at their value from before they existed are left out too, whatever today's default.
        for section, values in LEGACY_DEFAULTS.items():
            for key, value in values.items():
                if section in data and data[section].get(key) == value:
                    data[section].pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
