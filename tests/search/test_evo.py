"""The evo sampler: level grid and level switch, multi-stage selection in the store, resume, the
stage's windows reaching the evaluator, and the level database (SparseGPT) behind trials."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState
from scipy.stats import spearmanr

from sparsealloc.core.errors import SpecError
from sparsealloc.core.keys import SPEC_ATTR
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.core.types import Outcome
from sparsealloc.objectives import EvalContext, TrialEvaluator
from sparsealloc.objectives.reconstruction import forward_errors
from sparsealloc.pruning.apply import prune_
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.orchestrator import run_study
from sparsealloc.search.samplers.evo import (PARENT_ATTR, EvoSampler, block_roles, block_switch, level_switch, sparsity_magnitude, stage_windows,
                                             stratum_counts)
from sparsealloc.search.session import check_existing_study, open_sampler
from sparsealloc.spaces.levels import LevelGrid, balance
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import CalibrationSpec, EvoSpec, MetricSpec, StudySpec
from sparsealloc.storage.rdb import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
TARGET = 0.6


def layout(n_blocks: int = 4) -> SimpleNamespace:
    blocks = [f"model.layers.{i}" for i in range(n_blocks)]
    linears, block_of, numels = [], {}, {}
    for i, block in enumerate(blocks):
        for kind, size in (("self_attn.k_proj", 32 * 8), ("self_attn.q_proj", 32 * 32), ("mlp.down_proj", 32 * 86)):
            name = f"{block}.{kind}"
            linears.append(name)
            block_of[name] = block
            numels[name] = size
    return SimpleNamespace(blocks=blocks, linears=linears, block_of=block_of, numels=numels,
                           attention=[f"{b}.self_attn" for b in blocks])


# ----------------------------------------------------------------------------- levels (pure)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), swaps=st.integers(1, 6), step=st.sampled_from([0.01, 0.05, 0.3]))
def test_level_switches_keep_the_budget_exact_and_the_bounds(seed, swaps, step):
    lay = layout()
    grid = LevelGrid.build(lay.numels, TARGET, 0.3, 0.9, step)
    rng = np.random.default_rng(seed)
    levels = {g: 0 for g in lay.numels}
    for _ in range(5):
        levels = level_switch(levels, grid.bounds, swaps, rng)
        assert sum(levels.values()) == 0
        assert all(grid.bounds[g][0] <= v <= grid.bounds[g][1] for g, v in levels.items())
        ratios = grid.ratios(levels)
        mean = sum(ratios[g] * lay.numels[g] for g in ratios) / sum(lay.numels.values())
        assert abs(mean - TARGET) < 1e-12
        assert all(0.3 - 1e-9 <= r <= 0.9 + 1e-9 for r in ratios.values())
        assert grid.levels_of(ratios) == levels  # ratios on the grid round-trip


def test_level_switch_moves_levels_one_at_a_time():
    grid = LevelGrid.build(layout().numels, TARGET, 0.3, 0.9, 0.05)
    levels = {g: 0 for g in grid.numels}
    child = level_switch(levels, grid.bounds, 1, np.random.default_rng(0))
    moved = {g: v for g, v in child.items() if v}
    assert sorted(moved.values()) == [-1, 1]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), swaps=st.integers(1, 4))
def test_sparsity_scaled_switches_move_the_smaller_group_by_about_the_asked_sparsity(seed, swaps):
    lay = layout()
    grid = LevelGrid.build(lay.numels, TARGET, 0.3, 0.9, 0.01)
    magnitude = sparsity_magnitude(grid.numels, grid.step, 0.05)
    rng = np.random.default_rng(seed)
    levels = {g: 0 for g in lay.numels}
    for _ in range(4):
        child = level_switch(levels, grid.bounds, 1, rng, magnitude=magnitude)
        assert sum(child.values()) == 0  # the budget stays exact
        assert all(grid.bounds[g][0] <= v <= grid.bounds[g][1] for g, v in child.items())
        moved = {g: child[g] - levels[g] for g in child if child[g] != levels[g]}
        (a, down), (b, up) = sorted(moved.items(), key=lambda kv: kv[1])
        assert up == -down >= 1
        smaller = min(a, b, key=lambda g: grid.numels[g])
        change = up * grid.step / grid.numels[smaller]
        room = min(levels[a] - grid.bounds[a][0], grid.bounds[b][1] - levels[b])
        # About 0.05 for the smaller group, unless a bound cut the move short.
        assert abs(change - 0.05) <= grid.step / grid.numels[smaller] or up == room
        levels = level_switch(child, grid.bounds, swaps, rng, magnitude=magnitude)
        assert sum(levels.values()) == 0
    # The smaller group sets the move: 0.05 · 256 / 3 = 4.3 levels; below one level, still one.
    assert sparsity_magnitude({"k": 256, "d": 2752}, 3, 0.05)("d", "k") == 4
    assert sparsity_magnitude({"k": 256, "d": 2752}, 30, 0.05)("d", "k") == 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scaled=st.booleans())
def test_block_switches_move_one_block_to_another_role_for_role_on_an_exact_budget(seed, scaled):
    lay = layout(5)
    groups = {f"sparsity/module/{n}": [n] for n in lay.linears}
    blocks = block_roles(groups, lay.block_of)
    assert sorted(blocks) == lay.blocks and all(sorted(roles) == ["mlp.down_proj", "self_attn.k_proj",
                                                                  "self_attn.q_proj"] for roles in blocks.values())
    grid = LevelGrid.build({g: lay.numels[m[0]] for g, m in groups.items()}, TARGET, 0.3, 0.9, 0.01)
    magnitude = sparsity_magnitude(grid.numels, grid.step, 0.05) if scaled else None
    rng = np.random.default_rng(seed)
    levels = {g: 0 for g in grid.numels}
    for _ in range(12):  # up to the bounds and back
        child = block_switch(levels, grid.bounds, blocks, rng, magnitude)
        assert sum(child.values()) == 0
        assert all(grid.bounds[g][0] <= v <= grid.bounds[g][1] for g, v in child.items())
        moved = {g: child[g] - levels[g] for g in child if child[g] != levels[g]}
        by_block: dict[str, dict[str, int]] = {}
        for g, delta in moved.items():
            name = groups[g][0]
            by_block.setdefault(lay.block_of[name], {})[name.removeprefix(lay.block_of[name] + ".")] = delta
        assert len(by_block) in (0, 2)  # two blocks or, where every pair is at a bound, none
        if by_block:
            (_, one), (_, other) = by_block.items()
            assert sorted(one) == sorted(other) and all(one[r] == -other[r] != 0 for r in one)  # role for role
            assert len({np.sign(d) for d in one.values()}) == 1  # one block gives, the other takes
            if not scaled:
                assert {abs(d) for d in one.values()} == {1}
        levels = child
    # Groups of several Linears have no one role: no block switches there.
    assert block_roles({"sparsity/block_0": lay.linears[:3]}, lay.block_of) == {}


def test_block_switch_is_checked_and_enters_the_hash_only_when_on():
    off = StudySpec(sampler="evo")
    assert off.evo.block_switch == 0.0
    stored = off.to_dict()
    del stored["evo"]["block_switch"]
    assert StudySpec.from_stored(stored).spec_hash() == off.spec_hash()
    assert StudySpec(sampler="evo", evo=EvoSpec(block_switch=0.25)).spec_hash() != off.spec_hash()
    for bad in (-0.1, 1.5, "x", None):
        with pytest.raises(SpecError, match="evo.block_switch"):
            StudySpec(sampler="evo", evo=EvoSpec(block_switch=bad))
    with pytest.raises(SpecError, match="evo.block_switch needs one search group per Linear.*'block'"):
        StudySpec.from_dict({"sampler": "evo", "evo": {"block_switch": 0.25}, "layerwise": {"granularity": "block"}})
    assert StudySpec.from_dict({"sampler": "evo", "evo": {"block_switch": 0.25}}).layerwise.granularity == "module"


def test_the_sparsity_window_is_wider_for_evo_by_default_and_kept_where_given():
    assert StudySpec(sampler="evo").layerwise.radius == 0.5 and StudySpec().layerwise.radius == 0.3
    assert StudySpec.from_dict({"sampler": "evo", "layerwise": {"radius": 0.3}}).layerwise.radius == 0.3


def test_switch_sparsity_is_checked_and_enters_the_hash():
    assert StudySpec(sampler="evo").evo.switch_sparsity == 0.05 and StudySpec().layerwise.level_step == 0.01
    assert StudySpec(sampler="evo").spec_hash() != StudySpec(sampler="evo", evo=EvoSpec(switch_sparsity=0.0)).spec_hash()
    assert StudySpec(sampler="evo").spec_hash() != StudySpec(sampler="evo", evo=EvoSpec(switch_sparsity=0.04)).spec_hash()
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(SpecError, match="evo.switch_sparsity"):
            StudySpec(sampler="evo", evo=EvoSpec(switch_sparsity=bad))


def test_merge_is_checked_and_enters_the_hash_only_when_on():
    off = StudySpec(sampler="evo")
    assert off.evo.merge is False
    stored = off.to_dict()
    del stored["evo"]["merge"]  # a study stored before the field existed ran without merging
    assert StudySpec.from_stored(stored).evo.merge is False and StudySpec.from_stored(stored).spec_hash() == off.spec_hash()
    assert StudySpec(sampler="evo", evo=EvoSpec(merge=True)).spec_hash() != off.spec_hash()
    for bad in (1, "yes", None):
        with pytest.raises(SpecError, match="evo.merge must be true or false"):
            StudySpec(sampler="evo", evo=EvoSpec(merge=bad))


def test_guide_is_checked_and_older_studies_keep_uniform_switches():
    today = StudySpec(sampler="evo")
    assert today.evo.guide == 32 and today.evo.guide_fit == "changes"
    # A study made while the default was 8 stored it, and keeps it.
    made_with_8 = StudySpec(sampler="evo", evo=EvoSpec(guide=8))
    assert StudySpec.from_stored(made_with_8.to_dict()).evo.guide == 8
    assert StudySpec.from_stored(made_with_8.to_dict()).spec_hash() == made_with_8.spec_hash() != today.spec_hash()
    stored = today.to_dict()
    del stored["evo"]["guide"]  # a study stored before the field existed drew its switches uniformly
    older = StudySpec.from_stored(stored)
    assert older.evo.guide == 0 and older.spec_hash() != today.spec_hash()
    assert older.spec_hash() == StudySpec(sampler="evo", evo=EvoSpec(guide=0)).spec_hash()
    for bad in (-1, 2.5, "8", None, True):
        with pytest.raises(SpecError, match="evo.guide must be an integer >= 0"):
            StudySpec(sampler="evo", evo=EvoSpec(guide=bad))


#: Specs as stored by the code before the level-step, switch-sparsity and evo radius defaults changed
#: (0.02, 0 and 0.3), with the hashes that code gave them.
OLDER_STUDIES = [
    ({"sampler": "evo"}, "9d66fbc6c246"),
    ({"sampler": "evo", "metric": {"name": "sparsegpt"}}, "636ca73eb075"),
    ({}, "d84f20ecf2a2"),
    ({"sampler": "evo", "evo": {"switch_sparsity": 0.05}, "layerwise": {"level_step": 0.01}}, "f00a7cc1f7d4"),
]


@pytest.mark.parametrize("given, digest", OLDER_STUDIES)
def test_stored_specs_of_older_studies_keep_their_grid_mutation_and_hash(given, digest):
    stored = StudySpec.from_dict({**given, "layerwise": {"level_step": 0.02, "radius": 0.3, **given.get("layerwise", {})},
                                  "evo": {"switch_sparsity": 0.0, **given.get("evo", {})}}).to_dict()
    del stored["evo"]["guide"]  # stored before evo.guide existed
    assert StudySpec.from_stored(stored).spec_hash() == digest
    # Made before the fields existed: the stored spec lacks them and ran with their values of the time.
    if given.get("layerwise", {}).get("level_step") is None:
        del stored["layerwise"]["level_step"], stored["evo"]["switch_sparsity"]
        older = StudySpec.from_stored(stored)
        assert (older.layerwise.level_step, older.evo.switch_sparsity) == (0.02, 0.0)
        assert older.spec_hash() == digest
        newer = StudySpec.from_dict(stored)  # a user's spec without the keys gets today's defaults
        assert (newer.layerwise.level_step, newer.evo.switch_sparsity) == (0.01, 0.05)
        assert newer.spec_hash() != digest


def test_rerunning_an_older_evo_study_with_todays_defaults_names_the_grid_difference(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    older = StudySpec.from_dict({"name": "old", "sampler": "evo", "layerwise": {"level_step": 0.02, "radius": 0.3},
                                 "evo": {"switch_sparsity": 0.0}}).to_dict()
    del older["layerwise"]["level_step"], older["evo"]["switch_sparsity"]
    study = optuna.create_study(storage=storage, study_name="old")
    study.set_user_attr(SPEC_ATTR, older)
    check_existing_study(StudySpec.from_stored(older), storage)  # resume: same spec
    with pytest.raises(SpecError, match=r"layerwise.level_step: stored 0.02, given 0.01.*study resume"):
        check_existing_study(StudySpec(name="old", sampler="evo"), storage)


def test_level_switch_never_lowers_the_only_group_that_could_rise():
    # "a" can go both ways, "b" only down: every switch must lower "b" and raise "a" (the old
    # mutation drew "a" to lower half the time and then had no group left to raise).
    bounds = {"a": (-2, 2), "b": (-2, 0)}
    for seed in range(50):
        child = level_switch({"a": 0, "b": 0}, bounds, 1, np.random.default_rng(seed))
        assert child == {"a": 1, "b": -1}


def test_balance_repairs_an_off_budget_genome_near_its_preferred_levels():
    bounds = {"a": (-3, 3), "b": (-3, 3), "c": (0, 0)}
    out = balance({"a": 2, "b": 1, "c": 0}, bounds, {"a": 1.6, "b": 1.0, "c": 0.0})
    assert sum(out.values()) == 0 and out["c"] == 0
    assert out == {"a": 0, "b": 0, "c": 0} or abs(out["a"] - 1.6) + abs(out["b"] - 1.0) <= 3.6


def test_leveled_space_snaps_any_ratios_onto_an_exact_budget():
    lay = layout()
    spec = StudySpec(target_sparsity=TARGET, sampler="tpe", space=("layerwise",),
                     metric=MetricSpec(name="sparsegpt"))
    space = SearchSpace(spec, lay, leveled=True)
    raw = {p.name: 0.35 + 0.5 * i / len(space.params) for i, p in enumerate(space.params)}
    decoded = space.decode(raw)
    mean = sum(decoded.sparsity[n] * lay.numels[n] for n in lay.linears) / sum(lay.numels.values())
    assert abs(mean - TARGET) < 1e-12
    levels = space.levels.levels_of(decoded.group_ratios)
    assert space.levels.ratios(levels) == pytest.approx(decoded.group_ratios, abs=1e-15)
    assert SearchSpace(spec, lay).levels is None  # TPE on a mask-only metric stays continuous


def test_stage_windows_are_fresh_per_stage_and_reproducible():
    a = stage_windows(0, 3, 0, 4, 32)
    assert a == stage_windows(0, 3, 0, 4, 32) and len(set(a)) == 4 and all(0 <= i < 32 for i in a)
    assert stage_windows(0, 4, 0, 4, 32) != a and stage_windows(0, 3, 1, 4, 32) != a
    assert stage_windows(0, 3, 0, 32, 32) is None  # the whole pool


@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=5), size=st.integers(1, 12), seed=st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_stratum_counts_sum_to_the_stage_and_stay_within_one_of_each_share(sizes, size, seed):
    counts = stratum_counts(sizes, size, np.random.default_rng(seed))
    assert sum(counts) == size
    for n, c in zip(sizes, counts):
        assert abs(c - size * n / sum(sizes)) < 1


def test_stratified_stage_windows_draw_each_stratum_in_proportion_and_every_window_alike():
    # A pool of 19 windows of one text and 13 of another (the benchmark's mixed pool, by chance).
    strata = [0] * 19 + [1] * 13
    draws = [stage_windows(1, g, 0, 2, 32, strata) for g in range(4000)]
    assert all(len(set(d)) == 2 for d in draws)
    # Every 2-window stage holds at least one window of each text unless 2·19/32 rounds up for text 0.
    both = sum(1 for d in draws if {strata[i] for i in d} == {0, 1})
    assert both / len(draws) == pytest.approx(13 * 2 / 32, abs=0.03)  # text 1 gets its 0.81 extra in 81%
    assert not [d for d in draws if {strata[i] for i in d} == {1}]  # never two windows of text 1
    unstratified = [stage_windows(1, g, 0, 2, 32) for g in range(4000)]
    assert sum(1 for d in unstratified if {strata[i] for i in d} == {0, 1}) / 4000 < 0.6  # 2·19·13/(32·31)
    # Each window is drawn at the same rate, 2/32 (so the stage mean is unbiased).
    rate = np.bincount([i for d in draws for i in d], minlength=32) / len(draws)
    assert rate == pytest.approx(np.full(32, 2 / 32), abs=0.015)
    # Reproducible, and one stratum is the plain draw.
    assert stage_windows(1, 7, 0, 2, 32, strata) == draws[7]
    assert stage_windows(1, 7, 0, 2, 32, [3] * 32) == unstratified[7]


# ----------------------------------------------------------------------------- multi-stage in the store
class RampEvaluator:
    """Error = Σ n·(r − ramp)² over Linears (minimum at a depth ramp, not at uniform); records the
    windows and budgets it was called with."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        lin = space.layout.linears
        self.ramp = {n: TARGET - 0.15 + 0.3 * i / (len(lin) - 1) for i, n in enumerate(lin)}
        self.calls: list[tuple[int, ...] | None] = []

    def error(self, params) -> float:
        decoded = self.space.decode(params)
        numels = self.space.layout.numels
        return sum(numels[n] * (r - self.ramp[n]) ** 2 for n, r in decoded.sparsity.items()) / sum(numels.values())

    def __call__(self, params, windows=None) -> Outcome:
        self.calls.append(windows)
        plan = self.space.decode(params).to_plan(model={"name": "fake"})
        return Outcome("complete", (self.error(params),), attrs={"plan": plan.to_dict()})


