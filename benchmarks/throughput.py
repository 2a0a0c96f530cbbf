"""Study throughput: in-process vs Ray with 1 and 2 workers; orchestrator overhead with SQLite and PostgreSQL.

For each model (a tiny random Llama with SmolLM2's tokenizer, and SmolLM2-135M itself) and each
dispatcher, one TPE study (KL proxy, per-block sparsity, no warm starts) runs ``--trials`` trials;
measured in that run:

* trials per minute = trials / wall time of ``run_study`` (worker start-up reported apart);
* worker idle fraction = 1 − Σ(trial seconds measured inside the workers) / (wall × workers);
* orchestrator overhead per trial = time spent in the sampler's ``ask`` and ``tell`` (TPE proposal,
  every store write of the trial: params, attrs, intermediate values, state), and the whole loop's
  time outside scoring, per trial, as a fraction of the mean trial time.

The store is SQLite (WAL) everywhere, and additionally PostgreSQL (127.0.0.1:5432, database
``test``) for the in-process runs when a server answers.

    python benchmarks/throughput.py            # → benchmarks/throughput.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from _common import ROOT, WIKITEXT, machine, markdown_table, require_data

PG_URL = os.environ.get("SPARSEALLOC_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@dataclass
class Timed:
    """Wraps a sampler, adding up the seconds spent in ask() and tell()."""

    sampler: object
    ask_s: float = 0.0
    tell_s: float = 0.0
    busy_s: list[float] = field(default_factory=list)

    def ask(self, n: int = 1):
        start = time.perf_counter()
        try:
            return self.sampler.ask(n)
        finally:
            self.ask_s += time.perf_counter() - start

    def tell(self, number, outcome):
        if outcome.attrs.get("trial_seconds") is not None:
            self.busy_s.append(float(outcome.attrs["trial_seconds"]))
        start = time.perf_counter()
        try:
            return self.sampler.tell(number, outcome)
        finally:
            self.tell_s += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def tiny_model_dir(tokenizer, directory: Path) -> str:
    """A 4-block random Llama (hidden 64) with SmolLM2's tokenizer, saved for the workers to load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def spec_for(model: str, name: str, trials: int, samples: int, seq_len: int):
    from sparsealloc.spaces.spec import StudySpec

    return StudySpec.from_dict({
        "name": name, "model": model, "target_sparsity": 0.6, "trials": trials, "warm_start": [],
        "calibration": {"text": str(WIKITEXT / "valid.txt"), "samples": samples, "seq_len": seq_len,
                        "batch_size": 4},
        "device": "cpu", "seed": 0})


def run_one(spec, workers: int, storage_url: str, evaluator=None) -> dict:
    """One study through :func:`sparsealloc.search.study.run`, ask and tell timed; returns the measured row."""
    import optuna

    from sparsealloc.search.study import run

    timed: list[Timed] = []

    def timing(sampler) -> Timed:
        timed.append(Timed(sampler))
        return timed[-1]

    try:
        result = run(spec, storage_url, dispatcher="ray" if workers else "local",
                     dispatcher_options={"workers": workers, "cpus_per_worker": 1} if workers else None,
                     validate=False, evaluator=evaluator, sampler_hook=timing)
    finally:
        if storage_url.startswith("postgresql"):
            optuna.delete_study(study_name=spec.name, storage=storage_url)
    sampler, wall = timed[0], result.seconds
    startup = result.setup_seconds + result.dispatcher_seconds
    n = len(sampler.busy_s)
    mean_trial = sum(sampler.busy_s) / n
    orchestrator = (sampler.ask_s + sampler.tell_s) / n
    outside = max(wall - sum(sampler.busy_s) / max(workers, 1), 0.0) / n if workers == 0 else float("nan")
    return {"dispatcher": "in-process" if workers == 0 else f"Ray × {workers}",
            "store": "PostgreSQL" if storage_url.startswith("postgresql") else "SQLite",
            "trials": n, "start-up s": round(startup, 1), "wall s": round(wall, 1),
            "trials/min": round(60 * n / wall, 2), "mean trial s": round(mean_trial, 3),
            "worker idle": round(1 - sum(sampler.busy_s) / (wall * max(workers, 1)), 3),
            "ask+tell ms/trial": round(1000 * orchestrator, 1),
            "ask+tell / trial": round(orchestrator / mean_trial, 4),
            "loop overhead / trial": round(outside / mean_trial, 4) if workers == 0 else float("nan")}


