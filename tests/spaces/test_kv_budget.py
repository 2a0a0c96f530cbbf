"""KV bit budgets (spaces/kv_budget.py): every candidate within the budget, whichever sampler."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsealloc.core.errors import SpecError
from sparsealloc.search.samplers.evo import bit_switch
from sparsealloc.spaces.kv_budget import budget_total, fit_to_budget
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import KVSpec, StudySpec

LADDER = (2, 3, 4, 8, 16)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(LADDER), min_size=1, max_size=24), st.floats(2.0, 16.0))
def test_fit_meets_the_budget_within_one_step_and_keeps_a_fitted_proposal(widths, budget):
    bits = {f"s{i:02d}": b for i, b in enumerate(widths)}
    total = budget_total(budget, len(bits))
    fitted = fit_to_budget(bits, LADDER, total)
    assert set(fitted) == set(bits) and all(b in LADDER for b in fitted.values())
    assert sum(fitted.values()) <= total
    steps_up = [LADDER[LADDER.index(b) + 1] - b for b in fitted.values() if b != LADDER[-1]]
    assert not steps_up or sum(fitted.values()) + min(steps_up) > total  # no step up fits
    assert fit_to_budget(fitted, LADDER, total) == fitted  # idempotent


def test_fit_is_exact_where_one_bit_steps_remain_and_lowers_peaks_first():
    bits = {"a": 16, "b": 2, "c": 2, "d": 2}
    assert fit_to_budget(bits, LADDER, budget_total(3.0, 4)) == {"a": 4, "b": 3, "c": 3, "d": 2}
    assert fit_to_budget(bits, LADDER, 12, protect={"a"}) == {"a": 4, "b": 3, "c": 3, "d": 2}  # a must still give
    assert fit_to_budget({"a": 8, "b": 3, "c": 3}, LADDER, 14, protect={"a"}) == {"a": 8, "b": 3, "c": 3}
    assert fit_to_budget({"a": 8, "b": 4, "c": 3}, LADDER, 14, protect={"a"}) == {"a": 8, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="ladder"):
        fit_to_budget({"a": 5}, LADDER, 10)
    with pytest.raises(ValueError, match="below"):
        fit_to_budget({"a": 2, "b": 2}, LADDER, 3)


def test_bit_switch_moves_one_rung_each_way():
    rng = np.random.default_rng(0)
    bits = {f"s{i}": 3 for i in range(6)}
    out, raised = bit_switch(bits, LADDER, 1, rng)
    assert sorted(out.values()) == [2, 3, 3, 3, 3, 4] and raised == {k for k, v in out.items() if v == 4}


def _space(layout_builder, budget, sampler="tpe"):
    spec = StudySpec(space=("layerwise", "kv"), sampler=sampler, kv=KVSpec(budget=budget))
    return SearchSpace(spec, layout_builder())


def test_every_decoded_candidate_meets_the_budget(layout_builder):
    space = _space(layout_builder, 3.0)
    n = len(space.kv_params)
    assert n == 2 * len(space.layout.attention) and space.kv_total == 3 * n
    rng = np.random.default_rng(1)
    for _ in range(50):
        values = {p: int(rng.choice(LADDER)) for p in space.kv_params}
        kv = space.decode(values).kv_bits
        widths = [b for bits in kv.values() for b in (bits["k"], bits["v"])]
        assert sum(widths) == 3 * n  # 1-bit steps are always left here: exact
    defaults = space.defaults()
    assert {defaults[p] for p in space.kv_params} == {3} and space.uniform_kv() == {}


def test_budget_needs_kv_in_the_space_and_lies_on_the_ladder():
    with pytest.raises(SpecError, match="kv.budget needs kv"):
        StudySpec(kv=KVSpec(budget=3.0))
    with pytest.raises(SpecError, match="kv.budget"):
        StudySpec(space=("kv",), kv=KVSpec(budget=1.5))
    assert StudySpec(space=("kv",)).spec_hash() == StudySpec(space=("kv",), kv=KVSpec(budget=None)).spec_hash()
    assert StudySpec(space=("kv",), kv=KVSpec(budget=3)).spec_hash() != StudySpec(space=("kv",)).spec_hash()