def evo_spec(name: str, **evo) -> StudySpec:
    return StudySpec(name=name, target_sparsity=TARGET, sampler="evo", seed=5,
                     evo=EvoSpec(**{"offspring": 6, "stages": ((2, 2), (8, 1)), **evo}))


def evolved(spec: StudySpec, store: str, generations: int, blocks: int = 4, evaluator_class=None):
    """``spec``'s evo sampler, started at uniform, run until ``generations`` generations are done."""
    space = SearchSpace(spec, layout(blocks))
    evaluator = (evaluator_class or RampEvaluator)(space)
    sampler = open_sampler(spec, open_storage(store), space)
    sampler.enqueue(space.defaults(), "uniform")
    while sampler.generation < generations:
        for p in sampler.ask(16):
            sampler.tell(p.trial_number, evaluator(p.params, p.windows))
    return sampler, evaluator


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'evo.db'}"


def test_stages_prune_the_eliminated_and_complete_the_last_stage(store):
    spec = evo_spec("stages")
    space = SearchSpace(spec, layout())
    sampler = open_sampler(spec, open_storage(store), space)
    assert isinstance(sampler, EvoSampler) and space.levels is not None
    sampler.enqueue(space.defaults(), "uniform")
    evaluator = RampEvaluator(space)
    run_study(sampler, LocalDispatcher(evaluator), n_trials=10)
    study = sampler.study
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(complete) == 10
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # Stage 0 on 2 windows of the 16-window pool, the last stage on 8 (seed: the warm start, at 8).
    assert {len(w) for w in evaluator.calls} == {2, 8}
    per_generation: dict[int, list] = {}
    for t in trials:
        per_generation.setdefault(t.user_attrs["generation"], []).append(t)
    assert per_generation[0][0].user_attrs["warm_start"] == "uniform"
    full = [g for g in per_generation if g > 0 and len(per_generation[g]) == 7]  # 6 offspring + parent
    assert full, "no whole generation ran"
    for g in full:
        states = [t.state for t in per_generation[g]]
        assert states.count(TrialState.PRUNED) == 4 and states.count(TrialState.COMPLETE) == 3
        for t in per_generation[g]:
            if t.state == TrialState.PRUNED and t.user_attrs.get("evo_eliminated"):
                assert t.user_attrs["stage"] == 0 and list(t.intermediate_values) == [0]
            elif t.user_attrs["evo_role"] == "offspring":  # a survivor: both stages recorded
                assert t.user_attrs["stage"] == 1 and sorted(t.intermediate_values) == [0, 1]
    assert any(t.user_attrs.get("evo_eliminated") for t in pruned)
    # Selection: the parent never gets worse, and the search beats its uniform start.
    parent = study.user_attrs[PARENT_ATTR]
    best = trials[parent["trial"]]
    assert best.values[0] <= per_generation[0][0].values[0]
    for t in complete:
        assert abs(sum(AllocationPlan.from_dict(t.user_attrs["plan"]).sparsity[n] * layout().numels[n]
                       for n in layout().linears) / sum(layout().numels.values()) - TARGET) < 1e-9


