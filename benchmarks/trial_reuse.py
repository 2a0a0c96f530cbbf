"""What an evo generation costs with and without block output reuse, and what a trial's store writes cost.

Block output reuse (``objectives/block_cache.py``): offspring that share their leading blocks'
compression with an earlier trial on the same windows read those blocks' outputs back. Measured on
SmolLM2 at Wanda 70% (evo's defaults: per-Linear levels, bfloat16 trials where faster, KL), in one
process: each generation mutates the parent into 16 children (EvoPress's level switches, as the
sampler draws them), scores them on 2 calibration windows, then the best 2 and the parent on 8, and
does so twice, once with the cache on and once off (cleared before each; the order alternates per
generation; the masked weights are warmed first, so both runs stitch from the same cache). The two
runs must give bitwise the same values (checked), so only the time differs.

Store writes (SQLite, in WAL mode; a 210-parameter trial as evo's): creating a RUNNING trial with
:func:`~sparsealloc.storage.optuna_adapter.create_running_trial` against Optuna's template path,
and writing an outcome's attributes plus one intermediate value in one transaction
(:func:`~sparsealloc.storage.optuna_adapter.set_trial_user_attrs`) against one commit each.

    python benchmarks/trial_reuse.py            # → benchmarks/trial_reuse.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _common import ROOT, machine, markdown_table, require_data


def generations(evaluator, n: int) -> tuple[pd.DataFrame, float]:
    """Time ``n`` generations with reuse on and off; returns the rows and the share of blocks read back."""
    from sparsealloc.search.samplers.evo import level_switch, stage_windows

    ctx, space = evaluator.ctx, evaluator.space
    grid, pool, rng = space.levels, int(ctx.windows.shape[0]), np.random.default_rng(0)
    parent = space.defaults()
    rows, reused, run = [], 0, 0
    for gen in range(n):
        levels = grid.levels_of({g: parent[g] for g in space.groups})
        kids = []
        for _ in range(16):
            swaps = int(min(rng.integers(1, 4), rng.integers(1, 4)))
            child = dict(parent)
            for g, ratio in grid.ratios(level_switch(levels, grid.bounds, swaps, rng)).items():
                child[g] = space.by_name[g].clip(ratio)
            kids.append(child)
        first, second = stage_windows(0, gen, 0, 2, pool), stage_windows(0, gen, 1, 8, pool)
        for child in [*kids, parent]:  # warm the masked weights (both runs stitch from the cache)
            evaluator(child, windows=first)
        seconds, values = {}, {}
        for on in ((True, False) if gen % 2 == 0 else (False, True)):
            cache = ctx.block_cache
            cache.clear()
            cache.max_bytes = ctx.block_cache_bytes if on else 0
            before = (cache.blocks_reused, cache.blocks_run)
            start = time.perf_counter()
            scored = sorted((evaluator(c, windows=first).values[0], i) for i, c in enumerate(kids))
            finals = [kids[scored[0][1]], kids[scored[1][1]], parent]
            last = [evaluator(c, windows=second).values[0] for c in finals]
            seconds[on], values[on] = time.perf_counter() - start, (scored, last)
            if on:
                reused += cache.blocks_reused - before[0]
                run += cache.blocks_run - before[1]
        if values[True] != values[False]:
            raise SystemExit(f"generation {gen}: values differ with and without reuse")
        parent = finals[int(np.argmin(last))]
        rows.append({"generation": gen, "trials": len(kids) + len(finals), "seconds, reuse off": seconds[False],
                     "seconds, reuse on": seconds[True], "on / off": seconds[True] / seconds[False]})
        print(f"generation {gen}: off {seconds[False]:.2f} s, on {seconds[True]:.2f} s", flush=True)
    return pd.DataFrame(rows), reused / max(reused + run, 1)


def store_writes(folder: Path, repeats: int = 60) -> pd.DataFrame:
    import optuna
    from optuna.distributions import FloatDistribution

    from sparsealloc.storage.optuna_adapter import create_running_trial, set_trial_user_attrs
    from sparsealloc.storage.rdb import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(f"sqlite:///{folder / 'writes.db'}"), study_name="writes")
    names = [f"sparsity/module/model.layers.{i}.p{j}" for i in range(30) for j in range(7)]
    dists = {n: FloatDistribution(0.0, 0.95) for n in names}
    params = dict.fromkeys(names, 0.7)
    attrs = {"generation": 1, "source": "evo", "evo_role": "offspring"}
    outcome = {"plan": {"sparsity": params}, "achieved_sparsity": 0.7, "trial_seconds": 0.5, "stage": 0,
               "calibration_tokens": 512}

    def template_path() -> int:
        import datetime

        template = optuna.trial.FrozenTrial(
            number=-1, state=optuna.trial.TrialState.RUNNING, value=None, values=None,
            datetime_start=datetime.datetime.now(), datetime_complete=None, params=dict(params),
            distributions=dict(dists), user_attrs=dict(attrs), system_attrs={}, intermediate_values={}, trial_id=-1)
        return study._storage.create_new_trial(study._study_id, template_trial=template)

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1000

    ids = []
    rows = [{"write": "create a RUNNING trial (210 parameters)", "Optuna template path, ms": timed(template_path),
             "sparsealloc, ms": timed(lambda: ids.append(create_running_trial(study, params, dists, attrs)[1]))}]
    one_by_one = iter(ids)
    batched = iter([create_running_trial(study, params, dists, attrs)[1] for _ in range(repeats + 1)])

    def each() -> None:
        trial_id = next(one_by_one)
        for key, value in outcome.items():
            study._storage.set_trial_user_attr(trial_id, key, value)
        study._storage.set_trial_intermediate_value(trial_id, 0, 1.0)

    rows.append({"write": "an outcome's 5 attributes + 1 intermediate value", "Optuna template path, ms": timed(each),
                 "sparsealloc, ms": timed(lambda: set_trial_user_attrs(study, next(batched), outcome, ((1, 1.0),)))})
    frame = pd.DataFrame(rows)
    frame["ratio"] = frame["sparsealloc, ms"] / frame["Optuna template path, ms"]
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "trial_reuse.md"))
    args = parser.parse_args()
    require_data()
    from search_quality import split_valid

    from sparsealloc.core import progress
    from sparsealloc.pruning import TextSource
    from sparsealloc.search.session import build_evaluator
    from sparsealloc.spaces.spec import CalibrationSpec, MetricSpec, StudySpec

    from _common import load_smollm2

    progress.set_mode("quiet")
    folder = Path(tempfile.mkdtemp(prefix="sparsealloc-reuse-"))
    calib, _ = split_valid(folder, TextSource("builtin", "calib").read())
    model, tokenizer, _ = load_smollm2()
    # Built with sampler="evo", the spec takes evo's defaults (KL, per-Linear levels, proxy dtype auto).
    spec = StudySpec(name="reuse", target_sparsity=0.7, metric=MetricSpec(name="wanda"), sampler="evo",
                     calibration=CalibrationSpec(text=str(calib), samples=32, seq_len=256))
    evaluator = build_evaluator(spec, model, tokenizer)
    frame, share = generations(evaluator, args.generations)
    later = frame[frame["generation"] > 0]
    writes = store_writes(folder)
    total_on, total_off = frame["seconds, reuse on"].sum(), frame["seconds, reuse off"].sum()
    lines = [
        "# Block output reuse and store writes per trial (benchmarks/trial_reuse.py)", "",
        f"Machine: {machine()}. SmolLM2-135M-Instruct, Wanda 70%, evo defaults (per-Linear levels, "
        f"proxy dtype {evaluator.proxy_dtype}, KL), calibration pool 32×256 (mixed WikiText-2 / Python docs); "
        "a generation = 16 offspring on 2 windows, then the best 2 and the parent on 8.", "",
        "Command: `python benchmarks/trial_reuse.py`", "",
        f"- **{args.generations} generations: {total_on:.1f} s with reuse against {total_off:.1f} s without "
        f"({total_on / total_off:.3f}×; {later['seconds, reuse on'].sum() / later['seconds, reuse off'].sum():.3f}× "
        f"without the first generation)**. {share:.1%} of the blocks were read back instead of run. "
        "Every value was bitwise the same in both runs.",
        f"- Store writes of one trial (SQLite): creating a 210-parameter RUNNING trial "
        f"{writes.iloc[0]['sparsealloc, ms']:.1f} ms against {writes.iloc[0]['Optuna template path, ms']:.1f} ms; an "
        f"outcome's attributes {writes.iloc[1]['sparsealloc, ms']:.1f} ms against "
        f"{writes.iloc[1]['Optuna template path, ms']:.1f} ms one commit each.", "",
        markdown_table(frame), "", markdown_table(writes), "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
