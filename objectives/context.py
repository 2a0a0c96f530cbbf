"""EvalContext: everything a worker builds once and every trial reuses.

Holds the model, the calibration windows, the statistics, one pristine copy of the prunable
weights (trials that prune in place restore them from it; the model is never copied) and the dense
reference. With ``lazy_pristine`` the copy is only taken the first time something is about to prune
in place (the first :meth:`EvalContext.restore_`): trials whose masks come from cached ranks run the
model through :func:`~sparsealloc.pruning.masked.masked_forward` and never write a weight, so a
study worker with a fixed metric holds no copy at all (430 MB less for SmolLM2).

The dense reference is memory-bounded: not the logits (N·L·vocab floats, 0.8 GB for SmolLM2 at
16×256), but the final hidden states (N·L·d) plus the LM head's Gram matrix G = WᵀW (d×d). Because
logits = h·Wᵀ (+ b), the logit difference of a pruned model is exactly ΔL = Δh·Wᵀ and
‖ΔL‖²_F = Σ_t Δh_t·G·Δh_tᵀ, with no vocabulary-sized product per trial. The KL proxy keeps two
numbers per token instead of the dense distribution (:mod:`sparsealloc.objectives.divergence`); the
layer-local proxy keeps each Linear's H/N in bfloat16 (:mod:`sparsealloc.objectives.layer_local`).

With a fixed metric, each Linear's per-row rank of the metric's scores is cached once, and a trial's
masks are ``rank < k`` per row (no re-scoring or re-sorting).

Contract for code that prunes ``ctx.model`` in place: call :meth:`EvalContext.restore_` first (it
takes the lazy copy while the model is still dense) and again when done.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsealloc.core.errors import SpecError
from sparsealloc.core.types import LayerStats
from sparsealloc.objectives.block_cache import BlockOutputCache
from sparsealloc.objectives.divergence import CHUNK, kl_reference
from sparsealloc.objectives.layer_local import compact_grams, summed_error
from sparsealloc.pruning.calibration.stats import collect_stats, decoder_trunk
from sparsealloc.pruning.layer_prune import drop_schedule, untie_output_embeddings_
from sparsealloc.pruning.masks import masked_copy_, pruned_count, pruned_part, row_rank
from sparsealloc.pruning.metrics import score
from sparsealloc.pruning.model.structure import ModelLayout, model_layout


def lm_head_of(model: nn.Module) -> nn.Module:
    """The output projection (``get_output_embeddings``)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings")
    return head