def test_parent_improves_over_generations_and_resume_continues(store):
    spec = evo_spec("resume", offspring=8, stages=((4, 2), (8, 1)))
    space = SearchSpace(spec, layout())
    evaluator = RampEvaluator(space)
    sampler = open_sampler(spec, open_storage(store), space)
    run_study(sampler, LocalDispatcher(evaluator), n_trials=30)
    first = sampler.study.user_attrs[PARENT_ATTR]
    first_value = evaluator.error(sampler.parent)
    start_value = evaluator.error(space.defaults())
    assert first_value < 0.5 * start_value
    resumed = open_sampler(spec, open_storage(store), space)
    assert resumed.parent == pytest.approx(sampler.parent)
    assert resumed.generation > first["generation"]  # after the last stored generation (a cut one too)
    run_study(resumed, LocalDispatcher(evaluator), n_trials=60)
    assert evaluator.error(resumed.parent) <= first_value
    generations = [t.user_attrs["generation"] for t in resumed.study.get_trials(deepcopy=False)]
    assert generations == sorted(generations)  # the generation index continues


def calibration_file(tmp_path, clusters) -> str:
    from sparsealloc.pruning.calibration.select import FORMAT, VERSION, CalibrationSet, write_calibration_set
    header = {"format": FORMAT, "version": VERSION, "vocab_size": 50, "seq_len": 4, "n": len(clusters)}
    records = tuple({"index": i, "cluster": c, "input_ids": [i % 50] * 4} for i, c in enumerate(clusters))
    return str(write_calibration_set(CalibrationSet(torch.zeros(1), header, records), tmp_path / "calib.jsonl"))


