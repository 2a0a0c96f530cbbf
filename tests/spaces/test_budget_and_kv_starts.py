"""A searched overall sparsity when remaining weights is an objective; uniform KV warm starts; kv.residual."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparsealloc.core.errors import SpecError
from sparsealloc.spaces.budget import weighted_mean
from sparsealloc.spaces.space import BUDGET_PARAM, SearchSpace
from sparsealloc.spaces.spec import StudySpec

BLOCKS = [f"model.layers.{i}" for i in range(3)]
LINEARS = [f"{b}.{k}" for b in BLOCKS for k in ("self_attn.q_proj", "mlp.down_proj")]
LAYOUT = SimpleNamespace(blocks=BLOCKS, linears=LINEARS, block_of={n: n.rsplit(".", 2)[0] for n in LINEARS},
                         numels={n: 100 if "q_proj" in n else 300 for n in LINEARS},
                         attention=[f"{b}.self_attn" for b in BLOCKS])


def space(**spec) -> SearchSpace:
    return SearchSpace(StudySpec.from_dict({"target_sparsity": 0.5, **spec}), LAYOUT)


@pytest.mark.parametrize("components", [["layerwise"], ["kv"], ["allocator"]])
def test_budget_is_searched_only_with_remaining_weights(components):
    fixed = space(space=components, objectives=["kl", "kv_bytes"])
    assert BUDGET_PARAM not in fixed.by_name and fixed.decode({}).budget == 0.5
    free = space(space=components, objectives=["kl", "remaining_weights"], layerwise={"radius": 0.2})
    param = free.by_name[BUDGET_PARAM]
    assert (param.low, param.high) == pytest.approx((0.3, 0.7))
    assert free.defaults()[BUDGET_PARAM] == 0.5
    decoded = free.decode({BUDGET_PARAM: 0.62})
    assert decoded.budget == 0.62
    if decoded.sparsity is not None:
        assert weighted_mean(decoded.sparsity, LAYOUT.numels) == pytest.approx(0.62, abs=1e-12)


def test_nm_patterns_keep_the_budget_fixed():
    s = space(space=["kv"], pattern="2:4", objectives=["kl", "remaining_weights"])
    assert BUDGET_PARAM not in s.by_name


def test_uniform_kv_warm_starts_cover_every_lower_bit_width():
    s = space(space=["layerwise", "kv"], kv={"bits": [16, 4, 2, 8]})
    starts = s.uniform_kv()
    assert list(starts) == ["uniform-kv8", "uniform-kv4", "uniform-kv2"]
    for name, values in starts.items():
        bits = int(name.removeprefix("uniform-kv"))
        decoded = s.decode(values)
        assert all(kv == {"k": bits, "v": bits} for kv in decoded.kv_bits.values())
        assert set(decoded.sparsity.values()) == {0.5}
    assert space(space=["layerwise"]).uniform_kv() == {}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_kv_residual_must_be_a_non_negative_integer(bad):
    with pytest.raises(SpecError, match="kv.residual must be an integer >= 0"):
        StudySpec.from_dict({"kv": {"residual": bad}})
    assert StudySpec.from_dict({"kv": {"residual": 64}}).kv.residual == 64
