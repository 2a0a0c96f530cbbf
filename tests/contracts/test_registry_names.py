"""The spec validates names without importing the registries (``spaces`` sits below them): its
name lists must stay equal to what is registered, so a new plug-in is accepted in a spec."""

from __future__ import annotations

from sparsealloc.objectives.base import OBJECTIVES
from sparsealloc.pruning.allocators import ALLOCATORS
from sparsealloc.search.pruners import PRUNERS
from sparsealloc.search.samplers.base import SAMPLERS
from sparsealloc.spaces import spec


def test_the_spec_names_what_is_registered():
    assert sorted(spec.SAMPLER_NAMES) == SAMPLERS.names()
    assert sorted(spec.OBJECTIVE_NAMES) == OBJECTIVES.names()
    assert sorted(spec.PRUNER_NAMES) == PRUNERS.names()
    assert sorted(spec.WARM_STARTS) == ALLOCATORS.names()  # every allocator can warm-start a study
    assert set(spec.ALLOCATOR_SPACES) <= set(ALLOCATORS.names())
    assert set(spec.SINGLE_OBJECTIVE_SAMPLERS) <= set(spec.SAMPLER_NAMES)
    assert set(spec.FORWARD_PROXIES) <= set(spec.ERROR_PROXIES) <= set(spec.OBJECTIVE_NAMES)