@pytest.mark.parametrize("stratified", [False, True])
def test_stage_windows_come_from_the_windows_file_and_its_strata(store, tmp_path, stratified):
    # 12 windows in the file while calibration.samples says 16: the pool is the file's 12.
    clusters = [0] * 9 + [1] * 3 if stratified else [None] * 12
    spec = replace(evo_spec("file", offspring=6, stages=((4, 2), (8, 1))),
                   calibration=CalibrationSpec(samples=16, windows_file=calibration_file(tmp_path, clusters)))
    space = SearchSpace(spec, layout())
    sampler = open_sampler(spec, open_storage(store), space)
    assert sampler.pool == 12 and sampler.strata == (tuple(clusters) if stratified else None)
    evaluator = RampEvaluator(space)
    run_study(sampler, LocalDispatcher(evaluator), n_trials=12)
    stage0 = [w for w in evaluator.calls if w is not None and len(w) == 4]
    assert stage0 and all(max(w) < 12 for w in evaluator.calls if w is not None)
    if stratified:  # 4 · 3/12 = exactly one window of the small stratum per stage-0 draw
        assert all(sum(1 for i in w if clusters[i] == 1) == 1 for w in stage0)


def test_a_run_stopped_between_stages_prunes_its_parked_trials(store):
    spec = evo_spec("stopped")
    space = SearchSpace(spec, layout())
    sampler = open_sampler(spec, open_storage(store), space)
    proposals = sampler.ask(6)
    assert len(proposals) == 6 and not any(p.final for p in proposals)
    for p in proposals:
        assert p.windows is not None and len(p.windows) == 2 and p.trial_id is not None
        sampler.tell(p.trial_number, Outcome("complete", (float(p.trial_number),)))
    assert sampler.parked == 6
    survivors = sampler.ask(10)  # 2 survivors and the parent, on 8 windows
    assert len(survivors) == 3 and all(p.final and len(p.windows) == 8 for p in survivors)
    assert sorted(p.trial_number for p in survivors[:2]) == [0, 1]
    sampler.close()
    states = [t.state for t in sampler.study.get_trials(deepcopy=False)]
    assert states.count(TrialState.PRUNED) == 4 and states.count(TrialState.RUNNING) == 3  # in flight


