"""SearchSpace: the parameters a study searches, and their decoding into an allocation.

Built from a :class:`~sparsealloc.spaces.spec.StudySpec` and the model's structure (any object
with ``linears``, ``blocks``, ``block_of``, ``numels`` and ``attention``, such as
:class:`sparsealloc.pruning.ModelLayout`). Pure Python: no optimizer, no torch.

Every candidate decodes to an allocation whose parameter-weighted mean sparsity equals the target
exactly (:func:`~sparsealloc.spaces.budget.project_to_budget`). With ``remaining_weights`` among the
objectives the target itself is searched (parameter ``budget/sparsity`` within ``target_sparsity ±
layerwise.radius``), so a multi-objective front can trade weights for error; otherwise that
objective would be a constant.

*Leveled* spaces (the evo sampler, and metrics whose compressed layers come from a level database)
snap the group ratios onto a :class:`~sparsealloc.spaces.levels.LevelGrid` instead: every candidate
is a balanced integer genome, so its budget is exact by construction and each group's ratio is one
of a few levels that a database can hold.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.spaces.budget import project_to_budget
from sparsealloc.spaces.kv_budget import budget_total, fit_to_budget, slot_bytes
from sparsealloc.spaces.levels import LevelGrid
from sparsealloc.spaces.params import ChoiceParam, FloatParam, IntParam, Param
from sparsealloc.spaces.spec import StudySpec

#: Coefficients that change the per-row mask (the others are mask-invariant; see
#: ``sparsealloc.pruning.metrics.MASK_INVARIANT_COEFFICIENTS``). "no_coe" stands for all invariant ones.
METRIC_COEFFICIENTS = ("no_coe", "column_sum", "relative_sum")
#: Transforms kept in the space; sqrt and square are covered by the continuous exponents.
METRIC_TRANSFORMS = ("no_op", "log", "sigmoid", "exp", "softmax")
#: The overall sparsity, searched when ``remaining_weights`` is an objective.
BUDGET_PARAM = "budget/sparsity"
#: Number of decoder blocks dropped (space component ``layer_drop``).
DROP_PARAM = "layer_drop/blocks"


class LayoutLike(Protocol):
    linears: Sequence[str]
    blocks: Sequence[str]
    block_of: Mapping[str, str]
    numels: Mapping[str, int]
    attention: Sequence[str]


@dataclass(frozen=True)
class Decoded:
    """A candidate in model terms.

    Attributes:
        sparsity: Ratio per Linear FQN (exact budget), or None when an allocator decides.
        allocator: (name, params) of a low-dimensional allocator space, or None.
        metric: Pruning metric and parameters.
        kv_bits: {attention FQN: {"k": bits, "v": bits}}; empty when KV bits are not searched.
        group_ratios: Repaired ratio per search group (for plots and debugging).
        budget: The overall sparsity this candidate was repaired to (the spec's target unless searched).
        dropped_blocks: How many decoder blocks to drop (the first of the evaluator's Block-Influence
            schedule); the evaluator re-budgets the ratios of the blocks that stay.
    """

    sparsity: dict[str, float] | None
    allocator: tuple[str, dict[str, float]] | None
    metric: MetricChoice
    kv_bits: dict[str, dict[str, int]] = field(default_factory=dict)
    group_ratios: dict[str, float] = field(default_factory=dict)
    budget: float | None = None
    dropped_blocks: int = 0

    def to_plan(self, pattern: str = "unstructured", model: Mapping[str, Any] | None = None,
                sparsity: Mapping[str, float] | None = None, provenance: Mapping[str, Any] | None = None
                ) -> AllocationPlan:
        """The AllocationPlan (``sparsity`` overrides, e.g. an allocator's output)."""
        ratios = sparsity if sparsity is not None else self.sparsity
        if ratios is None:
            raise SpecError("an allocator-space candidate needs the allocator's ratios to become a plan")
        return AllocationPlan(sparsity=dict(ratios), metric=self.metric, pattern=pattern,
                              kv_bits=self.kv_bits, model=dict(model or {}), provenance=dict(provenance or {}))


def _groups(spec: StudySpec, layout: LayoutLike) -> dict[str, list[str]]:
    """Search group name → Linear FQNs, for the spec's granularity."""
    g = spec.layerwise.granularity
    width = max(2, len(str(len(layout.blocks) - 1)))
    if g == "block":
        return {f"sparsity/block_{i:0{width}d}": [n for n in layout.linears if layout.block_of[n] == b]
                for i, b in enumerate(layout.blocks)}
    if g == "bins":
        n_bins = min(spec.layerwise.bins, len(layout.blocks))
        base, extra = divmod(len(layout.blocks), n_bins)  # remainder to the first bins (Optspa)
        groups, start = {}, 0
        for i in range(n_bins):
            size = base + (1 if i < extra else 0)
            members = set(layout.blocks[start : start + size])
            groups[f"sparsity/bin_{i:02d}"] = [n for n in layout.linears if layout.block_of[n] in members]
            start += size
        return groups
    if g == "projection":
        kinds: dict[str, list[str]] = {}
        for n in layout.linears:
            kinds.setdefault(n.rsplit(".", 1)[-1], []).append(n)
        return {f"sparsity/proj_{k}": v for k, v in kinds.items()}
    return {f"sparsity/module/{n}": [n] for n in layout.linears}


class SearchSpace:
    """Parameters of a study and their decoding (see module docstring).

    Args:
        spec: The study spec.
        layout: The model's structure.
        leveled: Snap group ratios onto the level grid (default: for the evo sampler). Ignored when
            the budget itself is searched (``remaining_weights``).
        window_strata: The domain of each scored calibration window (``calibration.domains``), which
            samplers that score on a few windows at a time stratify their draws over; None: none.
    """

    def __init__(self, spec: StudySpec, layout: LayoutLike, leveled: bool | None = None,
                 window_strata: tuple[int, ...] | None = None) -> None:
        self.spec = spec
        self.window_strata = window_strata
        self.layout = layout
        self.target = float(spec.target_sparsity)
        self.params: list[Param] = []
        self.groups: dict[str, list[str]] = {}
        self.group_numels: dict[str, int] = {}
        lw = spec.layerwise
        self.lo = max(0.0, self.target - lw.radius)
        self.hi = min(lw.max_sparsity, self.target + lw.radius)
        if "remaining_weights" in spec.objectives and spec.pattern == "unstructured":
            self.params.append(FloatParam(BUDGET_PARAM, self.lo, self.hi, lw.step))
        if "layerwise" in spec.space:
            self.groups = _groups(spec, layout)
            self.group_numels = {g: sum(layout.numels[n] for n in names) for g, names in self.groups.items()}
            self.params += [FloatParam(g, self.lo, self.hi, lw.step) for g in self.groups]
        leveled = spec.sampler == "evo" if leveled is None else leveled
        searched_budget = any(p.name == BUDGET_PARAM for p in self.params)
        #: The level grid of a leveled layerwise space, else None.
        self.levels = (LevelGrid.build(self.group_numels, self.target, self.lo, self.hi, lw.level_step)
                       if leveled and self.groups and not searched_budget else None)
        if "allocator" in spec.space:
            self.params += self._allocator_params()
        if "metric" in spec.space:
            lo, hi = spec.metric.exponent_range
            self.params += [
                ChoiceParam("metric/w_coef", METRIC_COEFFICIENTS),
                ChoiceParam("metric/w_transform", METRIC_TRANSFORMS),
                ChoiceParam("metric/x_coef", METRIC_COEFFICIENTS),
                ChoiceParam("metric/x_transform", METRIC_TRANSFORMS),
                FloatParam("metric/w_exponent", max(lo, 0.25), hi),
                FloatParam("metric/x_exponent", lo, hi),
            ]
        self.kv_ladder = tuple(sorted(set(spec.kv.bits)))
        if "kv" in spec.space:
            names = [n for _, slot in self._kv_slots() for n in dict.fromkeys(slot.values())]
            self.params += [ChoiceParam(n, self.kv_ladder) for n in names]
        #: KV parameters (one per slot, or per layer when K and V share a width) and, under
        #: ``kv.budget`` / ``kv.budget_bytes``, the total they must stay within: bits, or bytes per
        #: token with ``kv_cost`` the bytes of each slot at each rung (:mod:`sparsealloc.spaces.kv_budget`).
        self.kv_params = [p.name for p in self.params if p.name.startswith("kv_bits/")]
        self.kv_total: float | None = None
        self.kv_cost: dict[str, dict[int, float]] | None = None
        if self.kv_params and spec.kv.budget is not None:
            self.kv_total = budget_total(spec.kv.budget, len(self.kv_params))
        elif self.kv_params and spec.kv.budget_bytes is not None:
            self.kv_cost = self._slot_costs()
            self.kv_total = float(spec.kv.budget_bytes)
            floor = sum(min(c.values()) for c in self.kv_cost.values())
            if self.kv_total < floor:
                raise SpecError(f"kv.budget_bytes must be at least {floor:g} bytes per token (every slot at "
                                f"{self.kv_ladder[0]} bits), but got {self.kv_total:g}")
        if "layer_drop" in spec.space:
            self.params.append(IntParam(DROP_PARAM, 0, min(spec.layer_drop.max_blocks, len(layout.blocks) - 1)))
        self.by_name = {p.name: p for p in self.params}

    def _kv_slots(self) -> Iterator[tuple[str, dict[str, str]]]:
        """(attention FQN, {"k": parameter, "v": parameter}) per layer; one parameter for both
        without ``kv.separate_kv``."""
        for i, attn in enumerate(self.layout.attention):
            stem = f"kv_bits/layer_{i:02d}"
            yield attn, {x: f"{stem}/{x}" if self.spec.kv.separate_kv else stem for x in ("k", "v")}

    def _slot_costs(self) -> dict[str, dict[int, float]]:
        heads, head_dim = getattr(self.layout, "kv_heads", 0), getattr(self.layout, "head_dim", 0)
        if not heads or not head_dim:
            raise SpecError("kv.budget_bytes needs the model's KV heads and head dim, but the layout has none; "
                            "use kv.budget (mean bits)")
        kv = self.spec.kv
        return {n: slot_bytes(n.rsplit("/", 1)[-1] if kv.separate_kv else "kv", self.kv_ladder, heads, head_dim,
                              kv.group_size) for n in self.kv_params}

    def _allocator_params(self) -> list[Param]:
        name = self.spec.allocator.name
        radius = self.spec.layerwise.radius
        if name == "owl":
            return [FloatParam("allocator/owl/m", 2.0, 10.0), FloatParam("allocator/owl/lam", 0.0, radius)]
        span = max(len(self.layout.blocks) - 1, 1)
        return [FloatParam("allocator/depth_ramp/beta", -radius / span, 2 * radius / span)]

    # ----------------------------------------------------------------------------- decoding
    def decode(self, values: Mapping[str, Any]) -> Decoded:
        """Turn sampler values (keyed by parameter name) into a :class:`Decoded` candidate.

        Missing values take their default (uniform ratios, Wanda metric, 16-bit KV); values out of
        range are clipped; the sparsity is repaired onto the exact budget.
        """
        unknown = set(values) - set(self.by_name)
        if unknown:
            raise SpecError(f"unknown search parameters {sorted(unknown)[:3]}; this space has {len(self.params)} others")
        get = lambda p: p.clip(values[p.name]) if p.name in values else self.default(p)  # noqa: E731
        target = get(self.by_name[BUDGET_PARAM]) if BUDGET_PARAM in self.by_name else self.target
        sparsity = group_ratios = None
        if self.groups:
            raw = {g: get(self.by_name[g]) for g in self.groups}
            if self.levels is not None:
                group_ratios = self.levels.ratios(self.levels.levels_of(raw))
            else:
                group_ratios = project_to_budget(raw, self.group_numels, target, self.lo, self.hi)
            sparsity = {n: group_ratios[g] for g, names in self.groups.items() for n in names}
        allocator = None
        if "allocator" in self.spec.space:
            name = self.spec.allocator.name
            prefix = f"allocator/{name}/"
            allocator = (name, {p.name[len(prefix):]: float(get(p)) for p in self.params if p.name.startswith(prefix)})
        elif sparsity is None:
            sparsity = {n: target for n in self.layout.linears}
        dropped = int(get(self.by_name[DROP_PARAM])) if DROP_PARAM in self.by_name else 0
        return Decoded(sparsity, allocator, self._metric(get), self._kv_bits(get), group_ratios or {}, target,
                       dropped)

    def _metric(self, get) -> MetricChoice:
        if "metric" not in self.spec.space:
            return MetricChoice(self.spec.metric.name, dict(self.spec.metric.params))
        keys = ("w_coef", "w_transform", "x_coef", "x_transform", "w_exponent", "x_exponent")
        return MetricChoice("generalized", {k: get(self.by_name[f"metric/{k}"]) for k in keys})

    def snap_kv(self, values: Mapping[str, Any], protect: Collection[str] = ()) -> dict[str, Any]:
        """``values`` with the KV widths fitted to ``kv.budget`` / ``kv.budget_bytes``
        (:func:`fit_to_budget`; unchanged without a budget). Missing or off-ladder widths take their
        default / clipped value first."""
        out = dict(values)
        if self.kv_total is None:
            return out
        bits = {n: int(self.by_name[n].clip(out[n])) if n in out else int(self.default(self.by_name[n]))
                for n in self.kv_params}
        out.update(fit_to_budget(bits, self.kv_ladder, self.kv_total, protect, self.kv_cost))
        return out

    def _kv_bits(self, get) -> dict[str, dict[str, int]]:
        if "kv" not in self.spec.space:
            return {}
        if self.kv_total is not None:  # every candidate meets the bit budget
            fitted = self.snap_kv({n: get(self.by_name[n]) for n in self.kv_params})
            get = lambda p: fitted[p.name]  # noqa: E731
        return {attn: {x: int(get(self.by_name[n])) for x, n in names.items()} for attn, names in self._kv_slots()}

    def default(self, param: Param) -> Any:
        """Value meaning "as the hand-made default": target ratio, Wanda metric, 16-bit KV."""
        name = param.name
        if name.startswith("sparsity/") or name == BUDGET_PARAM:
            return param.clip(self.target)
        if name == DROP_PARAM:
            return 0
        defaults = {"metric/w_coef": "no_coe", "metric/x_coef": "no_coe", "metric/w_transform": "no_op",
                    "metric/x_transform": "no_op", "metric/w_exponent": 1.0, "metric/x_exponent": 1.0,
                    "allocator/owl/m": 5.0, "allocator/owl/lam": 0.08, "allocator/depth_ramp/beta": 0.0}
        if name in defaults:
            return param.clip(defaults[name])
        if name.startswith("kv_bits/"):
            return max(param.choices)
        raise SpecError(f"no default for parameter {name!r}")

    # ----------------------------------------------------------------------------- encoding
    def defaults(self) -> dict[str, Any]:
        """All parameters at their defaults (the uniform warm start; KV widths fitted to the budget)."""
        return self.snap_kv({p.name: self.default(p) for p in self.params})

    def uniform_kv(self) -> dict[str, dict[str, Any]]:
        """The defaults at every lower uniform KV bit-width (``"uniform-kv8"``: all K and V at 8 bits...).

        Empty unless KV bits are searched; the highest width is :meth:`defaults` itself.
        """
        if not self.kv_params or self.kv_total is not None:  # under a budget the defaults already sit on it
            return {}
        lower = sorted(set(self.spec.kv.bits), reverse=True)[1:]
        return {f"uniform-kv{b}": {**self.defaults(), **dict.fromkeys(self.kv_params, b)} for b in lower}

    def encode_plan(self, plan: AllocationPlan) -> dict[str, Any]:
        """Parameters approximating ``plan``: its sparsity (:meth:`encode_sparsity`, layerwise spaces),
        KV widths (fitted to the KV budget, if any) and dropped-block count; the rest at defaults.

        Raises:
            IncompatiblePlanError: the plan names modules this model does not have.
        """
        values = self.encode_sparsity(plan.expand(self.layout.linears)) if self.groups else self.defaults()
        if self.kv_params:
            plan.check_kv_layers(self.layout.attention)
            for attn, names in self._kv_slots():  # K and V sharing a parameter take the wider width
                bits = plan.kv_bits.get(attn, {"k": 16, "v": 16})
                for name in dict.fromkeys(names.values()):
                    values[name] = self.by_name[name].clip(max(int(bits[x]) for x in names if names[x] == name))
        if DROP_PARAM in self.by_name:
            values[DROP_PARAM] = self.by_name[DROP_PARAM].clip(len(plan.dropped_layers))
        return self.snap_kv(values)

    def encode_sparsity(self, ratios: Mapping[str, float]) -> dict[str, Any]:
        """Parameters approximating per-Linear ``ratios`` (e.g. OWL's): weighted mean per group, clipped.

        Only for layerwise spaces; other parameters take their defaults.
        """
        values = self.defaults()
        for g, names in self.groups.items():
            total = self.group_numels[g]
            mean = sum(ratios[n] * self.layout.numels[n] for n in names) / total
            values[g] = self.by_name[g].clip(mean)
        return values
