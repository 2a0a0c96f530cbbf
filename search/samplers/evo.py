"""``evo``: (1+λ) level-switch search with multi-stage selection, every offspring an Optuna trial.

EvoPress (Sieberling et al., ICML 2025, arXiv:2410.14649): the genome is one integer level per
search group (:class:`~sparsealloc.spaces.levels.LevelGrid`; per Linear by default), each level the
same number of pruned weights, so a *level switch* (−1 on one group, +1 on another) keeps the budget
exact. Each generation mutates the parent into ``evo.offspring`` distinct children with
``k = min(U{1..K}, U{1..K})`` switches each (K = ``evo.max_swaps``; EvoPress found a fixed large k
far worse; ``evo.switch_sparsity`` moves several levels per switch, as many as change the smaller
of the two groups' sparsity by about that much; with ``evo.block_switch`` p, each switch is with
probability p a *block switch*, the same switch between every Linear of one decoder block and its
counterpart in another), then selects in stages of growing fidelity: stage
``i`` scores the remaining candidates on ``stages[i][0]`` calibration windows drawn afresh from the
pool and keeps the best ``stages[i][1]``; the last stage also re-scores the parent on the same windows, and the best of them
is the next parent. Fresh windows per stage keep the search from fitting one calibration sample.
With ``evo.merge``, when two or more offspring of the last stage beat the parent there, the parent
plus all their level changes (a merged candidate; the sum of budget-exact switches is budget-exact)
and the best of those offspring are scored on fresh windows of the last stage's size, and the
merged candidate is the next parent only if it wins there. With ``evo.guide`` m, each child is the best
of m random mutations under a posterior draw of a model of the value linear in each group's sparsity
change and its square, fitted to all stages so far (:mod:`~sparsealloc.search.samplers.switch_model`; linear
Thompson sampling), rather than the first one drawn.

Store mapping (the dashboard shows the climb):

* every candidate is one trial with user attrs ``generation``, ``source = "evo"`` and ``evo_role``
  (offspring, parent, merged, rescored, or queued: warm starts and retries), and with ``evo.guide``
  ``evo_predicted`` (the model's predicted change from the parent); its value at stage ``i`` is the
  intermediate value at step ``i`` and ``stage`` is the last stage it reached;
* eliminated candidates are PRUNED with the value they reached; the last stage's candidates are
  COMPLETE with their value at full (last-stage) fidelity;
* the parent of the next generation is the study attr ``evo:parent`` (``{"generation", "trial"}``),
  which is all :meth:`EvoSampler.__init__` needs to resume.

The stage's windows travel in the :class:`~sparsealloc.core.types.Proposal` (``windows``; ``final``
marks the last stage), so stages run the same in process and on Ray workers. Warm starts (WAITING
trials) are scored first, on the first generation's last-stage windows, and the best becomes the
first parent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from sparsealloc.core.keys import (EVO_ELIMINATED, EVO_PARENT, EVO_PREDICTED, EVO_ROLE, GENERATION, SOURCE, STAGE,
                                   WARM_START)
from sparsealloc.core.types import Outcome, Proposal
from sparsealloc.pruning.calibration.select import read_calibration_set
from sparsealloc.search.samplers.base import Sampler
from sparsealloc.search.samplers.switch_model import SwitchModel
from sparsealloc.spaces.params import ChoiceParam, FloatParam, IntParam
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.storage.optuna_adapter import count_trials, create_running_trial, set_trial_user_attrs, trial_id_of

#: ``user_attrs[SOURCE]`` of every trial this sampler creates.
EVO_SOURCE = "evo"
PARENT_ATTR = EVO_PARENT
#: Parents kept in the study attr's ``history`` (validation re-scores the latest ones).
HISTORY = 32
#: Roles whose stage values fit the switch model (evo.guide): the children and the re-scored parent.
MODELLED = ("offspring", "parent")


@dataclass(eq=False)
class _Candidate:
    params: dict[str, Any]
    role: str
    number: int | None = None
    trial_id: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    waiting: bool = False  # a WAITING trial of the store, asked when first proposed
    predicted: float | None = None  # evo.guide: the switch model's predicted change from the parent


def trials_by_generation(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[int, list[optuna.trial.FrozenTrial]]:
    """The evo sampler's trials among ``trials``, by generation."""
    generations: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        if t.user_attrs.get(SOURCE) == EVO_SOURCE and isinstance(t.user_attrs.get(GENERATION), int):
            generations.setdefault(t.user_attrs[GENERATION], []).append(t)
    return generations