def _final_stage(sampler):
    """Stage 0 told with the trial number as value (trials 0 and 1 survive); the last stage asked."""
    for p in sampler.ask(6):
        sampler.tell(p.trial_number, Outcome("complete", (float(p.trial_number),)))
    return {sampler._out[p.trial_number].role + str(i): p for i, p in enumerate(sampler.ask(10))}


@pytest.mark.parametrize("merged_value, adopted", [(1.0, True), (3.0, False)])
def test_merge_checks_the_sum_of_the_improving_switches_against_the_best_on_fresh_windows(store, merged_value,
                                                                                          adopted):
    spec = evo_spec(f"merge-{adopted}", merge=True)
    space = SearchSpace(spec, layout())
    sampler = open_sampler(spec, open_storage(store), space)
    grid, parent = space.levels, dict(sampler.parent)
    final = _final_stage(sampler)
    assert sorted(final) == ["offspring0", "offspring1", "parent2"]
    for key, value in (("offspring0", 5.0), ("offspring1", 6.0), ("parent2", 10.0)):
        sampler.tell(final[key].trial_number, Outcome("complete", (value,)))
    merged, rescored = sampler.ask(10)
    roles = [sampler._out[p.trial_number].role for p in (merged, rescored)]
    assert roles == ["merged", "rescored"] and merged.final and rescored.final
    # Both on the same fresh windows, of the last stage's size, not the ones that selected the parts.
    assert merged.windows == rescored.windows and len(merged.windows) == 8
    assert merged.windows != final["parent2"].windows
    assert rescored.params == final["offspring0"].params
    levels = {name: grid.levels_of({g: p.params[g] for g in space.groups})
              for name, p in (("merged", merged), ("a", final["offspring0"]), ("b", final["offspring1"]))}
    base = grid.levels_of({g: parent[g] for g in space.groups})
    assert levels["merged"] == {g: levels["a"][g] + levels["b"][g] - base[g] for g in base}
    assert sum(levels["merged"].values()) == sum(base.values())  # the budget stays exact
    sampler.tell(merged.trial_number, Outcome("complete", (merged_value,)))
    sampler.tell(rescored.trial_number, Outcome("complete", (2.0,)))
    sampler.ask(1)  # selection, then the next generation
    chosen = sampler.study.user_attrs[PARENT_ATTR]["trial"]
    assert chosen == (merged.trial_number if adopted else final["offspring0"].trial_number)
    assert sampler.generation == 1
    trial = sampler.study.trials[merged.trial_number]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["evo_role"] == "merged"


@pytest.mark.parametrize("merge, values", [(True, (5.0, 11.0, 10.0)), (False, (5.0, 6.0, 10.0))])
def test_no_merge_without_two_improving_offspring_or_when_off(store, merge, values):
    spec = evo_spec("nomerge", merge=merge)
    sampler = open_sampler(spec, open_storage(store), SearchSpace(spec, layout()))
    final = _final_stage(sampler)
    for key, value in zip(("offspring0", "offspring1", "parent2"), values):
        sampler.tell(final[key].trial_number, Outcome("complete", (value,)))
    nxt = sampler.ask(10)
    assert sampler.generation == 1 and nxt and not nxt[0].final  # straight to the next generation's stage 0
    assert sampler.study.user_attrs[PARENT_ATTR]["trial"] == final["offspring0"].trial_number