@dataclass
class EvalContext:
    """Per-worker cache (see module docstring). Build with :meth:`build`."""

    model: nn.Module
    layout: ModelLayout
    windows: torch.Tensor
    batch_size: int
    stats: Mapping[str, LayerStats]
    pristine_weight: dict[str, torch.Tensor]
    pristine_bias: dict[str, torch.Tensor | None]
    dense_hidden: list[torch.Tensor]
    head_gram: torch.Tensor
    dense_logit_sq: list[float]
    model_info: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    ranks: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks_metric: Any = None
    kl_terms: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    drop_schedule: Any = None
    pristine_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Masked weights kept for reuse, keyed (Linear, pruned count); 0 disables the cache (each
    #: forward call then masks on the fly: :func:`~sparsealloc.pruning.masked.masked_forward`).
    mask_cache_bytes: int = 3 * 2**29
    #: Decoder-block outputs of recent trials kept for reuse (:mod:`~sparsealloc.objectives.block_cache`);
    #: 0 disables it.
    block_cache_bytes: int = 2**30
    _masked: Any = None
    _block_cache: BlockOutputCache | None = None
    _logit_sq_per_window: list[float] | None = None
    _compute_models: dict[torch.dtype, nn.Module] = field(default_factory=dict)
    #: Windows trials are scored on when they are not :attr:`windows` (held-out windows of the
    #: calibration text, ``calibration.score_samples``); None: :attr:`windows`. See :attr:`scored`.
    score_windows: torch.Tensor | None = None
    #: The domain of each scored window (:attr:`scored`; ``calibration.domains`` or a windows file's
    #: clusters), or None.
    window_domains: tuple[int, ...] | None = None
    #: One relative weight per domain for the forward proxies (``calibration.domain_weights``), or
    #: None: every scored token weighs the same (see
    #: :func:`~sparsealloc.objectives.reconstruction.forward_errors`).
    domain_weights: tuple[float, ...] | None = None

    @classmethod
    @torch.inference_mode()
    def build(cls, model: nn.Module, windows: torch.Tensor, batch_size: int = 4, gram: bool = False,
              model_info: Mapping[str, Any] | None = None, tokenizer: Any = None,
              layer_grams: bool = False, lazy_pristine: bool = False,
              score_windows: torch.Tensor | None = None, window_domains: Sequence[int] | None = None,
              domain_weights: Sequence[float] | None = None) -> EvalContext:
        """Collect statistics, the pristine weights and the dense reference in one place.

        Args:
            model: The dense causal LM (pruned in place by trials, restored after each).
            windows: Calibration token ids, shape (n, seq_len).
            batch_size: Windows per forward call.
            gram: Keep XᵀX in float32 in the statistics (metrics that need it: SparseGPT).
            model_info: Goes into plans as ``model``.
            tokenizer: Kept for validation.
            layer_grams: Keep H/N per Linear in bfloat16 for the layer-local error (the zero-forward
                rung and the ``layer_local`` proxy), collected in the same calibration pass.
            lazy_pristine: Copy the prunable weights only when first needed (module docstring).
            score_windows: Token ids (m, seq_len) to score trials on instead of ``windows`` (the
                statistics come from ``windows`` either way; the dense reference from these).
            window_domains: The domain of each scored window (see :attr:`window_domains`).
            domain_weights: One relative weight per domain (see :attr:`domain_weights`).
        """
        scored = windows if score_windows is None else score_windows
        if domain_weights is not None:
            if window_domains is None or len(window_domains) != scored.shape[0]:
                raise ValueError(f"domain weights need the domain of each of the {scored.shape[0]} scored windows, "
                                 f"but got {None if window_domains is None else len(window_domains)}")
            if max(window_domains) >= len(domain_weights) or min(window_domains) < 0:
                raise SpecError(f"expected one domain weight per domain ({max(window_domains) + 1}), "
                                f"but got {len(domain_weights)}: {list(domain_weights)}")
        layout = model_layout(model)
        stats = collect_stats(model, windows, batch_size=batch_size, gram=gram or layer_grams, layout=layout)
        grams = compact_grams(stats, drop=not gram) if layer_grams else {}
        modules = dict(model.named_modules())
        pristine_weight = {} if lazy_pristine else {n: modules[n].weight.detach().clone() for n in layout.linears}
        pristine_bias = {n: None if modules[n].bias is None else modules[n].bias.detach().clone()
                         for n in layout.linears}
        head = lm_head_of(model)
        w = head.weight.detach().float()
        head_gram = w.T @ w  # (d, d)
        trunk = decoder_trunk(model)
        device = next(model.parameters()).device
        dense_hidden, dense_sq = [], []
        for batch in (windows if score_windows is None else score_windows).split(batch_size):
            h = trunk(input_ids=batch.to(device), use_cache=False).last_hidden_state.float()
            dense_hidden.append(h)
            dense_sq.append(sum(float(head(part).square_().sum(dtype=torch.float64))
                                for part in h.reshape(-1, h.shape[-1]).split(CHUNK)))
        info = {"n_layers": len(layout.blocks), **dict(model_info or {})}
        return cls(model, layout, windows, batch_size, stats, pristine_weight, pristine_bias,
                   dense_hidden, head_gram, dense_sq, info, tokenizer, grams=grams, score_windows=score_windows,
                   window_domains=None if window_domains is None else tuple(int(d) for d in window_domains),
                   domain_weights=None if domain_weights is None else tuple(float(w) for w in domain_weights))

    @property
    def scored(self) -> torch.Tensor:
        """The windows trials are scored on (the dense reference's): :attr:`score_windows`, or the
        statistics windows :attr:`windows` when there are none. Window indices (``windows=`` of
        trials and stages) index these."""
        return self.windows if self.score_windows is None else self.score_windows

    @torch.no_grad()
    def restore_(self, weights: bool = True) -> None:
        """Put the dense weights (and biases) back, in place.

        Args:
            weights: False restores everything but the prunable Linear weights (for
                ``prune_(..., pristine=...)``, which writes those itself).
        """
        modules = dict(self.model.named_modules())
        if not self.pristine_weight:  # lazy: nothing was pruned in place yet; keep a copy from now on
            self.pristine_weight = {n: modules[n].weight.detach().clone() for n in self.layout.linears}
        for name, weight in self.pristine_weight.items():
            if weights:
                modules[name].weight.data.copy_(weight)
        for name, bias in self.pristine_bias.items():
            if bias is None:
                modules[name].bias = None
            else:
                modules[name].bias.data.copy_(bias)
        for name, weight in self.pristine_extra.items():
            modules[name].weight.data.copy_(weight)

    def cache_drop_schedule(self, max_blocks: int, compensate: bool = True) -> None:
        """Compute the Block-Influence drop schedule once (for the ``layer_drop`` dimension).

        With compensation, Prune&Comp scales the embeddings too, so they join the pristine copy
        (and a tied LM head is untied first, so that scaling never reaches the logits).
        """
        if self.drop_schedule is not None and len(self.drop_schedule.dropped) >= max_blocks:
            return
        self.restore_()
        self.drop_schedule = drop_schedule(self.model, self.windows, max_blocks, compensate, self.batch_size)
        if compensate:
            untie_output_embeddings_(self.model)
            for name, module in self.model.named_modules():
                if module is self.model.get_input_embeddings() or (name.endswith("embed_positions") and hasattr(module, "weight")):
                    self.pristine_extra[name] = module.weight.detach().clone()

    @torch.inference_mode()
    def cache_ranks(self, metric) -> None:
        """Score every prunable Linear once with ``metric`` (a MetricChoice) and keep its row ranks.

        A trial's mask is then ``rank < k`` per row (:func:`~sparsealloc.pruning.masks.masked_copy_`):
        no per-trial scoring or sorting (int16: 2 bytes per weight).
        """
        if self.ranks_metric == metric:
            return
        self.ranks = {n: row_rank(score(metric.name, w, self.stats[n], dict(metric.params)))
                      for n, w in self.weights().items()}
        self.ranks_metric = metric
        self._masked = None
        self.block_cache.clear()  # its keys name masks by ratio, which meant the old metric's

    def compute_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model trials run in: :attr:`model` itself for float32, else a copy in ``dtype``
        (made once, from the dense model, on first use; Linears are stitched into it by
        :func:`~sparsealloc.pruning.masked.stitched_forward`, never written).

        A bfloat16 copy makes a SmolLM2 trial forward about 3× faster on CPUs with AMX/AVX-512 BF16
        (and on GPUs); the dense reference stays float32, so the proxy still measures the distance
        to the float32 dense model (the copy's own distance, about 0.002 nats per token of KL on
        SmolLM2, is common to every candidate). EvoPress runs its search in half precision too.
        """
        if dtype == self.model.dtype:
            return self.model
        if dtype not in self._compute_models:
            # Outside an applied plan the model is dense (trials restore it), so the copy is too.
            self._compute_models[dtype] = copy.deepcopy(self.model).to(dtype).eval()
        return self._compute_models[dtype]

    @torch.inference_mode()
    def masked_entries(self, ratios: Mapping[str, float], dtype: torch.dtype | None = None
                       ) -> dict[str, tuple[torch.Tensor, None]]:
        """Each Linear of ``ratios`` (> 0) masked from the cached ranks, for
        :func:`~sparsealloc.pruning.masked.stitched_forward`; built once per (Linear, pruned count)
        and kept (least recently used dropped first beyond :attr:`mask_cache_bytes`), so a trial that
        differs from an earlier one in a few Linears (the evo sampler's offspring) masks only those.
        ``dtype``: the masked weights' dtype (that of :meth:`compute_model`; None: the model's).
        """
        if self._masked is None:
            self._masked = (OrderedDict(), [0])
        cache, size = self._masked
        weights = self.weights()
        out = {}
        for name, ratio in ratios.items():
            if ratio <= 0:
                continue
            key = (name, pruned_count(weights[name].numel(), ratio), dtype)
            weight = cache.get(key)
            if weight is None:
                dense = weights[name]
                weight = masked_copy_(torch.empty_like(dense), dense, self.ranks[name], ratio)
                if dtype is not None and dtype != weight.dtype:
                    weight = weight.to(dtype)
                cache[key] = weight
                size[0] += weight.numel() * weight.element_size()
            cache.move_to_end(key)
            out[name] = (weight, None)
        while size[0] > self.mask_cache_bytes and len(cache) > len(out):
            _, old = cache.popitem(last=False)
            size[0] -= old.numel() * old.element_size()
        return out

    @property
    def block_cache(self) -> BlockOutputCache:
        """The worker's :class:`~sparsealloc.objectives.block_cache.BlockOutputCache` (made on first use,
        bounded by :attr:`block_cache_bytes`)."""
        if self._block_cache is None:
            self._block_cache = BlockOutputCache(self.block_cache_bytes)
        return self._block_cache

    def batch_windows(self, windows: Sequence[int] | None = None) -> list[tuple[int, ...]]:
        """The window indices of each batch :meth:`reference_batches` yields for ``windows`` (None: all
        windows, in the batches the dense reference was computed in)."""
        order = list(range(self.scored.shape[0])) if windows is None else [int(w) for w in windows]
        return [tuple(order[i : i + self.batch_size]) for i in range(0, len(order), self.batch_size)]

    def ranks_for(self, plan) -> dict[str, torch.Tensor] | None:
        """The cached ranks when ``plan`` uses the cached metric, else None."""
        return self.ranks if self.ranks and plan.metric == self.ranks_metric else None

    @torch.inference_mode()
    def cache_kl_reference(self) -> None:
        """Keep the dense reference of the exact KL proxy: ``pᵀW`` and ``Σ p log p − p·b`` per token."""
        if self.kl_terms:
            return
        head = lm_head_of(self.model)
        bias = getattr(head, "bias", None)
        self.kl_terms = [kl_reference(h, head.weight, bias) for h in self.dense_hidden]

    @torch.inference_mode()
    def cache_layer_grams(self) -> None:
        """Collect H/N per Linear (bfloat16) unless :meth:`build` did (one more calibration pass)."""
        if self.grams:
            return
        if self.pristine_weight:
            self.restore_()
        stats = collect_stats(self.model, self.windows, batch_size=self.batch_size, gram=True, layout=self.layout)
        self.grams = compact_grams(stats, drop=True)

    @torch.inference_mode()
    def layer_error(self, ratios: Mapping[str, float] | None = None) -> float:
        """Summed layer-local error Σ tr(ΔW·(H/N)·ΔWᵀ) (:mod:`~sparsealloc.objectives.layer_local`).

        Args:
            ratios: Ratio per Linear FQN, masked from the cached ranks without touching the model
                (the zero-forward rung, and trials run by masked_forward). None: ΔW = pristine −
                current weights (the model as pruned in place; 0 while no pristine copy was needed).
        """
        if not self.grams:  # not collected here: that would restore the model under a pruned trial
            raise ValueError("the layer-local error needs the Gram matrices: call cache_layer_grams() first")
        modules = dict(self.model.named_modules())

        def pairs():
            for name, weight in (self.pristine_weight if ratios is None else self.weights()).items():
                if ratios is None:
                    delta = weight - modules[name].weight.data
                elif ratios.get(name, 0.0) > 0:
                    delta = pruned_part(weight, self.ranks[name], ratios[name])
                else:
                    continue
                yield delta, self.grams[name]

        return summed_error(pairs())

    def reference_batches(self, windows: Sequence[int] | None = None, logit_sq: bool = True
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, float]]:
        """Batches of the scored windows (:attr:`scored`) with their dense reference: ``(ids, hidden,
        kl_terms, logit_sq)``.

        Args:
            windows: Indices of the scored windows to use (a selection stage's fidelity);
                None: all of them, in the batches the reference was computed in.
            logit_sq: Whether the caller needs Σ dense logit² (the ``logits`` proxy); 0.0 otherwise.
                Per window it costs an LM-head product, done once and kept.

        Yields:
            Token ids (b, L); the dense final hidden states (b, L, d); the KL reference ``(m, c)``
            of those tokens, or None when it is not cached; Σ dense logit² of those tokens.
        """
        if windows is None:
            for i, (batch, hidden) in enumerate(zip(self.scored.split(self.batch_size), self.dense_hidden)):
                yield batch, hidden, self.kl_terms[i] if self.kl_terms else None, self.dense_logit_sq[i]
            return
        index = torch.as_tensor(list(windows), dtype=torch.long)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= self.scored.shape[0]:
            raise ValueError(f"window indices must lie in [0, {self.scored.shape[0]}), but got {list(windows)[:8]}")
        seq = self.scored.shape[1]
        per_window = self.window_logit_sq() if logit_sq else None
        for ids in self.batch_windows(windows):  # the batching forward_errors keys its block reuse on
            chunk = torch.as_tensor(ids, dtype=torch.long)
            b, r = chunk // self.batch_size, chunk % self.batch_size
            hidden = torch.stack([self.dense_hidden[int(i)][int(j)] for i, j in zip(b, r)])
            kl = None
            if self.kl_terms:
                rows = [slice(int(j) * seq, (int(j) + 1) * seq) for j in r]
                kl = (torch.cat([self.kl_terms[int(i)][0][rows_] for i, rows_ in zip(b, rows)]),
                      torch.cat([self.kl_terms[int(i)][1][rows_] for i, rows_ in zip(b, rows)]))
            yield self.scored[chunk], hidden, kl, sum(per_window[int(i)] for i in chunk) if logit_sq else 0.0

    @torch.inference_mode()
    def window_logit_sq(self) -> list[float]:
        """Σ dense logit² of each calibration window (computed on first use, then kept)."""
        if self._logit_sq_per_window is None:
            head = lm_head_of(self.model)
            self._logit_sq_per_window = [
                sum(float(head(part).square_().sum(dtype=torch.float64)) for part in window.split(CHUNK))
                for batch in self.dense_hidden for window in batch]
        return self._logit_sq_per_window

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_tokens(self) -> int:
        return int(self.windows.numel())

    def weights(self) -> dict[str, torch.Tensor]:
        """Dense weights per Linear FQN (for allocators): the pristine copy, or the model's own
        weights while no copy was needed (they are dense then)."""
        if self.pristine_weight:
            return self.pristine_weight
        modules = dict(self.model.named_modules())
        return {n: modules[n].weight.detach() for n in self.layout.linears}
