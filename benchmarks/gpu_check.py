"""One-shot GPU check: trial costs and short studies (in process and on Ray) on a random SmolLM2.

Meant for a lent GPU machine without network and without the embedded GGUF model, so the model is
a Llama with SmolLM2-135M-Instruct's exact config and random weights (seed 0). Everything the
check reads comes from ``--data`` (default ``.gpucheck/`` beside this folder, prepared on a machine
that has the model and WikiText-2):

* ``smollm2_config.json``: ``model.config.to_dict()`` of ``load_model("smollm2-135m")``;
* ``tokenizer/``: its tokenizer (``save_pretrained``), so that the random model's folder loads with
  ``load_model`` like any checkpoint (the Ray workers load it that way);
* ``calib_ids.pt``: 32×256 token ids of WikiText-2 valid (``tokenize_stream`` + ``sample_windows``,
  seed 0); ``eval_ids.pt``: the first 20×512 tokens of WikiText-2 test.

Sections (each in its own try/except; the Markdown is rewritten after every section, so a run cut
off by ``timeout`` still leaves what was measured):

a. environment (torch, CUDA, device, memory, where ``sparsealloc`` is imported from);
b. the model: built from the config on the CPU (seed 0), saved, loaded with ``load_model`` (cuda
   when present, fp32), and the worker context built with ``build_evaluator``;
c. timings, each the median of ``--repeats`` after a warm-up, with ``torch.cuda.synchronize``:
   the dense forward over the calibration windows, a Wanda trial at 70% (default spec), evo trials
   (bf16 proxy, per-Linear levels), the SparseGPT level database (first trial builds it) and a
   database trial, each as a ratio to the dense forward (as in trial_cost.md); perplexity of the
   dense model and of uniform-70% plans on the evaluation ids (a smoke number: random weights);
d. a short study through ``sparsealloc.search.study.run`` with the Ray dispatcher (GPU workers
   sharing the GPU through fractional ``gpus_per_worker``), reporting trials/s, each worker's
   device and the failed trials;
e. the same study with the local (in-process) dispatcher.

    python benchmarks/gpu_check.py --data .gpucheck --out gpu_check.md          # GPU machine
    python benchmarks/gpu_check.py --data .gpucheck --small --out /tmp/x.md     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()
SUBPACKAGES = ("cli", "core", "objectives", "pruning", "search", "spaces", "storage")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:400] if text else type(exc).__name__


class Report:
    """Sections of Markdown, written in a fixed order after every change."""

    ORDER = ("a", "b", "c", "d", "e")
    TITLES = {"a": "a. Environment", "b": "b. Model and worker context",
              "c": "c. Trial costs on the device", "d": "d. Short study, Ray dispatcher",
              "e": "e. Short study, local (in-process) dispatcher"}

    def __init__(self, path: Path, header: list[str]) -> None:
        self.path, self.header = path, header
        self.sections: dict[str, list[str]] = {k: ["not run"] for k in self.ORDER}

    def set(self, key: str, lines: list[str]) -> None:
        self.sections[key] = lines
        self.write()

    def add(self, key: str, lines: list[str]) -> None:
        current = self.sections[key]
        self.sections[key] = (lines if current == ["not run"] else current + [""] + lines)
        self.write()

    def write(self) -> None:
        text = list(self.header)
        text.append(f"Elapsed at this write: {time.perf_counter() - T0:.1f} s.")
        for key in self.ORDER:
            text += ["", f"## {self.TITLES[key]}", "", *self.sections[key]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(text) + "\n")


def failed(what: str, exc: BaseException) -> list[str]:
    cause = exc
    while cause is not None and type(cause).__name__ != "Deadline":  # an alarm raised inside C code comes
        cause = cause.__cause__ or cause.__context__                 # back wrapped (SystemError)
    exc = cause or exc
    log(f"{what} FAILED: {one_line(exc)}")
    traceback.print_exc()
    return [f"**{what} failed**: `{one_line(exc)}`"]


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return out


class Clock:
    """Seconds with the device synchronized on both sides."""

    def __init__(self, torch) -> None:
        self.torch = torch
        self.cuda = torch.cuda.is_available()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


# ----------------------------------------------------------------------------------- sections
def environment(torch) -> list[str]:
    lines = [f"- Python {platform.python_version()} ({sys.executable}), {platform.machine()}, "
             f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), torch {torch.__version__} "
             f"(CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
             f"{torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        lines.append(f"- device: cuda, {torch.cuda.device_count()} visible; {p.name}, compute capability "
                     f"{p.major}.{p.minor}, {p.multi_processor_count} SMs, {total / 2**30:.1f} GiB "
                     f"({free / 2**30:.1f} GiB free at start); TF32 matmul "
                     f"{torch.backends.cuda.matmul.allow_tf32}, float32 matmul precision "
                     f"{torch.get_float32_matmul_precision()}")
    else:
        lines.append("- device: **no CUDA** (torch.cuda.is_available() is False): everything below ran on the CPU")
    versions = []
    for name in ("transformers", "optuna", "sqlalchemy", "ray", "numpy", "pandas", "safetensors"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            versions.append(f"{name} missing ({type(exc).__name__})")
    lines.append("- packages: " + ", ".join(versions))
    lines.append("- sparsealloc: " + package_origin())
    return lines


def package_origin() -> str:
    """Where sparsealloc is imported from, and whether its files match this checkout's."""
    import sparsealloc.core

    core_dir = Path(sparsealloc.core.__file__).resolve().parent
    if core_dir == (ROOT / "core").resolve():
        return f"imported from this checkout ({ROOT})"
    base = core_dir.parent
    differ, missing, total = [], [], 0
    for sub in SUBPACKAGES:
        for src in sorted((ROOT / sub).rglob("*.py")):
            total += 1
            installed = base / sub / src.relative_to(ROOT / sub)
            if not installed.is_file():
                missing.append(f"{sub}/{src.relative_to(ROOT / sub)}")
            elif installed.read_bytes() != src.read_bytes():
                differ.append(f"{sub}/{src.relative_to(ROOT / sub)}")
    state = ("identical to the checkout's" if not differ and not missing else
             f"**{len(differ)} differ, {len(missing)} missing** against the checkout "
             f"(e.g. {', '.join((differ + missing)[:5])}): the installed wheel is older or newer than the checkout")
    return f"installed at {base} ({total} checkout modules compared: {state})"


