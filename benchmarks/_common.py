"""Shared protocol of the benchmarks (engine issue): SmolLM2-135M-Instruct, WikiText-2.

Calibration: 16 windows × 256 tokens of ``valid.txt`` (seed 0). Evaluation: ``test.txt`` tokenized
as one stream, the first 20 non-overlapping windows of 512 tokens.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
CALIB_SAMPLES, CALIB_SEQ_LEN, SEED = 16, 256, 0
EVAL_SEQ_LEN, EVAL_WINDOWS = 512, 20


def require_data() -> None:
    if not (WIKITEXT / "valid.txt").is_file():
        sys.exit(f"needs WikiText-2 at {WIKITEXT} (../shared beside the repo)")


def machine() -> str:
    """The machine in one line: CPU model (timings differ several-fold between CPUs), threads, torch, device."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = models[0] if models else platform.machine()
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"


def from_root(path: str | Path) -> str:
    """``path`` as a command line run from the repository root spells it (for the commands the reports print)."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def load_smollm2():
    from sparsealloc.pruning import load_model

    return load_model("smollm2-135m")


def calib_windows(tokenizer):
    from sparsealloc.pruning import TextSource, calibration_windows

    return calibration_windows(tokenizer, TextSource("file", str(WIKITEXT / "valid.txt")), CALIB_SAMPLES, CALIB_SEQ_LEN, SEED)


def test_stream(tokenizer):
    from sparsealloc.pruning import TextSource, tokenize_stream

    return tokenize_stream(tokenizer, TextSource("file", str(WIKITEXT / "test.txt")).read())


def test_ppl(model, stream) -> float:
    from sparsealloc.pruning import perplexity

    return perplexity(model, stream, EVAL_SEQ_LEN, EVAL_WINDOWS)


def plan_ppl(evaluator, plan, model, stream, windows: int = EVAL_WINDOWS) -> float:
    """Held-out perplexity of ``model`` with ``plan`` applied by a study's evaluator (its pruning and KV bits)."""
    from sparsealloc.pruning import perplexity

    with evaluator.applied(plan):
        return perplexity(model, stream, EVAL_SEQ_LEN, windows)


def uniform_kv_plan(space, bits: int):
    """The plan of ``space``'s defaults (uniform sparsity) with every K and V slot at ``bits``."""
    return space.decode({**space.defaults(), **dict.fromkeys(space.kv_params, bits)}).to_plan()


def wanda_kv_evaluator(prefix: str, target: float = 0.5, mix: str | None = None):
    """The KV benchmarks' shared setup (kv_front.py's texts): SmolLM2, Wanda at ``target``, a KV search
    space, calibration 32×256 from the first 70% of WikiText-2 valid (half that and half ``mix`` when
    given, see ``split_valid``), validation 8×512 from its last 30% bounded to 60 s.

    Returns the model, its tokenizer, the base StudySpec and an evaluator built once for it.
    """
    import tempfile

    from search_quality import split_valid
    from sparsealloc.core import progress
    from sparsealloc.search.session import build_evaluator
    from sparsealloc.spaces.spec import CalibrationSpec, MetricSpec, StudySpec, ValidationSpec

    progress.set_mode("quiet")
    calib_text, val_text = split_valid(Path(tempfile.mkdtemp(prefix=prefix)), mix)
    model, tokenizer, _ = load_smollm2()
    base = StudySpec(name="base", target_sparsity=target, metric=MetricSpec(name="wanda"), space=("kv",),
                     calibration=CalibrationSpec(text=str(calib_text), samples=32, seq_len=256),
                     validation=ValidationSpec(text=str(val_text), seq_len=512, windows=8, top_k=5, max_seconds=60))
    return model, tokenizer, base, build_evaluator(base, model, tokenizer)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def markdown_table(frame) -> str:
    """pandas DataFrame → GitHub Markdown (no tabulate dependency)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
