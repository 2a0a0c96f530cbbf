"""How a pruned model is written to disk: dense safetensors at a chosen dtype, or sparse-bitmask.

Two formats, both a Hugging Face folder (``config.json``, tokenizer, ``*.safetensors``):

* ``dense``: the plain checkpoint ``save_pretrained`` writes, with every floating tensor cast to
  ``--dtype`` (fp32, bf16 or fp16) and ``config.json``'s ``dtype`` set to match. Any transformers,
  vLLM or lm-eval reads it.
* ``compressed-tensors``: the *sparse-bitmask* layout of the ``compressed-tensors`` package. The
  weight ``M.weight`` (R×C) of each pruned Linear ``M`` is replaced by four tensors: ``M.shape``
  (int64 [R, C]), ``M.compressed`` (the non-zero values in row-major order, in ``--dtype``),
  ``M.bitmask`` (uint8 R×⌈C/8⌉, bit j of row i set where W[i, j] ≠ 0, little-endian, packed by
  ``compressed_tensors.utils.pack_bitmasks``) and ``M.row_offsets`` (int64 [R], where row i starts
  in ``compressed``). ``config.json`` gets ``quantization_config = {quant_method:
  compressed-tensors, version, sparsity_config: BitmaskConfig(...).model_dump(), transform_config:
  {}}``, as ``ModelCompressor.update_config`` wrote it. A Linear is stored this way only when that is
  smaller than dense (⅛ byte of mask per weight and 8 bytes per row against the dropped zeros).
  For the same model the tensors are identical to those compressed-tensors 0.14's own
  ``ModelCompressor(sparsity_config=BitmaskConfig()).compress`` writes, and its
  ``BitmaskCompressor.decompress`` reads ours back exactly (checked in a separate environment with
  transformers 4.57.6 and compressed-tensors 0.14.0.1; see README).

Who reads sparse-bitmask today: compressed-tensors dropped its sparse compressors in 0.15.0, and
transformers 5's ``CompressedTensorsConfig`` has no ``sparsity_config`` path, so with the pinned
stack (transformers 5.24, compressed-tensors 0.19) plain ``AutoModelForCausalLM.from_pretrained``
does *not* decompress: it re-initialises the compressed weights at random and lists them as MISSING
in its load report. The last stack with the sparse path (transformers 4.57.6, compressed-tensors
0.14.0.1) fails in ``from_pretrained`` on any sparse-bitmask checkpoint, the package's own included
("Cannot copy out of meta tensor"). llm-compressor stopped writing the format by default in 2024
because vLLM did not load it (llm-compressor PR #60); vLLM's sparse kernels are 2:4. sparsealloc reads
it itself: :func:`~sparsealloc.pruning.model.models.load_model` (so ``--model DIR`` of every command, and
``sparsealloc evaluate --tasks`` for lm-eval) detects the layout and decompresses the weights exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsealloc.core.errors import SpecError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("dense", "compressed-tensors")
BITMASK_FORMAT = "sparse-bitmask"
BITMASK_PARAMS = ("shape", "compressed", "bitmask", "row_offsets")
INTEROP_HINT = "pip install 'sparsealloc[interop]'"


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`save_checkpoint` wrote.

    Attributes:
        directory: The checkpoint folder.
        format: ``dense`` or ``compressed-tensors``.
        dtype: Name of the floating dtype of the stored tensors (``fp32``, ``bf16``, ``fp16``).
        bytes_on_disk: Size of the weight files (``*.safetensors`` plus their index) as written.
        dense_bytes: Tensor bytes of the same weights stored densely at the same dtype.
        compressed: FQNs of the Linear modules stored as sparse bitmasks.
    """

    directory: Path
    format: str
    dtype: str
    bytes_on_disk: int
    dense_bytes: int
    compressed: tuple[str, ...] = field(default_factory=tuple)