def pg_available() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 3}).connect():
            return True
    except Exception:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-trials", type=int, default=30)
    parser.add_argument("--smollm2-trials", type=int, default=8)
    parser.add_argument("--models", default="tiny,smollm2", help="comma list among tiny, smollm2")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "throughput.md"))
    args = parser.parse_args()
    require_data()
    import optuna
    import ray
    from tqdm.auto import tqdm

    from sparsealloc.core import progress
    from sparsealloc.pruning import load_model
    from sparsealloc.search.session import build_evaluator

    progress.set_mode("quiet")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    has_pg = pg_available()
    tmp = Path(tempfile.mkdtemp(prefix="sparsealloc-throughput-"))
    _, tokenizer, _ = load_model("smollm2-135m")
    tiny = tiny_model_dir(tokenizer, tmp / "tiny")
    models = [m for key, m in (("tiny", ("tiny Llama (4×64)", tiny, args.tiny_trials, 8, 128)),
                               ("smollm2", ("SmolLM2-135M", "smollm2-135m", args.smollm2_trials, 16, 256)))
              if key in args.models.split(",")]
    runs = [(label, model, trials, samples, seq_len, workers, store)
            for label, model, trials, samples, seq_len in models
            for workers, store in [(0, "sqlite"), (0, "pg"), (1, "sqlite"), (2, "sqlite")]
            if store != "pg" or has_pg]
    rows, evaluators = [], {}
    for label, model, trials, samples, seq_len, workers, store in tqdm(runs, desc="throughput runs", unit="run"):
        name = f"throughput-{uuid.uuid4().hex[:8]}"
        spec = spec_for(model, name, trials, samples, seq_len)
        url = PG_URL if store == "pg" else f"sqlite:///{tmp / (name + '.db')}"
        evaluator = evaluators.get(model)
        if evaluator is None:  # built once per model; Ray workers get its calibration windows
            evaluator = evaluators[model] = build_evaluator(spec)
        row = {"model": label, **run_one(spec, workers, url, evaluator)}
        rows.append(row)
        print(row, flush=True)
    ray.shutdown()
    frame = pd.DataFrame(rows)
    smol = frame[(frame.model == "SmolLM2-135M") & (frame.dispatcher == "in-process")]
    verdict = " ".join(f"{r.store}: ask+tell {r['ask+tell / trial']:.2%} of the trial time, whole loop outside "
                       f"scoring {r['loop overhead / trial']:.2%}." for _, r in smol.iterrows())
    text = "\n".join([
        "# Throughput (benchmarks/throughput.py)", "",
        f"Machine: {machine()}, {os.cpu_count()} CPU cores, shared with other jobs while it ran. "
        "TPE, KL proxy, per-block sparsity around 60%, no warm starts. Tiny model: calibration 8×128 "
        "tokens; SmolLM2: 16×256 (WikiText-2 valid). Ray workers get 1 CPU (1 torch thread) each; "
        "the in-process run uses all torch threads of the orchestrator's process. 'start-up' is model "
        "loading and the worker contexts (statistics, dense reference), before the first trial.", "",
        markdown_table(frame), "",
        f"Orchestrator overhead on SmolLM2 (in-process): {verdict}",
        "", "PostgreSQL runs: " + ("included." if has_pg else "skipped (no server answered at " + PG_URL + ")."), ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
