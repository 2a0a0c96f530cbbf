"""Text generation through a given cache (e.g. the packed quantized KV cache), timed, with progress."""

from __future__ import annotations

import inspect

import time
from dataclasses import dataclass

import torch
from torch import nn

from sparsealloc.core.errors import SpecError
from sparsealloc.core.progress import log_event, track


@dataclass(frozen=True)
class Generation:
    """What :func:`generate_text` produced.

    Attributes:
        text: The generated continuation (prompt excluded), special tokens removed.
        full_text: Prompt and continuation decoded together (spacing as the tokenizer joins them).
        prompt_tokens: Tokens in the prompt.
        new_tokens: Tokens generated.
        seconds: Wall time of ``model.generate`` (prefill included).
    """

    text: str
    full_text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


class _ProgressStreamer:
    """A ``generate`` streamer that advances a :func:`~sparsealloc.core.progress.track` per token."""

    def __init__(self, total: int) -> None:
        self._steps = iter(track(range(total), desc="generation", total=total, unit="token"))
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        next(self._steps, None)

    def end(self) -> None:
        for _ in self._steps:  # close the bar (an early end of sequence leaves steps unused)
            pass


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``: transformers 5.24 renamed the
    forward argument ``past_key_values`` to ``cache`` (the old name deprecated until 5.40); older
    releases reject ``cache`` (seen with 5.17 on the GPU check, benchmarks/gpu_check.md)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


@torch.inference_mode()
def generate_text(model: nn.Module, tokenizer, prompt: str, cache=None, max_new_tokens: int = 64,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                  ignore_eos: bool = False) -> Generation:
    """Generate a continuation of ``prompt`` with ``model.generate`` through ``cache``.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        prompt: Text to continue (no chat template is applied).
        cache: A transformers ``Cache`` to generate through (None: the model's default cache).
        max_new_tokens: Tokens to generate at most.
        do_sample: Sample (with ``temperature`` and ``top_p``) instead of greedy decoding.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        seed: Seed of the sampler.
        ignore_eos: Always generate ``max_new_tokens`` tokens (for memory and speed measurements).
    """
    if not prompt:
        raise SpecError("expected a non-empty prompt, but got ''")
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    n_prompt = int(encoded.input_ids.shape[1])
    if n_prompt == 0:
        raise SpecError(f"expected a prompt of at least one token, but {prompt!r} tokenized to none")
    options = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    if ignore_eos:
        options["min_new_tokens"] = max_new_tokens
    if cache is not None:
        options.update(cache_kwargs(model, cache))
    torch.manual_seed(seed)
    start = time.perf_counter()
    output = model.generate(**encoded, streamer=_ProgressStreamer(max_new_tokens), **options)
    seconds = time.perf_counter() - start
    new = output[0, n_prompt:]
    result = Generation(tokenizer.decode(new, skip_special_tokens=True),
                        tokenizer.decode(output[0], skip_special_tokens=True), n_prompt, int(new.numel()), seconds)
    log_event("generation", prompt_tokens=n_prompt, new_tokens=result.new_tokens, seconds=round(seconds, 3))
    return result
