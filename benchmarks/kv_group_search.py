"""A joint evo study under a KV byte budget at a coarser group size, against the uniform ladder at group 32.

The budget is the bytes of uniform ``--ladder-bits`` at group 32 (kv_front.py's ladder point); the study
quantizes with ``--group-size`` and searches K and V bits per layer (exact byte budget) and sparsity per
Linear (exact 50% budget), as kv_front.py's joint studies do. Same texts and held-out PPL as kv_front.py;
the ladder point and the found plan are measured in the same run.

    python benchmarks/kv_group_search.py --group-size 64 --ladder-bits 3 --minutes 10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import EVAL_SEQ_LEN, ROOT, WIKITEXT, Timer, load_smollm2, machine, plan_ppl, require_data, uniform_kv_plan
from search_quality import split_valid

LADDER_GROUP = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--ladder-bits", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--budget-bytes", type=float, default=None,
                        help="KV bytes per token of the study (default: those of the ladder point)")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "kv_group_search.md"))
    args = parser.parse_args()
    require_data()
    from sparsealloc.core import progress
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.objectives import TrialEvaluator, kv_bytes_per_token
    from sparsealloc.pruning import tokenize_stream
    from sparsealloc.search.session import build_evaluator
    from sparsealloc.search.study import run
    from sparsealloc.spaces.spec import CalibrationSpec, KVSpec, MetricSpec, StudySpec, ValidationSpec

    progress.set_mode("quiet")
    work = Path(tempfile.mkdtemp(prefix="sparsealloc-kvgroup-"))
    calib_text, val_text = split_valid(work)
    model, tokenizer, _ = load_smollm2()
    test = tokenize_stream(tokenizer, (WIKITEXT / "test.txt").read_text())
    base = StudySpec(name="base", target_sparsity=args.target, metric=MetricSpec(name="wanda"), sampler="evo",
                     space=("kv",), trials=10**6, timeout=args.minutes * 60, seed=0,
                     calibration=CalibrationSpec(text=str(calib_text), samples=32, seq_len=256),
                     validation=ValidationSpec(text=str(val_text), seq_len=512, windows=8, top_k=5, max_seconds=60))
    shared = build_evaluator(base, model, tokenizer)
    layout = shared.ctx.layout

    def measure(evaluator, plan) -> float:
        return plan_ppl(evaluator, plan, model, test, args.eval_windows)

    ladder_eval = TrialEvaluator(shared.ctx, base)
    ladder_plan = uniform_kv_plan(ladder_eval.space, args.ladder_bits)
    budget = kv_bytes_per_token(layout.attention, ladder_plan.kv_bits, layout.kv_heads, layout.head_dim, LADDER_GROUP)
    ladder_ppl = measure(ladder_eval, ladder_plan)
    ladder_bytes, budget = budget, args.budget_bytes or budget
    spec = base.override(name="joint", space=("layerwise", "kv"), warm_start=("uniform", "owl", "depth_ramp"),
                         kv=KVSpec(group_size=args.group_size, budget_bytes=budget))
    spec = StudySpec.from_dict({**spec.to_dict(), "layerwise": {**spec.to_dict()["layerwise"], "granularity": None}})
    evaluator = TrialEvaluator(shared.ctx, spec)
    with Timer() as t_study:
        result = run(spec, f"sqlite:///{work / 'studies.db'}", evaluator=evaluator, validate=True,
                     export_dir=work / "joint")
    plan = AllocationPlan.load(result.exported[0])
    found_bytes = kv_bytes_per_token(layout.attention, plan.kv_bits, layout.kv_heads, layout.head_dim, args.group_size)
    found_ppl = measure(evaluator, plan)
    n_complete = sum(1 for t in result.study.trials if t.state.name == "COMPLETE")
    n_pruned = sum(1 for t in result.study.trials if t.state.name == "PRUNED")
    bits = [b for kv in plan.kv_bits.values() for b in kv.values()]
    k_bits = [kv["k"] for kv in plan.kv_bits.values()]
    v_bits = [kv["v"] for kv in plan.kv_bits.values()]
    command = (f"python benchmarks/kv_group_search.py --group-size {args.group_size} --ladder-bits {args.ladder_bits} "
               f"--minutes {args.minutes:g}" + (f" --budget-bytes {args.budget_bytes:g}" if args.budget_bytes else "")
               + f" --out {Path(args.out).resolve().relative_to(ROOT)}")
    plan.save(Path(args.out).with_name(f"{Path(args.out).stem}_plan.json"))
    bar, bar_text = (0.95 * ladder_ppl, "≤ 0.95×") if budget >= ladder_bytes else (ladder_ppl, "below")
    ok = found_ppl <= bar and found_bytes <= budget + 1e-6
    text = (f"# Joint evo study under a KV byte budget at group {args.group_size} (benchmarks/kv_group_search.py)\n\n"
            f"Machine: {machine()}. SmolLM2-135M-Instruct (embedded GGUF, fp32), Wanda at {args.target:.0%}; texts and "
            f"held-out PPL (WikiText-2 test, first {args.eval_windows}×{EVAL_SEQ_LEN}) as in kv_front.py; validation "
            f"8×512 bounded to 60 s.\n\nCommand: `{command}`\n\n"
            f"| plan | group | KV bytes/token | held-out PPL | ratio to uniform {args.ladder_bits}-bit |\n|---|---|---|---|---|\n"
            f"| uniform {args.ladder_bits}-bit, uniform sparsity | {LADDER_GROUP} | {ladder_bytes:.0f} | {ladder_ppl:.2f} | 1 |\n"
            f"| evo joint (sparsity per Linear + K/V bits), budget {budget:.0f} B/token | {args.group_size} | {found_bytes:.0f} "
            f"| {found_ppl:.2f} | {found_ppl / ladder_ppl:.3f} |\n\n"
            f"- Study: {n_complete} complete + {n_pruned} pruned trials in {t_study.seconds / 60:.1f} min (search "
            f"{args.minutes:g} min, then validation); exported trial {plan.provenance.get('trial')}.\n"
            f"- Found K bits {k_bits}, V bits {v_bits} (mean {sum(bits) / len(bits):.2f} bits at group "
            f"{args.group_size}).\n"
            f"- [{'x' if ok else ' '}] held-out PPL {bar_text} uniform {args.ladder_bits}-bit within {budget:.0f} "
            f"B/token: {found_ppl:.2f} vs {bar:.2f}\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