def test_merge_keeps_the_budget_and_helps_on_a_separable_error(store):
    errors, adopted = {False: [], True: []}, 0
    for seed in range(4):
        for merge in (False, True):
            spec = replace(evo_spec(f"separable-{seed}-{merge}", merge=merge, offspring=8, guide=0), seed=seed)
            sampler, evaluator = evolved(spec, store, 20, blocks=6)  # the same number of generations each
            space = sampler.space
            trials = sampler.study.get_trials(deepcopy=False)
            merged = [t for t in trials if t.user_attrs.get("evo_role") == "merged"]
            assert bool(merged) == merge
            numels = space.layout.numels
            for t in merged:
                assert t.state == TrialState.COMPLETE
                sparsity = AllocationPlan.from_dict(t.user_attrs["plan"]).sparsity
                assert abs(sum(sparsity[n] * numels[n] for n in numels) / sum(numels.values()) - TARGET) < 1e-9
            adopted += len({t.number for t in merged} & set(sampler.study.user_attrs[PARENT_ATTR]["history"]))
            errors[merge].append(evaluator.error(sampler.parent))
    # Improving switches on different Linears add up on this error: generation for generation the
    # merged search is ahead (each seed alone is noisy), and merged candidates became parents.
    assert adopted > 0 and np.mean(errors[True]) < 0.8 * np.mean(errors[False])


def test_block_switches_find_a_depth_profile_faster(store):
    errors = {0.0: [], 0.5: []}
    for seed in range(4):
        for share in errors:
            spec = replace(evo_spec(f"blocks-{seed}-{share}", block_switch=share, offspring=8, guide=0), seed=seed)
            sampler, evaluator = evolved(spec, store, 20, blocks=8)  # the same number of generations each
            numels = sampler.space.layout.numels
            sparsity = sampler.space.decode(sampler.parent).sparsity
            assert abs(sum(sparsity[n] * numels[n] for n in numels) / sum(numels.values()) - TARGET) < 1e-9
            errors[share].append(evaluator.error(sampler.parent))
    # The error's minimum is a depth ramp: moving whole blocks gets there in fewer generations than
    # moving one Linear at a time.
    assert np.mean(errors[0.5]) < 0.6 * np.mean(errors[0.0])


class OffsetRampEvaluator(RampEvaluator):
    """:class:`RampEvaluator` plus an offset per set of windows, larger than the error itself (what
    the windows' own difficulty adds to a KL), the same for every candidate scored on them."""

    def __call__(self, params, windows=None) -> Outcome:
        outcome = super().__call__(params, windows)
        offset = 0.05 * np.random.default_rng(list(windows or ())).random()
        return replace(outcome, values=(outcome.values[0] + offset,))


def test_guide_records_predictions_and_helps_on_a_separable_error(store):
    errors, agreement = {0: [], 1: [], 8: []}, []
    for seed in range(4):
        for guide in (0, 1, 8) if seed < 2 else (0, 8):
            spec = replace(evo_spec(f"guide-{seed}-{guide}", guide=guide, offspring=8), seed=seed)
            sampler, evaluator = evolved(spec, store, 20, blocks=6, evaluator_class=OffsetRampEvaluator)
            offspring = [t for t in sampler.study.get_trials(deepcopy=False) if t.user_attrs.get("evo_role") == "offspring"]
            assert all(("evo_predicted" in t.user_attrs) == bool(guide) for t in offspring)
            errors[guide].append(evaluator.error(sampler.parent))
            if guide == 1:  # children drawn uniformly: does the model rank them as their first stage does?
                for generation in range(10, 20):
                    trials = [t for t in offspring if t.user_attrs["generation"] == generation]
                    predicted = [t.user_attrs["evo_predicted"] for t in trials]
                    agreement.append(spearmanr(predicted, [t.intermediate_values[0] for t in trials]).statistic)
    # guide 1 only records the model's predictions: the same search as guide 0, draw for draw.
    assert errors[1] == errors[0][:2]
    # The error is a sum over Linears: the model learns each Linear's slope and curvature from the
    # stages seen, ranks new children as the first stage then does (through each stage's own offset),
    # and children chosen by it improve more, generation for generation.
    assert np.mean(agreement) > 0.6
    assert np.mean(errors[8]) < 0.7 * np.mean(errors[0])


def test_guide_fit_sparsity_keeps_one_quadratic_per_linear_across_parents(store):
    # A fitness that is one quadratic per Linear in its own sparsity: with guide_fit "sparsity" the
    # columns of any (child, parent) pair give its exact change under one coefficient vector, wherever
    # the parent stands; the columns around the parent ("changes") do so only at the starting point.
    results = {}
    for fit in ("sparsity", "changes"):
        spec = evo_spec(f"fit-{fit}", guide=8, guide_fit=fit)
        space = SearchSpace(spec, layout())
        sampler = open_sampler(spec, open_storage(store), space)
        groups = list(space.groups)
        rng = np.random.default_rng(0)
        slope, curvature = rng.normal(size=len(groups)), rng.uniform(0.5, 2.0, size=len(groups))
        coefficients = np.concatenate([slope, curvature])

        def fitness(params):
            u = sampler._position(params)
            return float(slope @ u + curvature @ (u * u))

        errors = []
        for _ in range(5):
            parent = sampler._mutate(rng)  # parents away from the start, then their children
            sampler.parent = parent
            child = sampler._mutate(rng)
            errors.append(abs(sampler._changes(child, parent) @ coefficients - (fitness(child) - fitness(parent))))
        results[fit] = max(errors)
        sampler.close()
    assert results["sparsity"] < 1e-9 < results["changes"]
    for bad in ("absolute", None, 1):
        with pytest.raises(SpecError, match=r"evo.guide_fit must be one of \['changes', 'sparsity'\]"):
            StudySpec(sampler="evo", evo=EvoSpec(guide_fit=bad))


