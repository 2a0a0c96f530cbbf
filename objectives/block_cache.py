"""Reading back the decoder-block outputs a trial shares with an earlier trial.

The evo sampler's offspring differ from their parent, and from each other, in a few Linears
(EvoPress's level switches, Sieberling et al., ICML 2025, arXiv:2410.14649). On the same calibration
windows, every decoder block before the first block whose compression differs computes exactly what
it computed for the earlier trial: same input, same weights, same kernels. :class:`BlockOutputCache`
keeps the output of each block under a key made of the batch and the compression of that block and
of every block before it, and a forward pass starts after the deepest block it finds: the blocks
before it return their cached output instead of computing (the embedding, the rotary tables and the
mask are still built; they cost next to nothing).

The skipped work is the part of the trunk before the first changed block: with a handful of
switched Linears among 30 blocks, a quarter of an offspring's trunk on average. Results are
bitwise the same as a full forward pass (a test checks it). Only decoder blocks that return their
hidden states as one tensor (Llama, Mistral, Qwen in transformers 5) are cached; for others the
cache stays empty and every pass runs in full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class BlockOutputCache:
    """Decoder-block outputs of recent trials, least recently used dropped first beyond ``max_bytes``.

    Args:
        max_bytes: Bound on the bytes of the kept outputs (0: keep nothing).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        #: Blocks run and blocks read back, over the cache's life (for reports and tests).
        self.blocks_run = 0
        self.blocks_reused = 0

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    @contextmanager
    def reusing(self, layers: Sequence[nn.Module], batch: Hashable, blocks: Sequence[Hashable]) -> Iterator[int]:
        """Within the block, one forward pass of the trunk that owns ``layers`` over ``batch`` starts
        after the deepest block whose output is cached for this compression, and keeps the outputs
        of the blocks it runs.

        Args:
            layers: The decoder blocks, in order.
            batch: What the pass runs on (the calibration windows of the batch, the model's dtype...).
            blocks: The compression of each block (one hashable per block, in order): two blocks
                with equal keys and equal inputs compute the same output.

        Yields:
            The number of blocks read back instead of run.
        """
        if len(blocks) != len(layers) or self.max_bytes <= 0:
            yield 0
            return
        keys, prefix = [], ()
        for block in blocks:
            prefix = (*prefix, block)
            keys.append((batch, prefix))
        start = next((i + 1 for i in reversed(range(len(keys))) if keys[i] in self._entries), 0)
        patched, hooks = [], []
        try:
            for i in range(start):
                cached = self._entries[keys[i]] if i == start - 1 else None
                layers[i].forward = _returning(cached)
                patched.append(layers[i])
            for i in range(start, len(layers)):
                hooks.append(layers[i].register_forward_hook(self._keeper(keys[i])))
            if start:
                self._entries.move_to_end(keys[start - 1])
            yield start
            self.blocks_reused += start
            self.blocks_run += len(layers) - start
        finally:
            for layer in patched:
                del layer.forward
            for hook in hooks:
                hook.remove()
            self._evict()

    def _keeper(self, key: Hashable):
        def keep(module: nn.Module, args, output) -> None:
            if isinstance(output, torch.Tensor) and key not in self._entries:
                self._entries[key] = output
                self._bytes += output.numel() * output.element_size()

        return keep

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()


def _returning(cached: torch.Tensor | None):
    """A block ``forward`` that computes nothing: the cached output for the last skipped block, the
    input unchanged (to be ignored by the next skipped block) for the ones before it."""

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if cached is None else cached

    return forward
