"""Block output reuse: a trial that shares its leading blocks' compression with an earlier one on
the same windows reads their outputs back, and scores bitwise what a full forward pass scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsealloc.core.plan import MetricChoice
from sparsealloc.objectives import EvalContext, TrialEvaluator
from sparsealloc.objectives.block_cache import BlockOutputCache
from sparsealloc.spaces.spec import MetricSpec, StudySpec


class Counting(nn.Module):
    def __init__(self, scale: float, as_tuple: bool = False) -> None:
        super().__init__()
        self.scale, self.as_tuple, self.calls = scale, as_tuple, 0

    def forward(self, hidden_states, **kwargs):
        self.calls += 1
        out = hidden_states * self.scale + 1.0
        return (out,) if self.as_tuple else out


class Trunk(nn.Module):
    def __init__(self, n: int, as_tuple: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Counting(1.0 + i / 10, as_tuple) for i in range(n))

    def forward(self, x):
        for layer in self.layers:
            out = layer(x, mask=None)
            x = out[0] if isinstance(out, tuple) else out
        return x


def run(trunk: Trunk, cache: BlockOutputCache, batch, blocks):
    with cache.reusing(trunk.layers, batch, blocks) as skipped:
        return trunk(torch.arange(6.0).reshape(2, 3)), skipped


def test_a_pass_starts_after_the_deepest_cached_block_and_computes_the_same():
    trunk, cache = Trunk(4), BlockOutputCache(2**20)
    first, skipped = run(trunk, cache, "b0", ("a", "b", "c", "d"))
    assert skipped == 0 and [layer.calls for layer in trunk.layers] == [1, 1, 1, 1]
    # Only the last block differs: the first three are read back, the last one runs.
    _, skipped = run(trunk, cache, "b0", ("a", "b", "c", "x"))
    assert skipped == 3 and [layer.calls for layer in trunk.layers] == [1, 1, 1, 2]
    # Same input, different last block: the output is what the full pass gives.
    trunk.layers[3].scale = 1.3  # (the key said the block changed; here it does)
    third, skipped = run(trunk, cache, "b0", ("a", "b", "c", "y"))
    fresh = Trunk(4)
    fresh.layers[3].scale = 1.3
    assert torch.equal(third, fresh(torch.arange(6.0).reshape(2, 3))) and skipped == 3
    # The second block differs: only the first is read back.
    _, skipped = run(trunk, cache, "b0", ("a", "z", "c", "d"))
    assert skipped == 1
    # Another batch shares nothing; the same full key is read back whole.
    assert run(trunk, cache, "b1", ("a", "b", "c", "d"))[1] == 0
    again, skipped = run(trunk, cache, "b0", ("a", "b", "c", "d"))
    assert skipped == 4 and torch.equal(again, first)
    assert cache.blocks_reused == 3 + 3 + 1 + 4 and cache.nbytes > 0
    # No layer keeps the patched forward or a hook after the pass.
    assert all("forward" not in vars(layer) and not layer._forward_hooks for layer in trunk.layers)


def test_the_cache_keeps_nothing_beyond_its_bound_nor_blocks_that_return_tuples():
    trunk = Trunk(3)
    tiny = BlockOutputCache(3 * 4 * 6)  # room for three of the 6-float outputs
    run(trunk, tiny, "b0", ("a", "b", "c"))
    run(trunk, tiny, "b1", ("a", "b", "c"))  # evicts the oldest (b0's)
    assert tiny.nbytes <= 3 * 4 * 6 and run(trunk, tiny, "b0", ("a", "b", "c"))[1] == 0
    off = BlockOutputCache(0)
    run(trunk, off, "b0", ("a", "b", "c"))
    assert run(trunk, off, "b0", ("a", "b", "c"))[1] == 0 and off.nbytes == 0
    tuples, cache = Trunk(3, as_tuple=True), BlockOutputCache(2**20)
    run(tuples, cache, "b0", ("a", "b", "c"))
    assert cache.nbytes == 0 and run(tuples, cache, "b0", ("a", "b", "c"))[1] == 0
    # Keys that do not match the blocks one to one: nothing is read or kept.
    assert run(trunk, BlockOutputCache(2**20), "b0", ("a", "b"))[1] == 0


@pytest.fixture(scope="module")
def contexts(model_builder, windows_builder):
    """Two contexts of one model and windows: block output reuse on, and off."""
    model, windows = model_builder("llama"), windows_builder(8, 16, seed=2)
    on = EvalContext.build(model, windows, batch_size=3)
    off = EvalContext.build(model, windows, batch_size=3)
    off.block_cache_bytes = 0
    return on, off


def child(evaluator: TrialEvaluator, moves: dict[int, int]) -> dict:
    """The defaults with the level of group ``i`` moved by ``moves[i]`` (moves summing to 0)."""
    values = evaluator.space.defaults()
    groups = list(evaluator.space.groups)
    values.update(evaluator.space.levels.ratios({g: moves.get(i, 0) for i, g in enumerate(groups)}))
    return values


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offspring_trials_read_back_shared_blocks_and_score_bitwise_the_same(contexts, dtype):
    on, off = contexts
    spec = StudySpec(target_sparsity=0.5, sampler="evo", metric=MetricSpec(name="wanda"), proxy_dtype=dtype)
    cached, plain = TrialEvaluator(on, spec), TrialEvaluator(off, spec)
    n_groups, n_blocks = len(cached.space.groups), len(on.layout.blocks)
    last_block = [i for i, g in enumerate(cached.space.groups) if f"/{on.layout.blocks[-1]}." in g]
    parent = cached.space.defaults()
    late = child(cached, {last_block[0]: 1, last_block[-1]: -1})  # only the last block changes
    early = child(cached, {0: 1, n_groups - 1: -1})  # the first block changes
    for windows in (None, (1, 4, 6, 7)):
        for values, reused in ((parent, None), (late, n_blocks - 1), (early, 0), (parent, n_blocks)):
            before = on.block_cache.blocks_reused
            got, want = cached(values, windows=windows), plain(values, windows=windows)
            assert got.state == want.state == "complete"
            assert got.values == want.values  # bitwise: the same kernels on the same inputs
            batches = len(on.batch_windows(windows))
            if reused is not None:
                assert on.block_cache.blocks_reused - before == reused * batches
    assert off.block_cache.nbytes == 0 and on.block_cache.nbytes > 0
    # Another metric's masks are other weights: its ranks clear the cache.
    on.cache_ranks(MetricChoice("magnitude"))
    assert on.block_cache.nbytes == 0
    on.cache_ranks(MetricChoice("wanda"))


def test_trials_pruned_in_place_do_not_use_the_cache(contexts):
    on, _ = contexts
    spec = StudySpec(target_sparsity=0.5, metric=MetricSpec(name="wanda"), space=("metric", "layerwise"),
                     proxy_dtype="float32")
    evaluator = TrialEvaluator(on, spec)
    outcome = evaluator(evaluator.space.defaults())
    assert outcome.state == "complete" and evaluator.last_blocks is None