def build_model(args, torch, tmp: Path) -> dict:
    """Random-weight Llama with SmolLM2's config: built on the CPU (seed 0), saved with the real
    tokenizer, then loaded with the library's loader (cuda when present, fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sparsealloc.pruning import load_model, model_layout

    data = Path(args.data)
    cfg = json.loads((data / "smollm2_config.json").read_text())
    for key in ("transformers_version", "_name_or_path", "_model_name_or_path", "architectures",
                "quantization_config"):
        cfg.pop(key, None)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    model_dir = tmp / "random-smollm2"
    clock = Clock(torch)
    torch.manual_seed(0)
    t_init, cpu_model = clock(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    t_save, _ = clock(partial(cpu_model.save_pretrained, model_dir))
    AutoTokenizer.from_pretrained(data / "tokenizer").save_pretrained(model_dir)
    n_params = sum(p.numel() for p in cpu_model.parameters())
    del cpu_model
    t_load, (model, tokenizer, _) = clock(lambda: load_model(str(model_dir)))
    windows = torch.load(data / "calib_ids.pt")[: args.calib_samples, : args.calib_seq_len].contiguous()
    eval_ids = torch.load(data / "eval_ids.pt")[: args.eval_windows, : args.eval_seq_len].contiguous()
    layout = model_layout(model)
    text = tmp / "calibration-note.txt"  # preflight reads the spec's text; the windows are given
    text.write_text("Calibration windows are pre-tokenized WikiText-2 ids (.gpucheck/calib_ids.pt).\n")
    return {"model": model, "tokenizer": tokenizer, "model_dir": str(model_dir), "windows": windows,
            "eval_ids": eval_ids, "layout": layout, "n_params": n_params, "config": config,
            "calib_text": str(text),
            "times": {"init on CPU": t_init, "save_pretrained": t_save, "load_model": t_load}}


def base_spec(m: dict, name: str, **changes):
    from sparsealloc.spaces.spec import StudySpec

    w = m["windows"]
    data = {"name": name, "model": m["model_dir"], "target_sparsity": 0.7, "warm_start": ["uniform"], "seed": 0,
            "calibration": {"text": m["calib_text"], "samples": int(w.shape[0]), "seq_len": int(w.shape[1]),
                            "seed": 0, "batch_size": 4}, **changes}
    return StudySpec.from_dict(data)


def median_time(clock, fn, repeats: int, warmup: int = 1) -> tuple[float, list[float], object]:
    out = None
    for _ in range(warmup):
        _, out = clock(fn)
    times = []
    for _ in range(repeats):
        t, out = clock(fn)
        times.append(t)
    return statistics.median(times), times, out


def random_values(space, rng):
    """Uniform random ratio per group in the space's window (a TPE-like fresh plan: new masks)."""
    values = space.defaults()
    for p in space.params:
        if p.name.startswith("sparsity/"):
            values[p.name] = float(rng.uniform(p.low, p.high))
    return values