def test_a_resumed_study_refits_the_switch_model_on_the_stored_stages(store):
    spec = evo_spec("guide-resume", guide=4)
    sampler, evaluator = evolved(spec, store, 6, evaluator_class=OffsetRampEvaluator)
    for p in sampler.ask(1):  # stop inside the next generation's last stage: its first stage told
        sampler.tell(p.trial_number, evaluator(p.params, p.windows))
    assert sampler._stage == 1 and sampler._queue
    sampler.close()
    resumed = open_sampler(spec, open_storage(store), SearchSpace(spec, layout()))
    # Five guided generations (the first scores the warm start), two stages each; the stopped one is
    # in neither model.
    assert resumed.model.stages == sampler.model.stages == 2 * 5
    np.testing.assert_allclose(resumed.model.mean(), sampler.model.mean(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- the evaluator side
@pytest.fixture(scope="module")
def llama_ctx(model_builder, windows_builder):
    model = model_builder("llama")
    return EvalContext.build(model, windows_builder(8, 16, seed=2), batch_size=3, gram=True)


def test_windows_score_exactly_the_chosen_calibration_windows(llama_ctx, model_builder):
    sub = (1, 4, 6, 7)
    whole = forward_errors(llama_ctx, ("kl", "hidden", "logits"), windows=sub)
    alone = EvalContext.build(llama_ctx.model, llama_ctx.windows[list(sub)], batch_size=3)
    reference = forward_errors(alone, ("kl", "hidden", "logits"))
    assert whole == pytest.approx(reference, rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="window indices"):
        forward_errors(llama_ctx, ("hidden",), windows=(8,))


def test_sparsegpt_trials_stitch_the_level_database_and_apply_reproduces_them(llama_ctx, tmp_path):
    # float32 trials: the proxy of the applied model must equal the trial's to float rounding.
    spec = StudySpec(target_sparsity=0.5, sampler="evo", metric=MetricSpec(name="sparsegpt"), objectives=("kl",),
                     proxy_dtype="float32")
    evaluator = TrialEvaluator(llama_ctx, spec, database_root=str(tmp_path / "db"))
    db = evaluator.database
    assert db is not None and evaluator.space.levels is not None
    values = evaluator.space.defaults()
    groups = list(evaluator.space.groups)
    levels = {g: 0 for g in groups}
    levels[groups[0]], levels[groups[-1]] = 1, -1
    values.update(evaluator.space.levels.ratios(levels))
    outcome = evaluator(values)
    assert outcome.state == "complete", outcome.reason
    built = db.stats_summary()
    assert built.built == built.entries > 0 and outcome.attrs["database_build_seconds"] > 0
    plan = AllocationPlan.from_dict(outcome.attrs["plan"])
    assert plan.provenance["level_db"]["key"] == db.key
    # The same plan applied in place by prune_ (SparseGPT run again) scores the same proxy.
    model = copy.deepcopy(llama_ctx.model)
    prune_(model, plan, llama_ctx.stats)
    modules = dict(model.named_modules())
    for name, ratio in plan.sparsity.items():
        weight, _ = db.entry(name, ratio)
        assert torch.equal(modules[name].weight.data, weight)
    ctx2 = EvalContext.build(copy.deepcopy(llama_ctx.model), llama_ctx.windows, batch_size=3, gram=True)
    with torch.no_grad():
        for name in plan.sparsity:
            dict(ctx2.model.named_modules())[name].weight.data.copy_(modules[name].weight.data)
    ctx2.dense_hidden, ctx2.kl_terms = llama_ctx.dense_hidden, llama_ctx.kl_terms
    assert forward_errors(ctx2, ("kl",))["kl"] == pytest.approx(outcome.values[0], rel=1e-5)
    # A second study on the same model and calibration reuses the database: nothing is built.
    again = TrialEvaluator(llama_ctx, spec, database_root=str(tmp_path / "db"))
    assert again.database.folder == db.folder
    second = again(values)
    assert second.values == pytest.approx(outcome.values) and again.database.built == 0
    # Another calibration set is another database.
    other = EvalContext.build(llama_ctx.model, llama_ctx.windows[:4], batch_size=3, gram=True)
    assert TrialEvaluator(other, spec, database_root=str(tmp_path / "db")).database.key != db.key


@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_bfloat16_trials_run_a_copy_and_stay_close_to_float32(llama_ctx, tmp_path, metric):
    spec32 = StudySpec(target_sparsity=0.5, sampler="evo", metric=MetricSpec(name=metric), proxy_dtype="float32")
    spec16 = StudySpec(target_sparsity=0.5, sampler="evo", metric=MetricSpec(name=metric), proxy_dtype="bfloat16")
    assert StudySpec(sampler="evo").proxy_dtype == "auto" and spec16.spec_hash() != spec32.spec_hash()
    assert StudySpec().spec_hash() == StudySpec(proxy_dtype="float32").spec_hash()  # older studies' hashes kept
    dense = {n: p.detach().clone() for n, p in llama_ctx.model.named_parameters()}
    ev32 = TrialEvaluator(llama_ctx, spec32, database_root=str(tmp_path / "db"))
    ev16 = TrialEvaluator(llama_ctx, spec16, database_root=str(tmp_path / "db"))
    values = ev16.space.defaults()
    groups = list(ev16.space.groups)
    values.update(ev16.space.levels.ratios({g: (1 if i == 0 else -1 if i == len(groups) - 1 else 0)
                                            for i, g in enumerate(groups)}))
    out32, out16 = ev32(values), ev16(values)
    assert out32.state == out16.state == "complete"
    assert ev16.last_model is llama_ctx.compute_model(torch.bfloat16) and ev16.last_model is not llama_ctx.model
    assert ev16.last_model.dtype == torch.bfloat16 and ev32.last_model is llama_ctx.model
    assert out16.values[0] != out32.values[0]
    assert out16.values[0] == pytest.approx(out32.values[0], rel=0.1)
    # Nothing of the float32 model changed (weights are stitched into the copy, never written).
    assert all(torch.equal(p, dense[n]) for n, p in llama_ctx.model.named_parameters())
    with pytest.raises(SpecError, match="proxy_dtype"):
        StudySpec(proxy_dtype="int8")


@pytest.mark.parametrize("seconds, expected", [((1.0, 0.5), torch.bfloat16), ((0.5, 1.0), torch.float32)])
def test_auto_proxy_dtype_takes_bfloat16_only_where_it_is_faster(llama_ctx, monkeypatch, seconds, expected):
    """evo's default ``proxy_dtype: auto``: bfloat16 where a bfloat16 product beats float32 on the
    trial device (GPUs, AMX CPUs), float32 where it is slower (AVX2-only CPUs: several times)."""
    from sparsealloc.pruning.model import models

    monkeypatch.setattr(models, "bfloat16_speedup", lambda device, *a, **k: seconds)
    evaluator = TrialEvaluator(llama_ctx, StudySpec(target_sparsity=0.5, sampler="evo"))
    assert evaluator.proxy_dtype == expected
    assert evaluator(evaluator.space.defaults()).state == "complete" and evaluator.last_model.dtype == expected


def test_bfloat16_timing_ignores_one_slow_turn():
    """The dtype timing keeps each dtype's fastest turn: one slow bfloat16 product (a busy moment of
    the machine) must not make float32 look faster when bfloat16 is 3× faster in every other turn."""
    from sparsealloc.pruning.model import models

    calls = {"n": 0}
    clock = {"t": 0.0}
    # Turns alternate float32, bfloat16: each timed product is one start/stop pair of calls.
    durations = iter([3.0, 1.0, 3.0, 100.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0])

    def timer() -> float:
        calls["n"] += 1
        if calls["n"] % 2 == 0:  # a stop: the product took the next duration
            clock["t"] += next(durations)
        return clock["t"]

    fp32, bf16 = models.bfloat16_speedup(torch.device("cpu"), size=8, repeats=7, timer=timer)
    assert (fp32, bf16) == (3.0, 1.0)
    assert calls["n"] == 28


@pytest.mark.parametrize("url", ["sqlite", "memory"])
def test_running_trials_created_in_one_transaction_read_back_as_asked_ones(tmp_path, url):
    from optuna.distributions import FloatDistribution, IntDistribution

    from sparsealloc.storage.optuna_adapter import count_trials, create_running_trial

    storage = f"sqlite:///{tmp_path / 's.db'}" if url == "sqlite" else None
    study = optuna.create_study(storage=storage, study_name="t")
    dists = {f"p{i}": FloatDistribution(0.0, 0.9) for i in range(5)} | {"k": IntDistribution(-3, 3)}
    asked = study.ask(fixed_distributions={k: d for k, d in dists.items()})
    params = {**{f"p{i}": 0.1 * i for i in range(5)}, "k": -2}
    number, tid = create_running_trial(study, params, dists, {"generation": 4})
    assert number == asked.number + 1
    frozen = study._storage.get_trial(tid)
    assert frozen.state == TrialState.RUNNING and frozen.params == params and frozen.user_attrs == {"generation": 4}
    assert frozen.distributions == {k: dists[k] for k in params}
    assert count_trials(study, TrialState.RUNNING) == 2 and count_trials(study, TrialState.COMPLETE) == 0
    study.tell(number, 0.5)
    assert count_trials(study, TrialState.COMPLETE) == 1 and count_trials(study, TrialState.RUNNING, TrialState.COMPLETE) == 2
    if storage is not None:  # a fresh reader of the store sees the same trial
        assert optuna.load_study(study_name="t", storage=storage).trials[number].params == params


class KVEvaluator(RampEvaluator):
    """Ramp error plus a KV term that favours wide V in the first layer and narrow K elsewhere."""

    def error(self, params) -> float:
        decoded = self.space.decode(params)
        kv = decoded.kv_bits
        first = self.space.layout.attention[0]
        return super().error(params) + sum((bits["v"] - (8 if name == first else 2)) ** 2 * 1e-3
                                           for name, bits in kv.items())


def test_evo_searches_kv_bits_under_an_exact_bit_budget(store):
    from sparsealloc.spaces.spec import KVSpec

    spec = StudySpec(name="kv-budget", target_sparsity=TARGET, sampler="evo", seed=5, space=("layerwise", "kv"),
                     kv=KVSpec(bits=(2, 3, 4, 8), budget=3.0), evo=EvoSpec(offspring=6, stages=((8, 1),)))
    space = SearchSpace(spec, layout())
    sampler = open_sampler(spec, open_storage(store), space)
    assert sampler.kv_switched == set(space.kv_params)
    sampler.enqueue(space.defaults(), "uniform")
    run_study(sampler, LocalDispatcher(KVEvaluator(space)), n_trials=40)
    total = 3 * len(space.kv_params)
    trials = sampler.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sums = {sum(t.params[p] for p in space.kv_params) for t in trials}
    assert sums == {total}  # every candidate on the budget exactly (1-bit rungs are left at 3 bits)
    widths = {tuple(t.params[p] for p in space.kv_params) for t in trials}
    assert len(widths) > 5  # the KV genes move
    best = min(trials, key=lambda t: t.values[0])
    first_v = "kv_bits/layer_00/v"
    assert best.params[first_v] > 3  # moved toward the wide first V the fake error rewards
