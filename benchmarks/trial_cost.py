"""What a trial costs next to one dense forward pass, with and without early stopping; worker RSS.

One run on SmolLM2 with the default study spec (TPE over per-block sparsity, Wanda, the default
proxy) and the benchmark calibration protocol (16×256 tokens of WikiText-2 valid, seed 0, batch 4):

1. a study without early stopping (the warm starts, then TPE), run through the real orchestrator and
   local dispatcher;
2. the same spec with early stopping: successive halving (η=3) with the zero-forward Gram rung first,
   and successive halving on the calibration batches only;
3. the dense forward — ``model(input_ids)`` with logits, same windows and batch size — timed before
   and after every few trials of both studies, so that the load of this shared machine weighs on
   both sides of the ratio alike.

A trial's time is the evaluator's own clock (plan, masks, forward, proxy; stored per trial as
``trial_seconds``); the study's wall time per trial adds TPE's ask/tell and the store. Worker peak
RSS: a separate process builds a worker exactly as ``sparsealloc study run`` does, with 32×256 =
8192 calibration tokens, scores a few trials and reports its peak resident set (``VmHWM``, model
loading included).

    python benchmarks/trial_cost.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from _common import ROOT, WIKITEXT, Timer, load_smollm2, machine, markdown_table, require_data

BATCH = 4


def base_spec(name: str, samples: int = 16, **changes):
    from sparsealloc.spaces.spec import StudySpec

    data = {"name": name, "calibration": {"text": str(WIKITEXT / "valid.txt"), "samples": samples, "seq_len": 256,
                                          "seed": 0, "batch_size": BATCH}, **changes}
    return StudySpec.from_dict(data)


def dense_forward_seconds(model, windows) -> float:
    with Timer() as t, torch.inference_mode():
        for batch in windows.split(BATCH):
            model(input_ids=batch, use_cache=False)
    return t.seconds


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux keeps that across
    ``exec``, so a child started from a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def worker_rss(samples: int, early: bool, trials: int) -> dict:
    """Build a worker as the CLI does (``build_evaluator``), score ``trials`` trials, report the peak RSS."""
    from sparsealloc.core import progress
    from sparsealloc.search.session import build_evaluator

    progress.set_mode("quiet")
    changes = {"early_stopping": {"pruner": "successive_halving", "gram_rung": True}} if early else {}
    spec = base_spec("rss", samples=samples, **changes)
    with Timer() as t_load:
        model, tokenizer, _ = load_smollm2()
    rss_loaded = peak_rss_mb()
    with Timer() as t_build:
        evaluator = build_evaluator(spec, model, tokenizer)
    seconds = []
    values = evaluator.space.defaults()
    for i in range(trials):
        report = (lambda step, value: False) if early else None  # the rung runs, nothing stops
        with Timer() as t:
            outcome = evaluator(values, report=report) if report else evaluator(values)
        assert outcome.state == "complete", outcome.reason
        seconds.append(t.seconds)
    return {"tokens": int(evaluator.ctx.windows.numel()), "early_stopping": early,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_after_load_mb": rss_loaded, "load_s": t_load.seconds, "build_s": t_build.seconds,
            "trial_s": seconds, "proxy": spec.objectives[0]}


class DenseBetweenChunks:
    """Sampler wrapper (``run(sampler_hook=chunks.wrap)``): a dense forward at the start and after every
    ``every`` finished trials, timed apart from the study; no more trials once ``total`` are finished."""

    def __init__(self, model, windows, total: int, every: int) -> None:
        self.model, self.windows, self.total, self.every = model, windows, total, every
        self.sampler = None
        self.dense: list[float] = []
        self.next_dense = 0

    def wrap(self, sampler):
        self.sampler = sampler
        return self

    def ask(self, n: int = 1):
        from optuna.trial import TrialState

        done = len(self.sampler.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        if done >= self.next_dense:
            self.dense.append(dense_forward_seconds(self.model, self.windows))
            self.next_dense = min(self.total, done + self.every)
        return [] if done >= self.total else self.sampler.ask(n)  # nothing asked, nothing running: run ends

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def run_in_chunks(spec, evaluator, storage_url: str, model, windows, total: int, every: int):
    """Run the study (:func:`sparsealloc.search.study.run`) until it holds ``total`` finished trials, a
    dense forward before and after every ``every`` trials; returns the study, its wall time without
    the dense forwards (orchestrator included) and the dense forward times."""
    from sparsealloc.search.study import run

    chunks = DenseBetweenChunks(model, windows, total, every)
    result = run(spec.override(trials=10 * total), storage_url, evaluator=evaluator, validate=False,
                 sampler_hook=chunks.wrap)
    return result.study, result.seconds - sum(chunks.dense), chunks.dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-trials", type=int, default=8)
    parser.add_argument("--es-trials", type=int, default=24)
    parser.add_argument("--every", type=int, default=4, help="trials between dense forwards")
    parser.add_argument("--rss-samples", type=int, default=32, help="calibration windows of 256 for the RSS worker")
    parser.add_argument("--rss-trials", type=int, default=2)
    parser.add_argument("--worker-rss", choices=["default", "early"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "trial_cost.md"))
    args = parser.parse_args()
    require_data()
    if args.worker_rss:
        print(json.dumps(worker_rss(args.rss_samples, args.worker_rss == "early", args.rss_trials)))
        return
    import optuna

    from sparsealloc.core import progress
    from sparsealloc.objectives import TrialEvaluator
    from sparsealloc.search.session import build_evaluator

    progress.set_mode("quiet")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_start = os.getloadavg()
    started = time.perf_counter()
    model, tokenizer, _ = load_smollm2()
    stamp = int(time.time())
    full_spec = base_spec(f"full-{stamp}", trials=args.full_trials)
    es_specs = {"early stopping: SH + Gram rung": base_spec(f"es-rung-{stamp}", early_stopping={
                    "pruner": "successive_halving", "reduction_factor": 3, "gram_rung": True}),
                "early stopping: SH on batches": base_spec(f"es-batches-{stamp}", early_stopping={
                    "pruner": "successive_halving", "reduction_factor": 3, "gram_rung": False})}
    with Timer() as t_setup:
        full = build_evaluator(full_spec, model, tokenizer)
    ctx = full.ctx
    with Timer() as t_grams:
        ctx.cache_layer_grams()  # the Gram rung's extra: H/N per Linear (bfloat16), one more calibration pass
    windows = ctx.windows
    storage_url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='trial-cost-')) / 'studies.db'}"
    results = {}
    studies = [("full fidelity", full_spec, full, args.full_trials)]
    studies += [(label, spec, TrialEvaluator(ctx, spec), args.es_trials) for label, spec in es_specs.items()]
    for label, spec, evaluator, total in studies:
        study, wall, dense = run_in_chunks(spec, evaluator, storage_url, model, windows, total, args.every)
        trials = [t for t in study.get_trials(deepcopy=False) if "trial_seconds" in t.user_attrs]
        results[label] = {"trials": trials, "dense": dense, "wall": wall}
        print(label, "done", flush=True)

    rss = []
    for config in ("default", "early"):
        cmd = [sys.executable, __file__, "--worker-rss", config, "--rss-samples", str(args.rss_samples),
               "--rss-trials", str(args.rss_trials)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        rss.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rss[-1], flush=True)
    load_end = os.getloadavg()

    lines, rows = [], []
    for label, r in results.items():
        seconds = [t.user_attrs["trial_seconds"] for t in r["trials"]]
        dense_mean = sum(r["dense"]) / len(r["dense"])
        states = pd.Series([t.state.name for t in r["trials"]]).value_counts().to_dict()
        mean = sum(seconds) / len(seconds)
        rows.append({"study": label, "trials": len(seconds), "states": ", ".join(f"{k} {v}" for k, v in states.items()),
                     "mean trial s": mean, "mean dense forward s": dense_mean, "trial / dense": mean / dense_mean,
                     "study wall s per trial": r["wall"] / len(seconds),
                     "wall / dense": r["wall"] / len(seconds) / dense_mean,
                     "best complete value": min((t.values[0] for t in r["trials"] if t.state.name == "COMPLETE"),
                                                default=float("nan")),
                     "depth_ramp warm start": next((t.state.name for t in r["trials"]
                                                    if t.user_attrs.get("warm_start") == "depth_ramp"), "")})
        for t in r["trials"]:
            lines.append({"study": label, "trial": t.number, "state": t.state.name,
                          "warm start": t.user_attrs.get("warm_start", ""),
                          "stopped at step": t.user_attrs.get("pruned_at_step", ""),
                          "steps reported": len(t.intermediate_values), "seconds": t.user_attrs["trial_seconds"],
                          "value (pruned: last reported)": t.values[0] if t.values else float("nan")})
    summary = pd.DataFrame(rows)
    dense_all = {label: ", ".join(f"{s:.2f}" for s in r["dense"]) for label, r in results.items()}
    n_batches = len(ctx.dense_hidden)
    text = [
        "# Trial cost (benchmarks/trial_cost.py)", "",
        f"Machine: {machine()}; load average {load_start[0]:.1f} at the start and {load_end[0]:.1f} at the end "
        "(2 cores; the ratios compare trials with dense forwards timed in between them). SmolLM2-135M-Instruct; default study spec (TPE over per-block "
        f"sparsity at {full_spec.target_sparsity:.0%}, Wanda, proxy `{full_spec.objectives[0]}`, warm starts "
        f"{', '.join(full_spec.warm_start)}); calibration {windows.shape[0]}×{windows.shape[1]} tokens of WikiText-2 "
        f"valid (seed 0), batch {BATCH} ({n_batches} batches). Early stopping: Optuna's successive halving, η=3 "
        "(rungs at steps 1 and 3): with the Gram rung, step 1 is the zero-forward summed layer-local error and step "
        "3 the proxy after 2 batches; on batches only, steps 1 and 3 are the proxy after 1 and 3 batches. Setup "
        f"{t_setup.seconds:.0f} s "
        f"(+{t_grams.seconds:.0f} s for the Gram matrices); whole run {(time.perf_counter() - started) / 60:.1f} min.",
        "",
        "Dense forward = `model(input_ids)` over the same windows and batch size, logits included, timed "
        f"before and after every {args.every} trials: {dense_all}.", "",
        markdown_table(summary), "",
        "`trial / dense`: mean of the evaluator's per-trial time (plan, masks, forward, proxy) over the mean dense "
        "forward of the same study; `wall / dense` adds the orchestrator (TPE ask/tell, SQLite writes).", "",
        f"Worker peak RSS (`VmHWM` of a separate process built like `sparsealloc study run`, model loading "
        f"included; {args.rss_trials} trials each):", "",
        markdown_table(pd.DataFrame([{"worker": "early stopping (Gram rung)" if r["early_stopping"] else "default spec",
                                      "calibration tokens": r["tokens"], "proxy": r["proxy"],
                                      "peak RSS MB": r["peak_rss_mb"], "peak RSS after loading MB": r["peak_rss_after_load_mb"],
                                      "build s": r["build_s"], "trial s": ", ".join(f"{s:.1f}" for s in r["trial_s"])}
                                     for r in rss])), "",
        "Every trial:", "", markdown_table(pd.DataFrame(lines)), "",
    ]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