def recent_parents(study: optuna.Study, n: int) -> list[int]:
    """Trial numbers of the latest ``n`` distinct parents (newest first); empty for other samplers."""
    history = (study.user_attrs.get(PARENT_ATTR) or {}).get("history", [])
    return list(dict.fromkeys(reversed(history)))[:n]


def stage_windows(seed: int, generation: int, stage: int, size: int, pool: int,
                  strata: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """The calibration windows of one selection stage: ``size`` of the ``pool`` drawn without
    replacement, reproducibly from (seed, generation, stage); None (all of them) when ``size >= pool``.

    With ``strata`` (one label per pool window: the calibration set's clusters, e.g. its source
    texts) the draw is stratified in proportion to the labels' shares of the pool
    (:func:`stratum_counts`), then uniform within each label. Every window keeps the same chance
    to be drawn, so a stage's mean stays an unbiased estimate of the pool's, but a small stage no
    longer misses a domain by chance (proportional stratified sampling; Cochran, *Sampling
    Techniques*, 1977, ch. 5).
    """
    if size >= pool:
        return None
    rng = np.random.default_rng([seed, generation + 1, stage])
    if strata is None or len(set(strata)) < 2:
        return tuple(sorted(int(i) for i in rng.choice(pool, size=size, replace=False)))
    members: dict[int, list[int]] = {}
    for index, label in enumerate(strata):
        members.setdefault(int(label), []).append(index)
    labels = sorted(members)
    counts = stratum_counts([len(members[label]) for label in labels], size, rng)
    drawn = [int(i) for label, n in zip(labels, counts) if n for i in rng.choice(members[label], size=n, replace=False)]
    return tuple(sorted(drawn))


def stratum_counts(sizes: Sequence[int], size: int, rng: np.random.Generator) -> list[int]:
    """How many of ``size`` draws each stratum gets: the floor of its proportional share
    ``size · n_h / N``, plus one more for strata picked by systematic sampling on the leftover
    fractions, so each stratum's expected count is exactly its share (and the counts sum to ``size``)."""
    total = sum(sizes)
    shares = [size * n / total for n in sizes]
    counts = [math.floor(s) for s in shares]
    fractions = np.cumsum([s - c for s, c in zip(shares, counts)])
    if size - sum(counts):
        points = rng.random() + np.arange(size - sum(counts))
        for h in np.searchsorted(fractions, points, side="right"):
            counts[min(int(h), len(sizes) - 1)] += 1
    return counts


def calibration_pool(spec, domains: Sequence[int] | None = None) -> tuple[int, tuple[int, ...] | None]:
    """The number of calibration windows stage windows are drawn from, and a stratum per window.

    The pool is the windows trials are scored on: ``calibration.score_samples`` held-out windows of the
    text where it asks for them, else its ``calibration.samples`` windows, or the windows of
    ``calibration.windows_file`` (whatever ``samples`` says); its strata are the set's clusters when
    every window has one (a ``calib select --metric ssp`` set, or a set mixed from several texts),
    else ``domains`` (the domain of each scored window, ``calibration.domains``; the space's
    ``window_strata``) when there is one per pool window, else None.
    """
    if not spec.calibration.windows_file:
        pool = int(spec.calibration.score_samples or spec.calibration.samples)
        return pool, tuple(int(d) for d in domains) if domains is not None and len(domains) == pool else None
    selected = read_calibration_set(spec.calibration.windows_file)
    return len(selected.records), selected.clusters


def level_switch(levels: Mapping[str, int], bounds: Mapping[str, tuple[int, int]], swaps: int,
                 rng: np.random.Generator, lowered: set[str] | None = None,
                 magnitude: Callable[[str, str], int] | None = None) -> dict[str, int]:
    """``swaps`` level switches: each lowers one group by a level and raises another by one, within
    bounds, so the sum of levels (the budget) is unchanged (EvoPress's mutation). ``lowered``, when
    given, receives the groups lowered. ``magnitude(a, b)``, when given, is how many levels a switch
    that lowers ``a`` and raises ``b`` moves (cut to what both bounds allow; at least one)."""
    out = dict(levels)
    names = sorted(out)
    for _ in range(swaps):
        up = [g for g in names if out[g] < bounds[g][1]]
        # A group may be lowered if another group can take the level it gives up.
        down = [g for g in names if out[g] > bounds[g][0] and any(u != g for u in up)]
        if not down:
            break
        a = down[int(rng.integers(len(down)))]
        choices = [g for g in up if g != a]
        b = choices[int(rng.integers(len(choices)))]
        moved = 1
        if magnitude is not None:
            moved = max(1, min(int(magnitude(a, b)), out[a] - bounds[a][0], bounds[b][1] - out[b]))
        out[a] -= moved
        out[b] += moved
        if lowered is not None:
            lowered.add(a)
    return out


def block_roles(groups: Mapping[str, Sequence[str]], block_of: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Each decoder block's search groups by role (the Linear's name inside its block, e.g.
    ``self_attn.q_proj``), for :func:`block_switch`. Empty unless every group is one Linear (the
    evo sampler's default granularity, ``module``): a group of several Linears has no one role."""
    blocks: dict[str, dict[str, str]] = {}
    for group, members in groups.items():
        if len(members) != 1:
            return {}
        block = block_of[members[0]]
        blocks.setdefault(block, {})[members[0].removeprefix(block + ".")] = group
    return blocks


def block_switch(levels: Mapping[str, int], bounds: Mapping[str, tuple[int, int]],
                 blocks: Mapping[str, Mapping[str, str]], rng: np.random.Generator,
                 magnitude: Callable[[str, str], int] | None = None) -> dict[str, int]:
    """One *block switch*: a level switch between every Linear of one decoder block and the Linear of
    the same role in another (``q_proj`` with ``q_proj``, ...), so the whole block gives up sparsity
    to the other, role for role. Each pair moves as :func:`level_switch` moves one (``magnitude``,
    cut to what both bounds allow; a pair at a bound is left as is), so the budget stays exact.

    A level switch moves one Linear; the depth profile of an allocation (the sparsity of whole
    blocks, which the hand rules OWL and the depth ramp set) then changes one Linear at a time. A
    block switch moves it in one step, as a block-granularity search would, inside the per-Linear
    genome of EvoPress (Sieberling et al., ICML 2025, arXiv:2410.14649).

    Args:
        levels: Level per group.
        bounds: (lowest, highest) level per group.
        blocks: Groups per block and role (:func:`block_roles`).
        rng: Draws the two blocks.
        magnitude: Levels a pair moves (default one).
    """
    out = dict(levels)
    names = sorted(blocks)
    if len(names) < 2:
        return out
    i, j = (int(k) for k in rng.choice(len(names), size=2, replace=False))
    lowered, raised = blocks[names[i]], blocks[names[j]]
    for role in sorted(set(lowered) & set(raised)):
        a, b = lowered[role], raised[role]
        room = min(out[a] - bounds[a][0], bounds[b][1] - out[b])
        if room <= 0:
            continue
        moved = min(room, 1 if magnitude is None else max(1, int(magnitude(a, b))))
        out[a] -= moved
        out[b] += moved
    return out


def bit_switch(bits: Mapping[str, int], ladder: Sequence[int], swaps: int, rng: np.random.Generator
               ) -> tuple[dict[str, int], set[str]]:
    """``swaps`` ladder switches: each raises one slot by a rung and lowers another by one (the
    level switch of EvoPress on bit-widths). Returns the widths and the raised slots, to protect in
    :func:`~sparsealloc.spaces.kv_budget.fit_to_budget`, which restores the budget where the two
    rungs differ in size."""
    rungs = sorted(set(int(b) for b in ladder))
    index = {b: i for i, b in enumerate(rungs)}
    raised: set[str] = set()
    # A level switch on the negated rung indices: lowering one raises that slot's width.
    negated = level_switch({n: -index[b] for n, b in bits.items()}, dict.fromkeys(bits, (1 - len(rungs), 0)),
                           swaps, rng, raised)
    return {n: rungs[-level] for n, level in negated.items()}, raised


def sparsity_magnitude(numels: Mapping[str, int], weights_per_level: int, sparsity: float) -> Callable[[str, str], int]:
    """The ``magnitude`` of :func:`level_switch` that changes the smaller of the two groups' sparsity
    by about ``sparsity``: ``max(1, round(sparsity · min(n_a, n_b) / weights_per_level))`` levels
    (``evo.switch_sparsity``)."""

    def magnitude(a: str, b: str) -> int:
        return max(1, round(sparsity * min(numels[a], numels[b]) / weights_per_level))

    return magnitude


class EvoSampler(Sampler):
    """EvoPress's (1+λ) search behind the ask/tell seam (see the module docstring).

    Lifecycle:
        construction → read ``spec.evo``, the pool (:func:`calibration_pool`) and the stored
        parent (study attr ``evo:parent``; else the best COMPLETE warm start); the next generation
        index is one above the largest stored.

        ask(n) → hands out the current stage's candidates (a new trial per offspring, the same trial
        again for a survivor); when the stage is told, eliminates, and sets up the next stage or
        generation. Returns fewer than ``n`` at a stage barrier.

        tell(number, outcome) → a non-final complete records the stage value (intermediate value)
        and parks the trial; a final complete, a failure or a pruning finishes it in the store.

        close() → trials parked between stages when the run stops are PRUNED.

    Args:
        study: The study (created by :func:`sparsealloc.search.session.open_sampler`).
        space: The search space; its layerwise groups must be leveled (``SearchSpace(leveled=True)``,
            the default for this sampler).
    """

    name = "evo"

    def __init__(self, study: optuna.Study, space: SearchSpace) -> None:
        super().__init__(study, space)
        spec = space.spec
        self.config = spec.evo
        self.seed = int(spec.seed)
        self.pool, self.strata = calibration_pool(spec, space.window_strata)
        self.grid = space.levels
        #: KV widths under a bit budget mutate by bit switches (then fitted), not one at a time.
        self.kv_switched = set(space.kv_params) if space.kv_total is not None else set()
        #: evo.block_switch: the search groups of each decoder block by role (empty: no block switches).
        self._blocks = block_roles(space.groups, space.layout.block_of) if self.grid is not None else {}
        self.others = [p for p in space.params if not (self.grid is not None and p.name in space.groups)
                       and p.name not in self.kv_switched]
        self.parent: dict[str, Any] = space.snap_kv(self._stored_parent() or space.defaults())
        done = [t.user_attrs.get(GENERATION) for t in study.get_trials(deepcopy=False)]
        self.generation = max([g for g in done if isinstance(g, int)] + [-1]) + 1
        self._stage: int | None = None  # stage index of the generation in progress; None: between
        self._seeding = False  # the generation in progress only scores warm starts
        self._queue: list[_Candidate] = []  # to hand out in this stage
        self._out: dict[int, _Candidate] = {}  # handed out, not told
        self._results: list[_Candidate] = []  # told complete in this stage
        self._parked: list[_Candidate] = []  # survivors and queued trials waiting for a later stage
        self._seen: set[tuple] = set()
        self._held: list[_Candidate] = []  # the last stage's results while the merge check runs
        #: evo.guide: the switch model over the search groups (columns: :meth:`_changes`), refitted
        #: on the stored stages when a study resumes.
        self.model = SwitchModel(2 * len(self.space.groups)) if self.config.guide and self.grid is not None else None
        #: The sparsity of one switch, the switch model's column unit.
        self._unit = (self.config.switch_sparsity or self.grid.step / float(np.mean(list(self.grid.numels.values())))
                      if self.model is not None else 1.0)
        self._origin = {g: float(v) for g, v in space.defaults().items() if g in self.space.groups}
        self._stage_values: list[tuple[np.ndarray, np.ndarray]] = []  # this generation's stages, for the model
        if self.model is not None:
            self._replay()

    @property
    def _merging(self) -> bool:
        """The merge check (the merged candidate and the best offspring on fresh windows) is running."""
        return bool(self._held)

    # ------------------------------------------------------------------------------ ask / tell
    def ask(self, n: int = 1) -> list[Proposal]:
        out: list[Proposal] = []
        while len(out) < n:
            if not self._queue and not self._out:
                self._advance()
            if not self._queue:
                break  # stage barrier: the rest of this stage is in flight
            out.append(self._propose(self._queue.pop(0)))
        return out

    def tell(self, trial_number: int, outcome: Outcome) -> None:
        cand = self._out.pop(trial_number, None)
        if cand is None:
            return  # already told (idempotent) or not ours
        stage, final = self._stage or 0, self._is_final()
        attrs = {**outcome.attrs, STAGE: stage}
        if outcome.state == "complete" and outcome.values:
            cand.value = float(outcome.values[0])
            if not math.isfinite(cand.value):
                self.finish(self.study, cand.trial_id, trial_number, Outcome("failed", reason="objective is not finite"))
                return
            if not final:  # park it: the stage's selection decides its fate
                set_trial_user_attrs(self.study, cand.trial_id, attrs, ((stage, cand.value),))
                self._results.append(cand)
                self._parked.append(cand)
                return
            self._results.append(cand)
            outcome = replace(outcome, attrs=attrs, intermediate=((stage, cand.value),))
        else:
            outcome = replace(outcome, attrs=attrs)
        self.finish(self.study, cand.trial_id, trial_number, outcome)

    @property
    def parked(self) -> int:
        """RUNNING trials held here and not in flight: between stages, or queued for this stage."""
        return len(self._parked) + sum(1 for c in self._queue if c.number is not None)

    def close(self) -> None:
        for cand in [*self._parked, *(c for c in self._queue if c.number is not None)]:
            reached = () if cand.value is None else ((self._stage or 0, cand.value),)
            self.finish(self.study, cand.trial_id, cand.number,
                        Outcome("pruned", attrs={"evo_stopped": "the run ended before its next selection stage"},
                                intermediate=reached))
        self._parked = []
        self._queue = [c for c in self._queue if c.number is None]

    # ------------------------------------------------------------------------------ stages
    def _is_final(self) -> bool:
        return self._seeding or self._stage == len(self.config.stages) - 1

    def _windows(self) -> tuple[int, ...] | None:
        stage = len(self.config.stages) - 1 if self._seeding else self._stage
        draw = len(self.config.stages) if self._merging else stage  # the merge check: a fresh draw
        return stage_windows(self.seed, self.generation, draw, self.config.stages[stage][0], self.pool,
                             self.strata)

    def _advance(self) -> None:
        """The current stage is fully told: select, then set up the next stage or generation."""
        if self._stage is not None or self._seeding:
            self._select()
        if self._stage is None:
            self._start_generation()

    def _select(self) -> None:
        results = sorted(self._results, key=lambda c: c.value)
        self._results = []
        if self.model is not None and not self._seeding and not self._merging:
            self._stage_values.append(self._regression([(c.params, c.value) for c in results if c.role in MODELLED],
                                                       self.parent))
        if self._is_final():
            merged = self._merged(results) if self.config.merge and not self._seeding and not self._merging else None
            if merged is not None:  # the merge against the best offspring, both on fresh windows
                best = next(c for c in results if c.role == "offspring")
                self._held = results
                self._queue = [merged, _Candidate(dict(best.params), "rescored")]
                return
            if self._merging:
                scored = {c.role: c for c in results}
                merged, rescored = scored.get("merged"), scored.get("rescored")
                won = merged is not None and rescored is not None and merged.value < rescored.value
                results = [merged] if won else self._held
                self._held = []
            if results:
                best = results[0]
                self.parent = self.space.snap_kv(dict(best.params))
                history = [*(self.study.user_attrs.get(PARENT_ATTR) or {}).get("history", []), best.number]
                self.study.set_user_attr(PARENT_ATTR, {"generation": self.generation, "trial": best.number,
                                                       "history": history[-HISTORY:]})
            for x, y in self._stage_values if self.model is not None else ():
                self.model.observe(x, y)  # whole generations only, as a resumed study refits them
            self._stage, self._seeding, self._stage_values = None, False, []
            self.generation += 1
            return
        keep = self.config.stages[self._stage][1]
        for cand in results[keep:]:
            self._parked.remove(cand)
            self.finish(self.study, cand.trial_id, cand.number, Outcome("pruned", attrs={EVO_ELIMINATED: True}))
        survivors = results[:keep]
        for cand in survivors:
            self._parked.remove(cand)
        self._stage += 1
        self._queue = survivors + (self._final_extras() if self._is_final() else [])

    def _start_generation(self) -> None:
        waiting = self._waiting()
        if waiting and self._stored_parent() is None and not self._has_seeded():
            self._seeding = True  # warm starts first; the best becomes the parent
            self._queue = waiting
            return
        for cand in waiting:  # retries and late warm starts: RUNNING now, scored at the last stage
            self._open_trial(cand)
            self._parked.append(cand)
        rng = np.random.default_rng([self.seed, self.generation + 1, 7919])
        self._seen = {self._key(self.parent)}
        offspring = self._children(rng)
        self._stage = 0
        self._queue = offspring + (self._final_extras() if self._is_final() else [])

    def _final_extras(self) -> list[_Candidate]:
        """The parent re-scored on the last stage's windows, and queued trials (warm starts, retries)."""
        queued = [c for c in self._parked if c.role == "queued"]
        for cand in queued:
            self._parked.remove(cand)
        return [_Candidate(dict(self.parent), "parent"), *queued]

    def _merged(self, results: Sequence[_Candidate]) -> _Candidate | None:
        """``evo.merge``: the parent plus the level changes of every offspring of the last stage that
        beat the re-scored parent (best first, leaving out any whose changes would leave a group's
        bounds), or None when fewer than two did. Other parameters come from the best of them."""
        parent = next((c for c in results if c.role == "parent"), None)
        if parent is None or self.grid is None:
            return None
        better = [c for c in results if c.role == "offspring" and c.value < parent.value]
        if len(better) < 2:
            return None
        base = self.grid.levels_of({g: self.parent[g] for g in self.space.groups})
        levels, used = dict(base), 0
        for cand in better:
            delta = {g: n - base[g] for g, n in self.grid.levels_of({g: cand.params[g] for g in base}).items()}
            trial = {g: levels[g] + delta[g] for g in base}
            if all(self.grid.bounds[g][0] <= n <= self.grid.bounds[g][1] for g, n in trial.items()):
                levels, used = trial, used + 1
        if used < 2:
            return None
        child = self.space.snap_kv(self._at_levels(better[0].params, levels))
        if self._key(child) in self._seen:
            return None
        self._seen.add(self._key(child))
        return _Candidate(child, "merged")

    def _at_levels(self, params: Mapping[str, Any], levels: Mapping[str, int]) -> dict[str, Any]:
        """``params`` with each search group's ratio set to its level in ``levels``."""
        out = dict(params)
        for g, ratio in self.grid.ratios(levels).items():
            out[g] = self.space.by_name[g].clip(ratio)
        return out

    def _children(self, rng: np.random.Generator) -> list[_Candidate]:
        """``evo.offspring`` distinct children; with ``evo.guide`` m, each the best of m mutations
        under a draw of the switch model (once it has seen a generation)."""
        guided = self.model is not None and self.model.stages >= len(self.config.stages)
        mean = self.model.mean() if self.model is not None else None
        children: list[_Candidate] = []
        for _ in range(self.config.offspring):
            draw = self.model.draw(rng) if guided and self.config.guide > 1 else None
            options: list[dict[str, Any]] = []
            for _attempt in range(50):
                child = self._mutate(rng)
                if self._key(child) not in self._seen:
                    options.append(child)
                    if draw is None or len(options) == self.config.guide:
                        break
            if not options:
                options.append(child)  # every draw already seen: keep the last one
            best = options[0] if draw is None else min(options, key=lambda c: float(self._changes(c) @ draw))
            self._seen.add(self._key(best))
            predicted = None if mean is None else float(self._changes(best) @ mean)
            children.append(_Candidate(best, "offspring", predicted=predicted))
        return children

    def _changes(self, params: Mapping[str, Any], parent: Mapping[str, Any] | None = None) -> np.ndarray:
        """The switch model's columns for ``params`` against ``parent`` (default: the current one).

        ``evo.guide_fit`` "changes": each group's sparsity change ``d`` from the parent, in units of
        one switch, then ``d²`` (a diagonal second-order model around the parent: a Linear's slope,
        and the curvature that makes large moves cost more than their slope says). "sparsity": the
        difference of ``u`` and ``u²`` between the two, ``u`` a group's sparsity (from its starting
        value, in switch units): one quadratic per Linear in its own sparsity, so a stage scored
        around an earlier parent still says the right thing about the current one (the slope at the
        parent moves with it by the curvature)."""
        u, v = self._position(params), self._position(self.parent if parent is None else parent)
        return np.concatenate([u - v, u * u - v * v if self.config.guide_fit == "sparsity" else (u - v) ** 2])

    def _position(self, params: Mapping[str, Any]) -> np.ndarray:
        """Each group's sparsity from its starting value (the space's default), in switch units."""
        return np.array([(float(params[g]) - self._origin[g]) / self._unit for g in self.space.groups])

    def _regression(self, scored: Sequence[tuple[Mapping[str, Any], float]], parent: Mapping[str, Any]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """One stage's (parameters, value) pairs, all on the same windows, as the switch model's
        (columns, values)."""
        x = np.stack([self._changes(params, parent) for params, _ in scored]) if scored else np.zeros((0, self.model.size))
        return x, np.array([value for _, value in scored], dtype=float)

    def _replay(self) -> None:
        """Refit the switch model on the stored generations, stage by stage, as the run that scored
        them did: a generation enters the model when its last stage is told, so one stopped before
        (no re-scored parent) is left out there and here."""
        for _, trials in sorted(trials_by_generation(self.study.get_trials(deepcopy=False)).items()):
            rescored = [t for t in trials if t.user_attrs.get(EVO_ROLE) == "parent"]
            if not rescored:
                continue  # warm starts only, or stopped before its last stage
            parent = self._full(dict(rescored[0].params))
            modelled = [t for t in trials if t.user_attrs.get(EVO_ROLE) in MODELLED]
            for stage in range(len(self.config.stages)):
                self.model.observe(*self._regression([(self._full(dict(t.params)), t.intermediate_values[stage])
                                                      for t in modelled if stage in t.intermediate_values], parent))

    def _mutate(self, rng: np.random.Generator) -> dict[str, Any]:
        child = dict(self.parent)
        K = self.config.max_swaps
        def swaps() -> int:  # the smaller of two uniform draws: few swaps are likelier
            return int(min(rng.integers(1, K + 1), rng.integers(1, K + 1)))
        if self.grid is not None:
            levels = self.grid.levels_of({g: child[g] for g in self.space.groups})
            magnitude = (sparsity_magnitude(self.grid.numels, self.grid.step, self.config.switch_sparsity)
                         if self.config.switch_sparsity else None)
            share = self.config.block_switch if self._blocks else 0.0
            for _ in range(swaps()):  # each a block switch with probability evo.block_switch (no draw when 0)
                levels = (block_switch(levels, self.grid.bounds, self._blocks, rng, magnitude)
                          if share and rng.random() < share
                          else level_switch(levels, self.grid.bounds, 1, rng, magnitude=magnitude))
            child = self._at_levels(child, levels)
        if self.kv_switched:
            bits = {n: int(child[n]) for n in sorted(self.kv_switched)}
            switched, raised = bit_switch(bits, self.space.kv_ladder, swaps(), rng)
            child = self.space.snap_kv({**child, **switched}, protect=raised)
        if self.others:
            rate = 1.0 / len(self.others)
            leveled = self.grid is not None or bool(self.kv_switched)
            forced = None if leveled else int(rng.integers(len(self.others)))
            for i, p in enumerate(self.others):
                if i == forced or rng.random() < rate:
                    child[p.name] = _step(p, child[p.name], rng)
        return child

    @staticmethod
    def _key(params: Mapping[str, Any]) -> tuple:
        return tuple(sorted((k, round(v, 10) if isinstance(v, float) else v) for k, v in params.items()))

    # ------------------------------------------------------------------------------ the store
    def _propose(self, cand: _Candidate) -> Proposal:
        if cand.number is None:
            self._open_trial(cand)
        self._out[cand.number] = cand
        attrs = {**cand.attrs, GENERATION: self.generation}
        return Proposal(cand.number, dict(cand.params), attrs, cand.trial_id, self._windows(), self._is_final())

    def _open_trial(self, cand: _Candidate) -> None:
        """Create the candidate's RUNNING trial, all parameters in one transaction (a queued
        candidate pops a WAITING one instead; foreign WAITING trials popped on the way join this
        generation's last stage)."""
        generation = self.generation
        if not cand.waiting:
            params = {k: self.space.by_name[k].clip(v) for k, v in cand.params.items()}
            attrs = {GENERATION: generation, SOURCE: EVO_SOURCE, EVO_ROLE: cand.role}
            if cand.predicted is not None:
                attrs[EVO_PREDICTED] = cand.predicted
            cand.number, cand.trial_id = create_running_trial(self.study, params, self.distributions, attrs)
            cand.params, cand.attrs = params, attrs
            return
        trial = self.study.ask(fixed_distributions=self.distributions)  # pops a WAITING trial
        cand.number, cand.trial_id = trial.number, trial_id_of(trial)
        cand.params, cand.attrs = dict(trial.params), dict(trial.user_attrs)
        for key, value in ((GENERATION, generation), (SOURCE, EVO_SOURCE), (EVO_ROLE, "queued")):
            trial.set_user_attr(key, value)

    def _waiting(self) -> list[_Candidate]:
        if count_trials(self.study, TrialState.WAITING) == 0:  # a count, not a re-read of the RUNNING trials
            return []
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return [_Candidate(dict(t.params), "queued", attrs=dict(t.user_attrs), waiting=True) for t in trials]

    def _has_seeded(self) -> bool:
        return any(t.user_attrs.get(SOURCE) == EVO_SOURCE for t in
                   self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def _stored_parent(self) -> dict[str, Any] | None:
        """Parameters of the stored parent (resume), else of the best COMPLETE warm start."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        record = self.study.user_attrs.get(PARENT_ATTR)
        if record is not None:
            for t in complete:
                if t.number == record.get("trial"):
                    return self._full(dict(t.params))
        warm = [t for t in complete if t.user_attrs.get(WARM_START)]
        return self._full(dict(min(warm, key=lambda t: t.values[0]).params)) if warm else None

    def _full(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**self.space.defaults(), **{k: v for k, v in params.items() if k in self.space.by_name}}


def _step(param, value: Any, rng: np.random.Generator) -> Any:
    """An ordinal neighbour of ``value`` (choices and integers: ±1; floats: Gaussian, σ = range/10)."""
    if isinstance(param, ChoiceParam):
        i = param.choices.index(param.clip(value))
        j = min(len(param.choices) - 1, max(0, i + (1 if rng.random() < 0.5 else -1)))
        if j == i:
            j = i - 1 if i > 0 else min(i + 1, len(param.choices) - 1)
        return param.choices[j]
    if isinstance(param, IntParam):
        return param.clip(value + (1 if rng.random() < 0.5 else -1))
    if isinstance(param, FloatParam):
        return param.clip(float(value) + float(rng.normal(0.0, (param.high - param.low) / 10)))
    return value
