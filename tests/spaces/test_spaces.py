"""Search spaces: exact-budget repair, decoding per granularity, defaults, spec validation and hash."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import MetricChoice
from sparsealloc.spaces.budget import project_to_budget, weighted_mean
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import LayerwiseSpec, StudySpec


def budget(space: SearchSpace, sparsity) -> float:
    return weighted_mean(sparsity, space.layout.numels)


# ----------------------------------------------------------------------------------- project_to_budget
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_project_to_budget_is_exact_and_within_bounds(data):
    n = data.draw(st.integers(1, 12), label="groups")
    lo = data.draw(st.floats(0.0, 0.6), label="lo")
    hi = data.draw(st.floats(lo, 0.99), label="hi")
    target = data.draw(st.floats(lo, hi), label="target")
    ratios = {f"g{i}": data.draw(st.floats(0.0, 1.0), label=f"r{i}") for i in range(n)}
    weights = {k: data.draw(st.integers(1, 10**8), label=f"w{k}") for k in ratios}
    out = project_to_budget(ratios, weights, target, lo, hi)
    assert set(out) == set(ratios)
    assert all(lo <= v <= hi for v in out.values())
    assert abs(weighted_mean(out, weights) - target) < 1e-9
    # A clipped shift keeps the order of the proposal, up to the last residue (at most the
    # bisection tolerance 1e-12 of the mean) that goes onto one group.
    slack = 2e-12 * sum(weights.values()) / min(weights.values()) + 1e-12
    for a in ratios:
        for b in ratios:
            if ratios[a] <= ratios[b]:
                assert out[a] <= out[b] + slack


def test_project_to_budget_keeps_the_shape_when_no_bound_binds():
    out = project_to_budget({"a": 0.40, "b": 0.50, "c": 0.60}, {"a": 1, "b": 2, "c": 1}, 0.55, 0.3, 0.8)
    assert out["b"] - out["a"] == pytest.approx(0.1, abs=1e-12)
    assert out["c"] - out["b"] == pytest.approx(0.1, abs=1e-12)
    assert (out["a"] + 2 * out["b"] + out["c"]) / 4 == pytest.approx(0.55, abs=1e-12)


@pytest.mark.parametrize(("target", "lo", "hi"), [(0.9, 0.2, 0.8), (0.1, 0.2, 0.8), (-0.1, 0.0, 0.5)])
def test_project_to_budget_rejects_an_infeasible_target(target, lo, hi):
    with pytest.raises(SpecError, match=f"target sparsity {target}"):
        project_to_budget({"a": 0.5, "b": 0.5}, {"a": 1, "b": 3}, target, lo, hi)


# ----------------------------------------------------------------------------------- decoding
GRANULARITIES = {
    "block": (6, [["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]]),
    "bins": (4, [["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                  "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]]),
    "projection": (2, [[f"model.layers.{i}.self_attn.q_proj" for i in range(6)]]),
    "module": (12, [["model.layers.3.mlp.down_proj"]]),
}


@pytest.fixture(scope="module")
def make_space(layout_builder):
    """Factory of spaces over 6 blocks, each a q_proj (small) and a down_proj (large), growing with depth."""
    layout = layout_builder(6, growth=lambda i: i + 1)

    def make(granularity: str = "block", space=("layerwise",), target: float = 0.6, **layerwise) -> SearchSpace:
        spec = StudySpec(target_sparsity=target, space=space,
                         layerwise=LayerwiseSpec(granularity=granularity, bins=4, **layerwise))
        return SearchSpace(spec, layout)

    return make


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES))
def test_every_granularity_decodes_to_the_exact_budget(granularity, make_space):
    space = make_space(granularity, space=("layerwise", "kv"))
    n_groups, some_groups = GRANULARITIES[granularity]
    assert len(space.groups) == n_groups
    assert sorted(n for names in space.groups.values() for n in names) == sorted(space.layout.linears)
    for members in some_groups:
        assert any(set(names) == set(members) for names in space.groups.values())
    rng = random.Random(granularity)
    for _ in range(25):
        # In-range proposals and out-of-range ones (clipped first).
        values = {g: rng.uniform(space.lo - 0.2, space.hi + 0.2) for g in space.groups}
        decoded = space.decode(values)
        assert set(decoded.sparsity) == set(space.layout.linears)
        assert abs(budget(space, decoded.sparsity) - 0.6) < 1e-9
        assert all(space.lo <= r <= space.hi for r in decoded.sparsity.values())
        for group, names in space.groups.items():
            assert {decoded.sparsity[n] for n in names} == {decoded.group_ratios[group]}
        plan = decoded.to_plan()
        assert set(plan.kv_bits) == set(space.layout.attention)


def test_the_grid_step_keeps_the_budget_exact(make_space):
    space = make_space("block", step=0.05)
    values = {g: 0.5 + 0.05 * i for i, g in enumerate(space.groups)}
    assert abs(budget(space, space.decode(values).sparsity) - 0.6) < 1e-9


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES))
@pytest.mark.parametrize("components", [("layerwise",), ("layerwise", "metric", "kv")])
def test_defaults_decode_to_the_uniform_allocation(granularity, components, make_space):
    space = make_space(granularity, space=components)
    for decoded in (space.decode(space.defaults()), space.decode({})):
        assert all(abs(r - 0.6) < 1e-12 for r in decoded.sparsity.values())
        if "metric" in components:
            assert decoded.metric == MetricChoice("generalized", {
                "w_coef": "no_coe", "w_transform": "no_op", "x_coef": "no_coe", "x_transform": "no_op",
                "w_exponent": 1.0, "x_exponent": 1.0})
        else:
            assert decoded.metric == MetricChoice("wanda", {})
        if "kv" in components:
            assert decoded.kv_bits == {a: {"k": 16, "v": 16} for a in space.layout.attention}
        else:
            assert decoded.kv_bits == {}


def test_encode_sparsity_round_trips_a_blockwise_allocation(make_space):
    space = make_space("block")
    per_block = [0.52, 0.55, 0.58, 0.61, 0.64, 0.67]
    ratios = {n: per_block[int(n.split(".")[2])] for n in space.layout.linears}
    shift = 0.6 - budget(space, ratios)
    ratios = {n: r + shift for n, r in ratios.items()}  # on budget, inside the window
    decoded = space.decode(space.encode_sparsity(ratios))
    assert all(abs(decoded.sparsity[n] - ratios[n]) < 1e-9 for n in space.layout.linears)


def test_decode_rejects_unknown_parameters(make_space):
    with pytest.raises(SpecError, match="unknown search parameters"):
        make_space().decode({"sparsity/block_99": 0.5})


# ----------------------------------------------------------------------------------- StudySpec
@pytest.mark.parametrize(("data", "fragment"), [
    ({"bogus": 1}, "'bogus'"),
    ({"layerwise": {"typo": 1}}, "'typo'"),
    ({"layerwise": {"granularity": "row"}}, "'row'"),
    ({"layerwise": {"radius": 1.5}}, "1.5"),
    ({"layerwise": {"bins": 0}}, "but got 0"),
    ({"target_sparsity": 1.2}, "1.2"),
    ({"target_sparsity": "half"}, "'half'"),
    ({"target_sparsity": 0.97}, "0.97"),  # above layerwise.max_sparsity
    ({"sampler": "hyperband"}, "'hyperband'"),
    ({"sampler": "cmaes", "space": ["layerwise", "kv"], "objectives": ["hidden", "kv_bytes"]},
     "sampler cmaes optimises one objective"),
    ({"population_size": 0}, "but got 0"),
    ({"trials": True}, "True"),
    ({"trials": "ten"}, "'ten'"),
    ({"space": ["layers"]}, "'layers'"),
    ({"space": ["layerwise", "allocator"]}, "'allocator'"),
    ({"objectives": ["kv_bytes"]}, "'kv_bytes'"),
    ({"kv": {"bits": [5]}}, "5"),
    ({"calibration": {"samples": -1}}, "-1"),
    ({"calibration": "lots"}, "'lots'"),
    ({"metric": {"exponent_range": [2, 1]}}, "(2, 1)"),
    ({"timeout": -5}, "-5"),
    ({"name": " padded "}, "' padded '"),
    ([1, 2], "list"),
])
def test_from_dict_rejects_bad_specs_naming_the_bad_value(data, fragment):
    with pytest.raises(SpecError) as info:
        StudySpec.from_dict(data)
    assert fragment in str(info.value)


def test_load_reports_unreadable_and_unparsable_files(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml"):
        StudySpec.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(SpecError, match="bad.yaml"):
        StudySpec.load(bad)
    good = tmp_path / "good.yaml"
    good.write_text("name: demo\nspace: layerwise,kv\nkv: {bits: [4, 8]}\n", encoding="utf-8")
    spec = StudySpec.load(good)
    assert spec.space == ("layerwise", "kv") and spec.kv.bits == (4, 8)


def test_spec_hash_is_stable_and_ignores_name_and_budget():
    spec = StudySpec(target_sparsity=0.6, space=("layerwise", "kv"))
    digest = spec.spec_hash()
    assert re.fullmatch(r"[0-9a-f]{12}", digest), digest  # 12 lowercase hex digits
    assert StudySpec(target_sparsity=0.6, space=("layerwise", "kv")).spec_hash() == digest
    assert StudySpec.from_dict(spec.to_dict()).spec_hash() == digest
    assert StudySpec.from_dict({"target_sparsity": 0.6, "space": "layerwise,kv"}).spec_hash() == digest
    assert spec.override(name="other", trials=999, timeout=60.0, device="cpu").spec_hash() == digest
    assert StudySpec.from_dict({**spec.to_dict(), "validation": {"top_k": 1}}).spec_hash() == digest
    assert spec.override(target_sparsity=0.5).spec_hash() != digest
    assert spec.override(sampler="nsga3").spec_hash() != digest
    assert spec.override(seed=1).spec_hash() != digest
