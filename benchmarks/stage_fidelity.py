"""How well evo's selection stages rank the children they score, measured on a stored study.

An evo generation scores its children on a few calibration windows (stage 0: 2 windows by default),
keeps the best few, and scores those on more windows against the parent. Whether the first stage
picks the right children depends on how much the children truly differ against how much their
values move from one window to another. This script opens a stored evo study where it stopped
(its parent; with ``evo.guide``, the switch model refitted on its stages, as ``study resume`` does),
draws the next generation's children twice (guided as the study would, and with uniform switches),
scores the parent and every child on each calibration window of the pool alone, and reports:

* the children's spread over the whole pool ("signal": the standard deviation of their mean KL)
  against the child-by-window noise of a stage's mean (the children's per-window values less each
  window's mean over the children, whose standard deviation is divided by the root of the stage's
  window count);
* for stages of 1, 2, 4 and 8 windows drawn at random: Spearman ρ between the children's stage
  values and their mean over the other windows, how often the stage's best two hold the best child
  of the held-out mean, and the held-out regret of the stage's best (its held-out value less the
  best child's, in KL);
* how many children beat the parent on the pool's mean;
* for (offspring, stages) settings of the sampler, a generation replayed on these values: offspring
  drawn from the measured children, each stage on fresh windows, the last one against the parent;
  the chosen candidate's held-out gain over the parent (its mean less the parent's on the windows no
  stage used) per generation and per minute, a trial costing ``a + b · windows`` seconds with ``a``
  and ``b`` read off the study's own trials (eliminated first-stage children against re-scored
  parents).

    python benchmarks/search_quality.py --settings wanda:0.7 --samplers evo --calib-mix --store /tmp/q/studies.db
    python benchmarks/stage_fidelity.py --store /tmp/q/studies.db --out benchmarks/stage_fidelity.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from _common import ROOT, load_smollm2, machine, markdown_table

STAGE_SIZES = (1, 2, 4, 8)
#: (offspring, stages) replayed: the package default first.
SETTINGS = ((16, ((2, 2), (8, 1))), (8, ((4, 2), (8, 1))), (16, ((4, 2), (8, 1))), (8, ((2, 2), (8, 1))),
            (4, ((8, 1),)), (2, ((8, 1),)), (8, ((2, 1), (8, 1))))


def stage_statistics(values: np.ndarray, size: int, draws: int, rng: np.random.Generator) -> dict[str, float]:
    """Ranking quality of stages of ``size`` windows drawn at random from the columns of ``values``.

    Args:
        values: KL of each child (rows) on each window (columns).
        size: Windows per stage.
        draws: Random stages to average over.
        rng: Draws the stages.

    Returns:
        Mean Spearman ρ of stage values and held-out means (the other windows), the share of stages
        whose best two hold the held-out best, and the mean held-out regret of the stage's best.
    """
    n_windows = values.shape[1]
    rho, top2, regret = [], [], []
    for _ in range(draws):
        stage = rng.choice(n_windows, size=size, replace=False)
        rest = np.setdiff1d(np.arange(n_windows), stage)
        observed, held_out = values[:, stage].mean(axis=1), values[:, rest].mean(axis=1)
        rho.append(spearmanr(observed, held_out).statistic)
        order = np.argsort(observed)
        top2.append(float(np.argmin(held_out) in order[:2]))
        regret.append(float(held_out[order[0]] - held_out.min()))
    return {"rho": float(np.nanmean(rho)), "best_in_top2": float(np.mean(top2)), "regret": float(np.mean(regret))}


def replay_generation(values: np.ndarray, parent: np.ndarray, offspring: int, stages, draws: int,
                      rng: np.random.Generator) -> dict[str, float]:
    """Generations of evo replayed on measured per-window values (see the module docstring).

    Args:
        values: KL of each measured child (rows) on each window (columns).
        parent: The parent's KL on each window.
        offspring: Children per generation (drawn without replacement from the rows).
        stages: ``[windows, survivors]`` per stage; the last also scores the parent.
        draws: Generations to replay.
        rng: Draws children and windows.

    Returns:
        Mean held-out gain (chosen less parent; negative is better), the share of generations that
        change the parent, and the trials and window evaluations one generation costs.
    """
    n_children, n_windows = values.shape
    gains, changed = [], []
    scored = [offspring, *(keep for _, keep in stages[:-1])]  # candidates per stage, the parent aside
    cost = sum(n * w for n, (w, _) in zip(scored, stages)) + stages[-1][0]
    trials = sum(scored) + 1
    for _ in range(draws):
        order = rng.permutation(n_windows)
        used, pool = 0, list(rng.choice(n_children, size=offspring, replace=False))
        for i, (size, keep) in enumerate(stages):
            windows = order[used:used + size]
            used += size
            scores = {c: values[c, windows].mean() for c in pool}
            if i == len(stages) - 1:
                scores[-1] = parent[windows].mean()
            pool = sorted(scores, key=scores.get)[:keep]
        held = order[used:]
        chosen = pool[0]
        gains.append(0.0 if chosen == -1 else float(values[chosen, held].mean() - parent[held].mean()))
        changed.append(chosen != -1)
    return {"gain": float(np.mean(gains)), "changed": float(np.mean(changed)), "cost": float(cost), "trials": trials}


def trial_cost(study, stages) -> tuple[float, float]:
    """Seconds per trial and per window, from the study's eliminated first-stage children and its
    re-scored parents (a line through their median trial times against their window counts)."""
    from sparsealloc.core.keys import EVO_ROLE, TRIAL_SECONDS

    timed = [t for t in study.get_trials(deepcopy=False) if TRIAL_SECONDS in t.user_attrs]
    first = [t.user_attrs[TRIAL_SECONDS] for t in timed
             if t.user_attrs.get(EVO_ROLE) == "offspring" and t.state.name == "PRUNED"]
    last = [t.user_attrs[TRIAL_SECONDS] for t in timed if t.user_attrs.get(EVO_ROLE) == "parent"]
    w0, w1 = stages[0][0], stages[-1][0]
    if not first or not last or w0 == w1:
        return 0.0, 1.0  # window evaluations only
    per_window = (float(np.median(last)) - float(np.median(first))) / (w1 - w0)
    return max(float(np.median(first)) - per_window * w0, 0.0), per_window


def signal_and_noise(values: np.ndarray) -> tuple[float, float]:
    """Standard deviation of the children's pool means (their true differences plus a little noise)
    and of one window's child-by-window interaction (the noise of a one-window stage)."""
    interaction = values - values.mean(axis=0, keepdims=True) - values.mean(axis=1, keepdims=True) + values.mean()
    dof = (values.shape[0] - 1) * (values.shape[1] - 1)
    return float(values.mean(axis=1).std(ddof=1)), float(np.sqrt((interaction ** 2).sum() / dof))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="SQLite file of a search_quality run (--store there)")
    parser.add_argument("--study", default=None, help="the evo study (default: the first one in the store)")
    parser.add_argument("--children", type=int, default=12, help="children of each kind (guided, uniform)")
    parser.add_argument("--draws", type=int, default=2000, help="random stages per stage size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "stage_fidelity.md"))
    args = parser.parse_args()

    import optuna
    from tqdm import tqdm

    from sparsealloc.search.session import build_evaluator, open_sampler, stored_spec
    from sparsealloc.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{Path(args.store).resolve()}"
    storage = open_storage(url)
    name = args.study or next(s.study_name for s in optuna.get_all_study_summaries(storage)
                              if stored_spec(storage, s.study_name).sampler == "evo")
    spec = stored_spec(storage, name)
    model, tokenizer, _ = load_smollm2()
    evaluator = build_evaluator(spec, model, tokenizer)
    sampler = open_sampler(spec, storage, evaluator.space)  # reads the store; writes nothing here
    rng = np.random.default_rng(args.seed)
    sampler._seen = {sampler._key(sampler.parent)}
    guided = [c.params for c in sampler._children(rng)][: args.children] if sampler.model is not None else []
    uniform = [sampler._mutate(rng) for _ in range(args.children)]
    candidates = [("parent", sampler.parent)] + [("guided", p) for p in guided] + [("uniform", p) for p in uniform]
    n_windows = int(evaluator.ctx.windows.shape[0])
    values = np.zeros((len(candidates), n_windows))
    start = time.perf_counter()
    with tqdm(total=len(candidates) * n_windows, desc="candidate × window", unit="trial") as bar:
        for i, (_, params) in enumerate(candidates):
            for w in range(n_windows):
                outcome = evaluator(params, windows=(w,))
                values[i, w] = outcome.values[0]
                bar.update()
    seconds = time.perf_counter() - start

    rows, lines = [], []
    parent_mean = values[0].mean()
    rows_by_kind = {kind: [i for i, (k, _) in enumerate(candidates) if k == kind] for kind in ("guided", "uniform")}
    for kind, rows_of_kind in rows_by_kind.items():
        if len(rows_of_kind) < 3:
            continue
        block = values[rows_of_kind]
        signal, noise = signal_and_noise(block)
        better = int((block.mean(axis=1) < parent_mean).sum())
        lines.append(f"- **{kind} children** ({len(rows_of_kind)}): pool-mean KL {block.mean():.4f} (parent "
                     f"{parent_mean:.4f}; {better} of {len(rows_of_kind)} below the parent); spread of the children's "
                     f"pool means (sd) {signal:.4f}; child-by-window noise (sd of one window) {noise:.4f}, so "
                     f"{noise / np.sqrt(2):.4f} on a 2-window stage and {noise / np.sqrt(8):.4f} on an 8-window one.")
        for size in STAGE_SIZES:
            stats = stage_statistics(block, size, args.draws, np.random.default_rng([args.seed, size]))
            rows.append({"children": kind, "stage windows": size, "ρ(stage, held-out)": round(stats["rho"], 3),
                         "held-out best in stage's top 2": round(stats["best_in_top2"], 3),
                         "held-out regret of stage's best (KL)": round(stats["regret"], 5)})
    per_trial, per_window = trial_cost(sampler.study, spec.evo.stages)
    settings = []
    guided_rows = rows_by_kind["guided"] or rows_by_kind["uniform"]
    for offspring, stages in SETTINGS:
        if offspring > len(guided_rows) or sum(w for w, _ in stages) >= n_windows:
            continue
        stats = replay_generation(values[guided_rows], values[0], offspring, stages, args.draws,
                                  np.random.default_rng([args.seed, offspring, len(stages)]))
        settings.append({"offspring": offspring, "stages": str([list(s) for s in stages]),
                         "trials + window evaluations per generation": f"{stats['trials']} + {int(stats['cost'])}",
                         "parent changed": round(stats["changed"], 3),
                         "held-out gain per generation (KL)": round(stats["gain"], 5),
                         "gain per minute (KL)": round(60 * stats["gain"] / (stats["trials"] * per_trial
                                                                             + stats["cost"] * per_window), 5)})
    text = [
        "# Stage fidelity (benchmarks/stage_fidelity.py)", "",
        f"Machine: {machine()}. Study `{name}` of `{args.store}` at its generation {sampler.generation} "
        f"({spec.metric.name} {spec.target_sparsity:.0%}, evo guide {spec.evo.guide}, stages "
        f"{[list(s) for s in spec.evo.stages]}): the parent and {args.children} children of each kind, "
        f"each scored alone on each of the {n_windows} calibration windows × {int(evaluator.ctx.windows.shape[1])} "
        f"tokens ({len(candidates) * n_windows} trials in {seconds / 60:.1f} min); stages drawn {args.draws} times per size, "
        "the held-out value of a child is its mean over the windows its stage did not use.", "",
        f"Command: `python benchmarks/stage_fidelity.py --store {args.store} --children {args.children} "
        f"--draws {args.draws} --seed {args.seed}`", "",
        *lines, "", markdown_table(pd.DataFrame(rows)), "",
        f"Generations replayed on the {'guided' if guided else 'uniform'} children's values ({args.draws} each; "
        f"the held-out windows are those no stage of the generation used; a trial costs {per_trial:.2f} s + "
        f"{per_window:.3f} s per window, read off the study's trials):", "",
        markdown_table(pd.DataFrame(settings)), "",
    ]
    Path(args.out).write_text("\n".join(text))
    np.save(Path(args.out).with_suffix(".npy"), values)
    print("\n".join(text))


if __name__ == "__main__":
    main()