def offspring(space, parent, rng, swaps: int = 3):
    """An evo child of ``parent``: ``swaps`` level switches (the evo sampler's own mutation)."""
    from sparsealloc.search.samplers.evo import level_switch

    grid = space.levels
    levels = grid.levels_of({g: parent[g] for g in space.groups})
    child = dict(parent)
    for g, ratio in grid.ratios(level_switch(levels, grid.bounds, swaps, rng)).items():
        child[g] = space.by_name[g].clip(ratio)
    return child


def outcome_note(outcome) -> str:
    if outcome is None:
        return ""
    if outcome.state != "complete":
        return f"{outcome.state}: {outcome.reason}"
    return f"complete, proxy {outcome.values[0]:.4g}"


def trial_costs(args, torch, m: dict, ev: dict, report: Report) -> None:
    """Section c, one row at a time (each in its own try)."""
    import numpy as np

    from sparsealloc.objectives import TrialEvaluator
    from sparsealloc.pruning import perplexity
    from sparsealloc.search.session import build_evaluator

    clock = Clock(torch)
    model, windows, R = m["model"], m["windows"], args.repeats
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    notes: list[str] = []
    dense = {"s": float("nan")}

    def publish() -> None:
        head = [f"Calibration {windows.shape[0]}×{windows.shape[1]} tokens, batch 4; every time is the median of "
                f"{R} after a warm-up, `torch.cuda.synchronize()` before and after. `trial / dense` is the "
                "evaluator's call (plan, masks, forward, proxy) over the dense forward (`model(input_ids)`, "
                "logits included, same windows and batch size), as in trial_cost.md.", ""]
        report.set("c", head + table(rows) + ([""] + notes if notes else []))

    def row(label: str, seconds: float, all_times=None, note: str = "", windows_used: int | None = None) -> None:
        rows.append({"measurement": label, "windows": windows_used if windows_used is not None else int(windows.shape[0]),
                     "median s": seconds, "trial / dense": seconds / dense["s"] if dense["s"] == dense["s"] else float("nan"),
                     "all s": ", ".join(f"{t:.4f}" for t in (all_times or [])), "outcome": note})
        log(f"  {label}: {seconds:.4f} s {note}")
        publish()

    # dense forward
    try:
        def forward():
            with torch.inference_mode():
                for batch in windows.split(4):
                    model(input_ids=batch.to(model.device), use_cache=False)
        dense["s"], times, _ = median_time(clock, forward, R)
        row("dense forward (model(input_ids), logits)", dense["s"], times)
    except Exception as exc:  # noqa: BLE001
        notes += failed("dense forward", exc)
        publish()

    wanda = ev.get("wanda")
    if wanda is not None:
        try:
            uniform = wanda.space.defaults()
            t, times, out = median_time(clock, lambda: wanda(uniform), R)
            row("Wanda 70% trial, default spec (uniform plan, masks cached)", t, times, outcome_note(out))
            plans = [random_values(wanda.space, rng) for _ in range(R + 1)]
            it = iter(plans)
            t, times, out = median_time(clock, lambda: wanda(next(it)), R)
            row("Wanda 70% trial, default spec (fresh random per-block plan: new masks)", t, times, outcome_note(out))
        except Exception as exc:  # noqa: BLE001
            notes += failed("Wanda trial", exc)
            publish()
        try:
            spec = base_spec(m, "gpu-check-evo", sampler="evo")
            t_build, evo = clock(lambda: TrialEvaluator(wanda.ctx, spec))
            notes.append(f"- evo evaluator: objectives {list(spec.objectives)}, proxy dtype {spec.proxy_dtype}, "
                         f"granularity {spec.layerwise.granularity}, {len(evo.space.groups)} level groups; "
                         f"built on the Wanda context in {t_build:.2f} s (KL reference)")
            parent = evo.space.defaults()
            n = int(windows.shape[0])
            for size in sorted({min(2, n), min(8, n), n}):
                subset = None if size == n else tuple(range(size))
                children = iter([offspring(evo.space, parent, rng) for _ in range(R + 1)])
                t, times, out = median_time(clock, lambda: evo(next(children), windows=subset), R)
                row(f"evo trial: offspring of the uniform parent (≤3 level switches), bf16, {size} windows",
                    t, times, outcome_note(out), windows_used=size)
        except Exception as exc:  # noqa: BLE001
            notes += failed("evo trial", exc)
            publish()

    # SparseGPT level database
    try:
        if args.budget - (time.perf_counter() - T0) < 150:
            raise TimeoutError(f"skipped: less than 150 s of the {args.budget:.0f} s budget left for it and the studies")
        spec = base_spec(m, "gpu-check-sparsegpt", metric={"name": "sparsegpt"})
        t_build, sgpt = clock(lambda: build_evaluator(spec, model, m["tokenizer"], windows=windows))
        ev["sparsegpt"] = sgpt
        notes.append(f"- SparseGPT evaluator (calibration pass with XᵀX, database opened) built in {t_build:.2f} s; "
                     f"database under {sgpt.database.folder}")
        uniform = sgpt.space.defaults()
        t_first, out = clock(lambda: sgpt(uniform))
        summary = sgpt.database.stats_summary()
        row("SparseGPT: first trial at uniform 70% (builds the level database entries)", t_first, [t_first],
            outcome_note(out) + f"; database: {summary.describe()}")
        t, times, out = median_time(clock, lambda: sgpt(uniform), R, warmup=0)
        row("SparseGPT-database trial (same plan, entries in memory)", t, times, outcome_note(out))
    except Exception as exc:  # noqa: BLE001
        notes += failed("SparseGPT database", exc)
        publish()

    # perplexity (random weights: a smoke number)
    try:
        stream = m["eval_ids"].flatten()
        L, n = int(m["eval_ids"].shape[1]), int(m["eval_ids"].shape[0])
        ppl_rows = []
        t, dense_ppl = clock(lambda: perplexity(model, stream, L, n))
        ppl_rows.append({"model": "dense (random weights)", "perplexity": dense_ppl, "seconds": t})
        for label, evaluator in (("uniform 70% Wanda", wanda), ("uniform 70% SparseGPT (database)", ev.get("sparsegpt"))):
            if evaluator is None:
                continue
            plan = evaluator.plan_for(evaluator.space.defaults())

            def pruned_ppl():
                with evaluator.applied(plan):
                    return perplexity(evaluator.ctx.model, stream, L, n)
            t, value = clock(pruned_ppl)
            ppl_rows.append({"model": label, "perplexity": value, "seconds": t})
        vocab = int(m["config"].vocab_size)
        notes += ["", f"Perplexity on the evaluation ids ({n}×{L} tokens of WikiText-2 test; random weights, so only "
                      f"a smoke number: near the vocabulary size {vocab} is expected):", ""] + table(ppl_rows)
        for r in ppl_rows:
            log(f"  ppl {r['model']}: {r['perplexity']:.1f} ({r['seconds']:.2f} s)")
        publish()
    except Exception as exc:  # noqa: BLE001
        notes += failed("perplexity", exc)
        publish()
    if torch.cuda.is_available():
        notes.append(f"- peak GPU memory allocated so far: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        publish()


def device_scorer_class():
    """ScorerActor that stamps each outcome with where it ran (the worker's device, pid, GPU ids)."""
    import dataclasses

    from sparsealloc.search.dispatch.ray_pool import ScorerActor

    class DeviceScorer(ScorerActor):
        def score(self, params, windows=None):
            import ray
            import torch

            out = super().score(params, windows)
            attrs = {**dict(out.attrs), "gpucheck_device": str(self.evaluator.ctx.device),
                     "gpucheck_pid": os.getpid(),
                     "gpucheck_cuda_available": bool(torch.cuda.is_available()),
                     "gpucheck_cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
                     "gpucheck_ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
            return dataclasses.replace(out, attrs=attrs)

    return DeviceScorer


def study_summary(result, workers: int, device_note: str) -> list[str]:
    from sparsealloc.core.keys import FAIL_REASON, TRIAL_SECONDS

    trials = result.study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    complete = result.told.get("complete", 0)
    busy = [t.user_attrs[TRIAL_SECONDS] for t in trials if TRIAL_SECONDS in t.user_attrs]
    reasons = Counter(t.user_attrs.get(FAIL_REASON, "?") for t in trials if t.state.name == "FAIL")
    best = result.best_trial_number
    rows = [{"workers": workers, "trials told": dict(result.told), "stored states": dict(states),
             "failed": result.told.get("failed", 0), "retried": result.retried,
             "start-up s (workers)": result.dispatcher_seconds, "loop s": result.seconds,
             "complete trials/s": complete / result.seconds if result.seconds else float("nan"),
             "mean trial s (in worker)": sum(busy) / len(busy) if busy else float("nan"),
             "best proxy": result.study.best_value if best is not None else float("nan")}]
    lines = table(rows) + ["", f"- worker device: {device_note}"]
    if reasons:
        lines.append("- failure reasons: " + "; ".join(f"{n}× `{r[:200]}`" for r, n in reasons.most_common(3)))
    return lines


def local_study(args, torch, m: dict, ev: dict, url: str, timeout: float) -> list[str]:
    from sparsealloc.search.study import run

    spec = base_spec(m, f"gpu-check-local-{int(time.time())}", trials=args.trials, timeout=timeout)
    log(f"local study: {args.trials} trials (timeout {timeout:.0f} s)")
    result = run(spec, url, evaluator=ev["wanda"], dispatcher="local", validate=False)
    device = str(ev["wanda"].ctx.device)
    log(f"local study: {dict(result.told)} in {result.seconds:.1f} s")
    return [f"TPE, hidden proxy, per-block ratios around 70% (Wanda), warm start uniform, {args.trials} complete trials "
            f"asked (timeout {timeout:.0f} s), SQLite store in a temp folder, the driver's evaluator.", ""] + \
        study_summary(result, 1, f"{device} (the driver's evaluator, in process)")


def ray_study(args, torch, m: dict, ev: dict, url: str, timeout: float) -> list[str]:
    import inspect

    import ray

    from sparsealloc.search.dispatch.ray_pool import RayDispatcher
    from sparsealloc.search.study import run

    cuda = torch.cuda.is_available()
    workers = args.workers
    gpus = (int(10000 / workers) / 10000) if cuda else 0.0  # fractional: the workers share the one GPU
    cpus = args.cpus_per_worker
    params = list(inspect.signature(RayDispatcher.__init__).parameters)[1:]
    lines = [f"`RayDispatcher.__init__{tuple(params)}`: GPU per worker is supported (`gpus_per_worker`, "
             f"fractional; `study run --gpus-per-worker`). Here: {workers} workers × {cpus} CPU, "
             f"{gpus:g} GPU each; the driver started Ray itself with `ray.init(num_cpus={workers * cpus}, "
             f"num_gpus={1 if cuda else 0})` (RayDispatcher's own `ray.init` passes no `num_gpus`, so Ray would "
             f"detect the GPUs itself). Workers rebuild the evaluator from the spec (load_model of the saved random "
             f"model, device default: cuda when visible) on the driver's calibration windows.", ""]
    log(f"ray: init ({workers} workers, {gpus:g} GPU and {cpus} CPU each)")
    try:
        return ray_study_body(args, m, ev, url, timeout, ray, run, workers, cpus, gpus, cuda, lines)
    except Exception as exc:  # noqa: BLE001 - the Deadline alarm included; keep what was learnt so far
        return lines + failed("Ray study", exc)
    finally:
        ray.shutdown()


def ray_study_body(args, m, ev, url, timeout, ray, run, workers, cpus, gpus, cuda, lines) -> list[str]:
    t = time.perf_counter()
    ray.init(num_cpus=workers * cpus, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False,
             object_store_memory=2**28, ignore_reinit_error=True)
    t_init = time.perf_counter() - t
    resources = ray.cluster_resources()
    lines += [f"- ray {ray.__version__} ({Path(ray.__file__).parent}) started in {t_init:.1f} s; cluster resources: "
              f"CPU {resources.get('CPU')}, GPU {resources.get('GPU', 0)}", ""]
    spec = base_spec(m, f"gpu-check-ray-{int(time.time())}", trials=args.trials, timeout=timeout)
    options = {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
               "actor_body": device_scorer_class()}
    log(f"ray study: {args.trials} trials (timeout {timeout:.0f} s)")
    result = run(spec, url, evaluator=ev["wanda"], dispatcher="ray", dispatcher_options=options, validate=False)
    log(f"ray study: {dict(result.told)} in {result.seconds:.1f} s (workers started in {result.dispatcher_seconds:.1f} s)")
    trials = [t for t in result.study.get_trials(deepcopy=False) if "gpucheck_device" in t.user_attrs]
    per_worker: dict[int, Counter] = {}
    for t in trials:
        a = t.user_attrs
        per_worker.setdefault(a["gpucheck_pid"], Counter())[
            (a["gpucheck_device"], a["gpucheck_cuda_available"], a["gpucheck_cuda_visible_devices"],
             ",".join(a["gpucheck_ray_gpu_ids"]))] += 1
    desc = "; ".join(f"pid {pid}: " + ", ".join(f"{n} trials on {d} (cuda available {c}, CUDA_VISIBLE_DEVICES={v}, "
                                                 f"ray GPU ids [{g}])" for (d, c, v, g), n in cnt.items())
                     for pid, cnt in per_worker.items()) or "no trial carried the worker's stamp"
    lines += [f"TPE, hidden proxy, per-block ratios around 70% (Wanda), warm start uniform, {args.trials} complete "
              f"trials asked (timeout {timeout:.0f} s), SQLite store in a temp folder.", ""]
    lines += study_summary(result, workers, f"{len(per_worker)} distinct worker processes; " + desc)
    return lines


class Deadline(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / ".gpucheck"), help="folder with the prepared config, tokenizer and ids")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check.md"))
    parser.add_argument("--small", action="store_true", help="CPU smoke run: 4 layers, 8×64 windows, few trials")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: the config's 30)")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-seq-len", type=int, default=None)
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--eval-seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--trials", type=int, default=None, help="complete trials per study")
    parser.add_argument("--workers", type=int, default=None, help="Ray workers")
    parser.add_argument("--cpus-per-worker", type=int, default=2)
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (sections that "
                        "would not fit are skipped; default 280, --small 900)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip among c, d, e")
    args = parser.parse_args()
    small = {"layers": 4, "calib_samples": 8, "calib_seq_len": 64, "eval_windows": 4, "eval_seq_len": 128,
             "repeats": 2, "trials": 6, "workers": 2, "budget": 900.0}
    full = {"layers": None, "calib_samples": 32, "calib_seq_len": 256, "eval_windows": 20, "eval_seq_len": 512,
            "repeats": 5, "trials": 40, "workers": 4, "budget": 280.0}
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.small:
        args.cpus_per_worker = 1
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["SPARSEALLOC_CACHE"] = str(tmp / "cache")  # the SparseGPT level database goes here
    url = f"sqlite:///{tmp / 'studies.db'}"

    header = ["# GPU check (benchmarks/gpu_check.py)", "",
              f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. "
              f"Model: Llama with SmolLM2-135M-Instruct's config"
              f"{f', {args.layers} layers' if args.layers else ''}, random weights (seed 0), fp32. "
              f"Store: SQLite in {tmp}.", ""]
    report = Report(Path(args.out), header)
    report.write()
    log(f"gpu_check: out {args.out}, temp {tmp}, small={args.small}")

    import torch

    try:
        report.set("a", environment(torch))
        log("environment done")
    except Exception as exc:  # noqa: BLE001
        report.set("a", failed("environment", exc))

    from sparsealloc.core import progress

    progress.set_mode("quiet")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    except Exception:  # noqa: BLE001 - reported in section a
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass

    m: dict = {}
    ev: dict = {}
    try:
        from sparsealloc.search.session import build_evaluator

        log("building the random model")
        m = build_model(args, torch, tmp)
        clock = Clock(torch)
        spec = base_spec(m, "gpu-check-wanda")
        t_ctx, ev["wanda"] = clock(lambda: build_evaluator(spec, m["model"], m["tokenizer"], windows=m["windows"]))
        layout = m["layout"]
        times = ", ".join(f"{k} {v:.1f} s" for k, v in m["times"].items())
        lines = [f"- {type(m['model']).__name__} on **{m['model'].device}** ({next(m['model'].parameters()).dtype}), "
                 f"{m['n_params'] / 1e6:.1f} M parameters, {len(layout.blocks)} blocks, {len(layout.linears)} prunable Linears; "
                 f"{times}",
                 f"- calibration ids {tuple(m['windows'].shape)}, evaluation ids {tuple(m['eval_ids'].shape)}",
                 f"- default-spec evaluator (`build_evaluator(spec, model, tokenizer, windows=...)`: statistics, dense "
                 f"reference, Wanda ranks) built in {t_ctx:.2f} s on {ev['wanda'].ctx.device}; spec: sampler "
                 f"{spec.sampler}, objectives {list(spec.objectives)}, target {spec.target_sparsity}, granularity "
                 f"{spec.layerwise.granularity}, proxy dtype {spec.proxy_dtype}"]
        if torch.cuda.is_available():
            lines.append(f"- GPU memory allocated after the build: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
        report.set("b", lines)
        log(f"model and evaluator ready ({t_ctx:.1f} s)")
    except Exception as exc:  # noqa: BLE001
        report.set("b", failed("model build", exc))

    def left() -> float:
        return args.budget - (time.perf_counter() - T0)

    if "c" in skip:
        report.set("c", ["skipped (--skip)"])
    elif not m:
        report.set("c", ["not run: no model (section b failed)"])
    else:
        try:
            log("trial costs")
            trial_costs(args, torch, m, ev, report)
        except Exception as exc:  # noqa: BLE001
            report.add("c", failed("trial costs", exc))

    # Local study before Ray: a hung or crashed Ray start cannot cost the local numbers.
    for key, fn, reserve in (("e", local_study, 60.0), ("d", ray_study, 0.0)):
        if key in skip:
            report.set(key, ["skipped (--skip)"])
            continue
        if "wanda" not in ev:
            report.set(key, ["not run: no evaluator (section b failed)"])
            continue
        budget = left() - reserve - 10
        if budget < 20:
            report.set(key, [f"not run: {left():.0f} s of the {args.budget:.0f} s budget left"])
            continue
        timeout = max(10.0, min(120.0, budget - 45))  # the study's own bound; the alarm is the backstop

        def on_alarm(signum, frame):
            raise Deadline(f"section {key} ran past its {budget:.0f} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(int(budget))
        try:
            report.set(key, fn(args, torch, m, ev, url, timeout))
        except BaseException as exc:  # noqa: BLE001 - Deadline and Ray's own errors included
            if isinstance(exc, KeyboardInterrupt):
                raise
            report.set(key, failed(f"study ({'Ray' if key == 'd' else 'local'})", exc))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    report.header.append(f"Total run time {time.perf_counter() - T0:.1f} s.")
    report.write()
    log(f"done; wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
