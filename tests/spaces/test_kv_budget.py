"""KV bit budgets (spaces/kv_budget.py): every candidate within the budget, whichever sampler."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsealloc.core.errors import SpecError
from sparsealloc.search.samplers.evo import bit_switch
from sparsealloc.spaces.kv_budget import budget_total, fit_to_budget, slot_bytes
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
    with pytest.raises(SpecError, match="need kv in the space"):
        StudySpec(kv=KVSpec(budget=3.0))
    with pytest.raises(SpecError, match="kv.budget"):
        StudySpec(space=("kv",), kv=KVSpec(budget=1.5))
    assert StudySpec(space=("kv",)).spec_hash() == StudySpec(space=("kv",), kv=KVSpec(budget=None)).spec_hash()
    assert StudySpec(space=("kv",), kv=KVSpec(budget=3)).spec_hash() != StudySpec(space=("kv",)).spec_hash()


def test_a_byte_budget_fits_the_summed_slot_bytes(layout_builder):
    """Bytes per token (kv.budget_bytes): every candidate within the budget, no rung up left that fits,
    and the budget of uniform 3-bit admits exactly uniform 3-bit's bytes."""
    heads, head_dim, group = 3, 64, 32
    k3 = slot_bytes("k", LADDER, heads, head_dim, group)[3]
    assert k3 == heads * (3 * 64 / 8 + 64 * 4 / 32)  # packed codes + fp16 scale/zero per 32-token group
    layout = layout_builder()
    n_slots = 2 * len(layout.attention)
    budget = n_slots * k3  # uniform 3-bit (K and V cost the same at head dim 64, group 32)
    spec = StudySpec(space=("layerwise", "kv"), kv=KVSpec(budget_bytes=budget))
    space = SearchSpace(spec, layout)
    assert {space.defaults()[p] for p in space.kv_params} == {3}
    rng = np.random.default_rng(2)
    for _ in range(40):
        kv = space.decode({p: int(rng.choice(LADDER)) for p in space.kv_params}).kv_bits
        spent = sum(space.kv_cost[p][b] for p, b in zip(space.kv_params, [w for v in kv.values() for w in (v["k"], v["v"])]))
        assert spent <= budget + 1e-6
        steps = [space.kv_cost[p][LADDER[LADDER.index(b) + 1]] - space.kv_cost[p][b]
                 for p, b in zip(space.kv_params, [w for v in kv.values() for w in (v["k"], v["v"])]) if b != 16]
        assert not steps or spent + min(steps) > budget + 1e-6
    with pytest.raises(SpecError, match="at least"):
        SearchSpace(StudySpec(space=("kv",), kv=KVSpec(budget_bytes=10.0)), layout)
    with pytest.raises(SpecError, match="alternatives"):
        StudySpec(space=("kv",), kv=KVSpec(budget=3.0, budget_bytes=budget))