def check_format(name: str) -> str:
    """Check ``--format`` (and, for compressed-tensors, that the package is installed) before any work.

    Raises:
        SpecError: an unknown format, or compressed-tensors without the package (with the install hint).
    """
    if name not in FORMATS:
        raise SpecError(f"expected --format to be one of {', '.join(FORMATS)}, but got {name!r}")
    if name == "compressed-tensors":
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise SpecError("--format compressed-tensors needs the package compressed-tensors: "
                            f"{INTEROP_HINT}") from None
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``/``bf16``/``fp16`` for a torch dtype (else its torch name)."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def umask() -> int:
    """The process's file-creation mask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_permissions(directory: str | Path) -> None:
    """Give the weight files of a checkpoint ordinary permissions (0666 minus the umask, so 0644).

    transformers writes ``model.safetensors`` through a private temporary file, which leaves it 0600:
    unreadable to other users of a shared model folder or to a serving container's user.
    """
    mode = 0o666 & ~umask()
    for path in Path(directory).glob("*.safetensors*"):
        if path.is_file():
            path.chmod(mode)


# --------------------------------------------------------------------------- bitmask codec
def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four sparse-bitmask tensors of a 2-D weight (keys are :data:`BITMASK_PARAMS`)."""
    from compressed_tensors.utils import pack_bitmasks

    weight = weight.detach().cpu()
    mask = weight != 0
    counts = mask.sum(dim=-1)
    return {"shape": torch.tensor(list(weight.shape), dtype=torch.int64),
            "compressed": weight[mask].contiguous(),
            "bitmask": pack_bitmasks(mask),
            "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}


def bitmask_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight of :func:`bitmask_compress`'s tensors (exact inverse)."""
    from compressed_tensors.utils import unpack_bitmasks

    shape = [int(v) for v in parts["shape"].tolist()]
    mask = unpack_bitmasks(parts["bitmask"], shape)
    values = parts["compressed"]
    if int(mask.sum()) != values.numel():
        raise SpecError(f"expected {int(mask.sum())} stored values for a bitmask of shape {shape}, "
                        f"but found {values.numel()}")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def bitmask_bytes(weight: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes the sparse-bitmask tensors of ``weight`` take at ``dtype`` (values + bits + offsets + shape)."""
    rows, cols = weight.shape
    nonzero = int((weight != 0).sum())
    return nonzero * torch.empty((), dtype=dtype).element_size() + rows * ((cols + 7) // 8) + rows * 8 + 16


# --------------------------------------------------------------------------- save
def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    return sorted(directory.glob("*.safetensors"))


def _tensor_bytes(shard: Path) -> int:
    """Bytes of tensor data in a safetensors file, read from its header (no tensor is loaded)."""
    with shard.open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return sum(end - start for key, value in header.items() if key != "__metadata__"
               for start, end in [value["data_offsets"]])


def _rewrite_shards(directory: Path, dtype: torch.dtype, compress: set[str]) -> tuple[int, list[str]]:
    """Cast every floating tensor to ``dtype`` and store the weights of ``compress`` (module FQNs)
    as sparse bitmasks where that is smaller; returns (dense tensor bytes, compressed FQNs)."""
    from safetensors.torch import load_file, save_file

    dense_bytes, compressed, new_keys = 0, [], {}
    for shard in _shards(directory):
        tensors = load_file(str(shard))
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            dense_bytes += tensor.numel() * tensor.element_size()
            module = key.removesuffix(".weight")
            if (key.endswith(".weight") and module in compress and tensor.dim() == 2
                    and bitmask_bytes(tensor, dtype) < tensor.numel() * tensor.element_size()):
                for param, value in bitmask_compress(tensor).items():
                    out[f"{module}.{param}"] = value
                    new_keys[f"{module}.{param}"] = shard.name
                new_keys[key] = None
                compressed.append(module)
            else:
                out[key] = tensor.contiguous()
        save_file(out, str(shard), metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file() and new_keys:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = {k: v for k, v in data["weight_map"].items() if new_keys.get(k, v) is not None}
        weight_map.update({k: v for k, v in new_keys.items() if v is not None})
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return dense_bytes, compressed


def _bitmask_quantization_config(global_sparsity: float, structure: str, targets: list[str]) -> dict:
    """``config.json``'s ``quantization_config`` for a sparse-bitmask checkpoint (compressed-tensors' schema)."""
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig

    sparsity = BitmaskConfig(global_sparsity=round(global_sparsity, 6), sparsity_structure=structure,
                             targets=targets, ignore=["lm_head"])
    return {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
            "sparsity_config": sparsity.model_dump(), "transform_config": {}}


def save_checkpoint(model: nn.Module, tokenizer, directory: str | Path, plan=None, *, format: str = "dense",
                    dtype: torch.dtype | None = None) -> CheckpointInfo:
    """Save a pruned model as a Hugging Face checkpoint in ``format`` at ``dtype``, with ``plan.json``.

    The model in memory is left as it is (the cast happens on the written tensors).

    Args:
        model: The pruned model.
        tokenizer: Its tokenizer (None: none is saved).
        directory: Output folder (created).
        plan: The :class:`~sparsealloc.core.plan.AllocationPlan`, saved as ``plan.json`` (None: none).
        format: ``dense`` or ``compressed-tensors`` (sparse-bitmask).
        dtype: Floating dtype of the stored tensors (None: the model's).

    Returns:
        A :class:`CheckpointInfo` with the bytes on disk and the dense bytes at the same dtype.

    Raises:
        SpecError: unknown format, or compressed-tensors without the package.
    """
    from sparsealloc.pruning.apply import save_pruned
    from sparsealloc.pruning.model.structure import model_layout

    check_format(format)
    dtype = dtype or next(model.parameters()).dtype
    directory = Path(directory)
    save_pruned(model, tokenizer, directory, plan)
    linears = model_layout(model).linears
    if format == "dense" and all(t.dtype == dtype for t in model.state_dict().values() if t.is_floating_point()):
        dense_bytes, compressed = sum(_tensor_bytes(shard) for shard in _shards(directory)), []  # as written
    else:
        dense_bytes, compressed = _rewrite_shards(directory, dtype, set(linears) if format != "dense" else set())
    compressed = [name for name in linears if name in set(compressed)]  # module order
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    if format == "compressed-tensors":
        modules = dict(model.named_modules())
        zeros = sum(int((modules[n].weight == 0).sum()) for n in linears)
        total = sum(modules[n].weight.numel() for n in linears)
        structure = getattr(plan, "pattern", "unstructured") if plan is not None else "unstructured"
        config["quantization_config"] = _bitmask_quantization_config(zeros / max(total, 1), structure, compressed)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fix_permissions(directory)
    on_disk = sum(p.stat().st_size for p in directory.glob("*.safetensors*") if p.is_file())
    return CheckpointInfo(directory, format, dtype_name(dtype), on_disk, dense_bytes, tuple(compressed))


# --------------------------------------------------------------------------- load
def is_bitmask_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a compressed-tensors sparse-bitmask checkpoint."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") or {}
    return (quant.get("quant_method") == "compressed-tensors"
            and (quant.get("sparsity_config") or {}).get("format") == BITMASK_FORMAT)


def decompressed_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a sparse-bitmask checkpoint, with every bitmask weight made dense again."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in _shards(Path(directory)):
        state.update(load_file(str(shard)))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in state if k.rsplit(".", 1)[-1] in BITMASK_PARAMS]:
        module, param = key.rsplit(".", 1)
        groups.setdefault(module, {})[param] = state.pop(key)
    for module, parts in groups.items():
        if set(parts) != set(BITMASK_PARAMS):
            raise SpecError(f"expected {', '.join(BITMASK_PARAMS)} for the bitmask weight of {module!r}, "
                            f"but found {', '.join(sorted(parts))}")
        state[f"{module}.weight"] = bitmask_decompress(parts)
    return state


def load_bitmask_model(directory: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM from a sparse-bitmask checkpoint, its weights decompressed exactly, cast to ``dtype``.

    Raises:
        SpecError: the compressed-tensors package is missing, or the tensors do not fit the config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_format("compressed-tensors")
    config = AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = decompressed_state_dict(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise SpecError(f"expected the tensors of {str(directory)!r} to fit its config, but "
                        f"{len(missing)} are missing ({', '.join(missing[:2])}) and {len(unexpected)} "
                        f"unexpected ({', '.join(unexpected[:2])})")
    return model
