"""KV bits under budgets, and the accuracy × KV-memory front, against the uniform ladder (SmolLM2, 50% Wanda).

One process, one model load, one calibration pass shared by every study:

* text: WikiText-2 ``valid.txt`` split by lines as in ``search_quality.py`` (first 70%: calibration
  pool of 32×256 tokens; last 30%: validation, which picks the exported plans); held-out PPL on
  WikiText-2 ``test.txt`` (first ``--eval-windows`` × 512), which neither saw;
* uniform ladder: uniform 50% Wanda with every K and V at 16, 8, 4, 3 and 2 bits;
* budgeted optima: ``evo`` studies with ``kv.budget`` at 4, 3 and 2.5 mean bits, (a) KV bits only
  (sparsity uniform, as the ladder's: isolates the bit allocation) and (b) jointly with per-Linear
  sparsity levels at the exact 50% budget (what a user gets from one study);
* front: an NSGA-III study (``nsga3``, pymoo) over (KL, KV bytes per token), sparsity per Linear at
  the exact 50% budget, seeded with the ladder and the joint budgeted optima (``seed_plans``);
  exported with ``export_study(pareto=True)`` (front.csv); held-out PPL of up to ``--front-plans``
  of its plans; hypervolume of (held-out PPL, KV bytes) against the ladder's, same reference point;
* every exported plan's packed cache (:func:`~sparsealloc.pruning.kv.cache.packed_cache`, filled with
  4,096 tokens) against the analytic bytes per token.

    python benchmarks/kv_front.py --minutes 3 --front-minutes 6
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import ROOT, WIKITEXT, Timer, load_smollm2, machine, markdown_table, require_data
from search_quality import split_valid

EVAL_SEQ_LEN = 512
LADDER = (16, 8, 4, 3, 2)
CACHE_TOKENS = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 3.0, 2.5, 2.0],
                        help="mean bits of the budgeted studies (KV-only studies skip the ladder's lowest rung: "
                             "uniform there); the joint optima seed the front")
    parser.add_argument("--kinds", nargs="+", choices=["kv", "joint"], default=["kv", "joint"],
                        help="budgeted studies to run: KV bits only, and/or joint (sparsity per Linear + KV)")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall time of each budgeted evo study")
    parser.add_argument("--front-minutes", type=float, default=6.0, help="wall time of the NSGA-III study")
    parser.add_argument("--front-plans", type=int, default=10, help="front plans measured on held-out text")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "kv_front.md"))
    args = parser.parse_args()
    require_data()
    from pymoo.indicators.hv import HV

    from sparsealloc.core import progress
    from sparsealloc.core.keys import PLAN, WARM_START
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.objectives import TrialEvaluator, kv_bytes_per_token
    from sparsealloc.pruning import perplexity, tokenize_stream
    from sparsealloc.pruning.model.models import resolve_proxy_dtype
    from sparsealloc.search.session import build_evaluator
    from sparsealloc.search.study import run
    from sparsealloc.spaces.spec import CalibrationSpec, KVSpec, MetricSpec, StudySpec, ValidationSpec
    from sparsealloc.storage.export import export_study

    progress.set_mode("quiet")
    work = Path(tempfile.mkdtemp(prefix="sparsealloc-kvfront-"))
    calib_text, val_text = split_valid(work)
    store = f"sqlite:///{work / 'studies.db'}"
    model, tokenizer, _ = load_smollm2()
    test = tokenize_stream(tokenizer, (WIKITEXT / "test.txt").read_text())
    base = StudySpec(name="base", target_sparsity=args.target, metric=MetricSpec(name="wanda"), sampler="evo",
                     space=("kv",), trials=10**6, timeout=args.minutes * 60, seed=0, warm_start=("uniform",),
                     calibration=CalibrationSpec(text=str(calib_text), samples=args.calib_samples, seq_len=256),
                     validation=ValidationSpec(text=str(val_text), seq_len=512, windows=8, top_k=5, max_seconds=60))
    with Timer() as t_setup:
        shared = build_evaluator(base, model, tokenizer)
    ctx = shared.ctx
    layout, heads, head_dim = ctx.layout, ctx.layout.kv_heads, ctx.layout.head_dim
    group = base.kv.group_size

    def measure(evaluator, plan) -> float:
        with evaluator.applied(plan):
            return perplexity(model, test, EVAL_SEQ_LEN, args.eval_windows)

    def analytic(kv_bits) -> float:
        return kv_bytes_per_token(layout.attention, kv_bits, heads, head_dim, group)

    def mean_bits(kv_bits) -> float:
        widths = [b for bits in kv_bits.values() for b in bits.values()]
        return sum(widths) / len(widths)

    rows, notes, cache_rows = [], [], []

    def record(kind: str, name: str, plan, ppl: float, extra: str = "") -> dict:
        row = {"kind": kind, "plan": name, "mean KV bits": round(mean_bits(plan.kv_bits), 3),
               "KV bytes/token": analytic(plan.kv_bits), "held-out PPL": ppl, "note": extra}
        rows.append(row)
        return row

    # ---------------------------------------------------------------- the uniform ladder
    free = TrialEvaluator(ctx, base)
    ladder = {}
    with Timer() as t_ladder:
        for b in LADDER:
            values = {**free.space.defaults(), **{p: b for p in free.space.kv_params}}
            plan = free.space.decode(values).to_plan()
            ladder[b] = record("uniform ladder", f"uniform {b}-bit", plan, measure(free, plan))
    # ---------------------------------------------------------------- budgeted optima
    optima: dict[tuple[str, float], tuple[Path, dict]] = {}
    for joint in [kind == "joint" for kind in args.kinds]:
        for budget in args.budgets:
            if not joint and budget <= min(LADDER):
                continue  # every slot at the lowest rung: the ladder's own point
            label = "joint (sparsity per Linear + KV)" if joint else "KV only"
            space = ("layerwise", "kv") if joint else ("kv",)
            spec = base.override(name=f"{'joint' if joint else 'kv'}-{budget}", space=space,
                                 warm_start=("uniform", "owl", "depth_ramp") if joint else ("uniform",),
                                 kv=KVSpec(budget=budget))
            spec = StudySpec.from_dict({**spec.to_dict(), "layerwise": {**spec.to_dict()["layerwise"], "granularity": None}})
            evaluator = TrialEvaluator(ctx, spec)
            result = run(spec, store, evaluator=evaluator, validate=True, export_dir=work / spec.name)
            path = Path(result.exported[0])
            plan = AllocationPlan.load(path)
            study = result.study
            n_complete = sum(1 for t in study.trials if t.state.name == "COMPLETE")
            n_pruned = sum(1 for t in study.trials if t.state.name == "PRUNED")
            start = next(t for t in study.trials if t.user_attrs.get(WARM_START) == "uniform")
            # Both on all calibration windows (the study scored them on different stage windows).
            kl_start, kl_found = (evaluator(evaluator.space.encode_plan(p)).values[0]
                                  for p in (AllocationPlan.from_dict(start.user_attrs[PLAN]), plan))
            row = record(f"evo, {label}", f"budget {budget:g} bits", plan, measure(evaluator, plan),
                         f"{n_complete}+{n_pruned} trials in {result.seconds / 60:.1f} min; KL on all calibration "
                         f"windows {kl_found:.4f} vs uniform-budget start {kl_start:.4f}")
            optima[(label, budget)] = (path, row)
    # ---------------------------------------------------------------- the front
    seeds = tuple(str(p) for (label, _), (p, _) in optima.items() if label.startswith("joint"))
    front_spec = base.override(name="front", sampler="nsga3", space=("layerwise", "kv"), objectives=("kl", "kv_bytes"),
                               timeout=args.front_minutes * 60, population_size=24, warm_start=("uniform",),
                               seed_plans=seeds, proxy_dtype="auto",
                               validation=ValidationSpec(text=str(val_text), seq_len=512, windows=4, top_k=5,
                                                         max_seconds=180))
    front_spec = StudySpec.from_dict({**front_spec.to_dict(),
                                      "layerwise": {**front_spec.to_dict()["layerwise"], "granularity": "module"}})
    front_eval = TrialEvaluator(ctx, front_spec)
    result = run(front_spec, store, evaluator=front_eval, validate=True, export_dir=None)
    front_dir = work / "front-export"
    paths = export_study(result.study, front_dir, pareto=True)
    table = pd.read_csv(front_dir / "pareto" / "front.csv")
    chosen = _spread(table, args.front_plans, [ladder[b]["KV bytes/token"] for b in (4, 3, 2)])
    front_rows = []
    for number in chosen:
        plan = AllocationPlan.load(front_dir / "pareto" / f"trial_{number:04d}.json")
        src = plan.provenance.get("warm_start") or "searched"
        front_rows.append(record("NSGA-III front", f"trial {number} ({src})", plan, measure(front_eval, plan),
                                 f"validation PPL {plan.provenance.get('validation', {}).get('perplexity') or float('nan'):.2f}"))
    n_front = sum(1 for t in result.study.trials if t.state.name == "COMPLETE")
    notes.append(f"NSGA-III: {n_front} complete trials in {result.seconds / 60:.1f} min (population 24, seeds: "
                 f"{len(seeds)} joint budgeted optima + the ladder); Pareto set {len(paths)} plans, "
                 f"{len(front_rows)} measured on held-out text (spread over the bytes, including the largest at or "
                 "below each uniform width's bytes).")
    # ---------------------------------------------------------------- packed cache vs analytic
    for path in [p for p, _ in optima.values()] + [front_dir / "pareto" / f"trial_{n:04d}.json" for n in chosen]:
        plan = AllocationPlan.load(path)
        measured = _filled_cache_bytes(layout, plan.kv_bits, group, heads, head_dim) / CACHE_TOKENS
        cache_rows.append({"plan": f"{path.parent.name}/{path.name}", "analytic B/token": analytic(plan.kv_bits),
                           "packed cache B/token": measured,
                           "gap": f"{100 * (measured / analytic(plan.kv_bits) - 1):+.3f}%"})
    # ---------------------------------------------------------------- acceptance
    frame = pd.DataFrame(rows)
    u3 = ladder[3]["held-out PPL"]
    checks = []
    for label in ("KV only", "joint (sparsity per Linear + KV)"):
        for budget, bar, what in ((3.0, 0.95 * u3, "≤ 0.95× uniform 3-bit"), (2.5, u3, "below uniform 3-bit")):
            if (label, budget) in optima:
                ppl = optima[(label, budget)][1]["held-out PPL"]
                ok = ppl <= bar if budget == 3.0 else ppl < bar
                checks.append(f"- [{'x' if ok else ' '}] {label}, {budget:g} mean bits {what}: PPL {ppl:.2f} = "
                              f"{ppl / u3:.3f}× uniform 3-bit ({u3:.2f})")
    front_frame = pd.DataFrame(front_rows)
    for b in (4, 3, 2):
        cap = ladder[b]["KV bytes/token"]
        inside = front_frame[front_frame["KV bytes/token"] <= cap + 1e-6] if len(front_frame) else front_frame
        best = inside["held-out PPL"].min() if len(inside) else float("nan")
        ok = bool(len(inside)) and best < ladder[b]["held-out PPL"]
        checks.append(f"- [{'x' if ok else ' '}] front holds a plan with bytes ≤ uniform {b}-bit's ({cap:.0f}) and lower "
                      f"held-out PPL: best {best:.2f} vs {ladder[b]['held-out PPL']:.2f}")
    ladder_points = np.array([[r["held-out PPL"], r["KV bytes/token"]] for r in ladder.values()])
    front_points = np.array([[r["held-out PPL"], r["KV bytes/token"]] for r in front_rows]) if front_rows else np.zeros((0, 2))
    everything = np.vstack([ladder_points, front_points])
    reference = everything.max(axis=0) * 1.05
    hv = HV(ref_point=reference)
    hv_front, hv_ladder = float(hv(front_points)) if len(front_points) else 0.0, float(hv(ladder_points))
    checks.append(f"- [{'x' if hv_front > hv_ladder else ' '}] hypervolume of (held-out PPL, KV bytes/token), reference "
                  f"point ({reference[0]:.1f}, {reference[1]:.0f}): front {hv_front:.4g} vs ladder {hv_ladder:.4g} "
                  f"({hv_front / hv_ladder:.3f}×)")
    gaps = [abs(float(r["gap"].rstrip("%"))) for r in cache_rows]
    checks.append(f"- [{'x' if max(gaps) <= 1.0 else ' '}] packed cache of every exported plan within 1% of the analytic "
                  f"bytes: largest gap {max(gaps):.3f}%")
    out = Path(args.out)
    plot = _plot(frame, out.with_suffix(".png"))
    text = [
        "# KV bits under budgets, and the accuracy × KV-memory front (benchmarks/kv_front.py)", "",
        f"Machine: {machine()}. SmolLM2-135M-Instruct (embedded GGUF, fp32), Wanda at {args.target:.0%} (uniform "
        "unless the row searches it). KIVI group quantization, group 32, residual 0, K/V fake-quantized in attention "
        f"for every token, in trials and in the held-out PPL (WikiText-2 test, first {args.eval_windows}×512, seen by "
        f"no search or validation). Calibration pool {args.calib_samples}×256 from the first 70% of WikiText-2 valid; "
        "validation 8×512 (fronts: 4×512) from its last 30%. Trials with `proxy_dtype: auto` "
        f"({str(resolve_proxy_dtype('auto', ctx.device)).removeprefix('torch.')} on this machine; proxy KL to the dense model). "
        f"Evo studies {args.minutes:g} min each, NSGA-III {args.front_minutes:g} min. Setup {t_setup.seconds:.0f} s; "
        f"ladder measured in {t_ladder.seconds:.0f} s.", "",
        f"Command: `python benchmarks/kv_front.py --minutes {args.minutes:g} --front-minutes {args.front_minutes:g} "
        f"--budgets {' '.join(f'{b:g}' for b in args.budgets)} --kinds {' '.join(args.kinds)} "
        f"--eval-windows {args.eval_windows}" + (f" --out {args.out}`" if Path(args.out).name != "kv_front.md" else "`"), "",
        "## Acceptance", "", *checks, "", *[f"- {n}" for n in notes], "",
        "## Held-out PPL against KV bytes", "", markdown_table(frame), "",
        f"![PPL against KV bytes]({plot.name})", "",
        "## Packed cache against the analytic bytes", "",
        f"Each plan's {CACHE_TOKENS}-token packed cache (random K/V through `PackedKVLayer.update`).", "",
        markdown_table(pd.DataFrame(cache_rows)), "",
    ]
    out.write_text("\n".join(text))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "cache": cache_rows}, indent=1, default=float))
    print("\n".join(text))


def _spread(table: pd.DataFrame, n: int, caps: list[float]) -> list[int]:
    """Up to ``n`` trials of the front: for each cap the largest-bytes plan at or below it, then an even
    spread over the bytes."""
    table = table.sort_values("kv_bytes")
    chosen: list[int] = []
    for cap in caps:
        inside = table[table["kv_bytes"] <= cap + 1e-6]
        if len(inside):
            chosen.append(int(inside.iloc[-1]["trial"]))
    for i in np.linspace(0, len(table) - 1, num=min(n, len(table))).round().astype(int):
        number = int(table.iloc[int(i)]["trial"])
        if number not in chosen and len(chosen) < n:
            chosen.append(number)
    return chosen


def _filled_cache_bytes(layout, kv_bits, group: int, heads: int, head_dim: int) -> int:
    from sparsealloc.pruning.kv.cache import packed_cache

    cache = packed_cache(layout, kv_bits, group)
    generator = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        k, v = (torch.randn(1, heads, CACHE_TOKENS, head_dim, generator=generator) for _ in range(2))
        layer.update(k, v)
    return cache.nbytes()


def _plot(frame: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    styles = {"uniform ladder": ("x--", "black"), "evo, KV only": ("s", "C0"),
              "evo, joint (sparsity per Linear + KV)": ("D", "C2"), "NSGA-III front": ("o-", "C3")}
    for kind, group in frame.groupby("kind", sort=False):
        group = group.sort_values("KV bytes/token")
        marker, color = styles.get(kind, ("o", None))
        ax.plot(group["KV bytes/token"], group["held-out PPL"], marker, color=color, label=kind, markersize=6)
    ax.set_xscale("log")
    ax.set_xlabel("KV-cache bytes per token (all layers)")
    ax.set_ylabel("held-out PPL (WikiText-2 test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
