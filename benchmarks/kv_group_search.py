"""A joint evo study under a KV byte budget at a coarser group size, against the uniform ladder at group 32.

The budget is the bytes of uniform ``--ladder-bits`` at group 32 (kv_front.py's ladder point); the study
quantizes with ``--group-size`` and searches K and V bits per layer (exact byte budget) and sparsity per
Linear (exact 50% budget), as kv_front.py's joint studies do. Same texts and held-out PPL as kv_front.py;
the ladder point and the found plan are measured in the same run.

    python benchmarks/kv_group_search.py --group-size 64 --ladder-bits 3 --minutes 10

With ``--sparsity-minutes M`` a sparsity-only evo study (same calibration, no KV quantization, so its
trials are cheaper) runs first; its plan seeds the joint study, alone and with the KV bits of each
``--seed-kv-plans`` file (earlier exported plans). ``--sparsity-plan`` instead reuses a saved plan;
with both, the sparsity-only study continues from that plan. The table then also shows uniform
``--ladder-bits`` on that searched sparsity, at group 32 and at ``--group-size``, which separates what
the KV allocation adds from what the sparsity allocation adds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import (EVAL_SEQ_LEN, ROOT, WIKITEXT, Timer, from_root, machine, plan_ppl, require_data, uniform_kv_plan,
                     wanda_kv_evaluator)

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
    parser.add_argument("--sparsity-minutes", type=float, default=0.0,
                        help="first run a sparsity-only evo study this long and seed the joint study with its plan")
    parser.add_argument("--sparsity-plan", default=None,
                        help="a saved sparsity plan to seed with instead of running the sparsity-only study")
    parser.add_argument("--calib-mix", action="store_true",
                        help="calibrate on half WikiText-2 valid, half the built-in Python-docs calibration topics "
                             "(as search_quality.py --calib-mix); validation stays on WikiText-2")
    parser.add_argument("--seed-kv-plans", nargs="*", default=[],
                        help="plans whose KV bits also seed the joint study, on the searched sparsity")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "kv_group_search.md"))
    args = parser.parse_args()
    require_data()
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.objectives import TrialEvaluator, kv_bytes_per_token
    from sparsealloc.pruning import TextSource, tokenize_stream
    from sparsealloc.search.study import run
    from sparsealloc.spaces.spec import KVSpec, StudySpec

    model, tokenizer, base, shared = wanda_kv_evaluator(
        "sparsealloc-kvgroup-", args.target, TextSource("builtin", "calib").read() if args.calib_mix else None)
    base = base.override(sampler="evo", trials=10**6, timeout=args.minutes * 60)
    work = Path(tempfile.mkdtemp(prefix="sparsealloc-kvgroup-"))  # the studies' store, exports and seed plans
    store = f"sqlite:///{work / 'studies.db'}"
    texts = {"WikiText-2 test": tokenize_stream(tokenizer, (WIKITEXT / "test.txt").read_text()),
             "Python docs": tokenize_stream(tokenizer, TextSource("builtin", "eval").read())}
    layout = shared.ctx.layout

    def measure(evaluator, plan) -> tuple[float, ...]:
        return tuple(plan_ppl(evaluator, plan, model, stream, args.eval_windows) for stream in texts.values())

    ladder_eval = TrialEvaluator(shared.ctx, base)
    ladder_plan = uniform_kv_plan(ladder_eval.space, args.ladder_bits)
    budget = kv_bytes_per_token(layout.attention, ladder_plan.kv_bits, layout.kv_heads, layout.head_dim, LADDER_GROUP)
    ladder_ppl = measure(ladder_eval, ladder_plan)
    ladder_bytes, budget = budget, args.budget_bytes or budget
    sparsity_path = Path(args.out).with_name(f"{Path(args.out).stem}_sparsity_plan.json")
    rows, seeds, sparsity_note = [], [], ""

    def per_linear(spec: StudySpec) -> StudySpec:
        return StudySpec.from_dict({**spec.to_dict(), "layerwise": {**spec.to_dict()["layerwise"], "granularity": None}})

    sparsity_plan = AllocationPlan.load(args.sparsity_plan) if args.sparsity_plan else None
    if args.sparsity_minutes > 0:  # with --sparsity-plan too: the study continues from that plan
        seed = (str(Path(args.sparsity_plan).resolve()),) if args.sparsity_plan else ()
        sparsity_spec = per_linear(base.override(name="sparsity", space=("layerwise",), timeout=args.sparsity_minutes * 60,
                                                 seed_plans=seed))
        with Timer() as t_sparsity:
            sparsity_result = run(sparsity_spec, store,
                                  evaluator=TrialEvaluator(shared.ctx, sparsity_spec), validate=True,
                                  export_dir=work / "sparsity")
        sparsity_plan = AllocationPlan.load(sparsity_result.exported[0])
        sparsity_plan.save(sparsity_path)
        sparsity_note = (f"- Sparsity-only evo study: {args.sparsity_minutes:g} min search, {t_sparsity.seconds / 60:.1f} min "
                         f"with validation" + (f", seeded with {from_root(args.sparsity_plan)} (a continued search)"
                                               if args.sparsity_plan else "")
                         + f"; its plan is {sparsity_path.name}.\n")
    if sparsity_plan is not None:
        seeds.append(work / "searched_sparsity.json")
        sparsity_plan.save(seeds[-1])
        for path in args.seed_kv_plans:
            seeds.append(work / f"searched_sparsity+kv_of_{Path(path).stem}.json")
            sparsity_plan.replace(kv_bits=AllocationPlan.load(path).kv_bits).save(seeds[-1])
    spec = per_linear(base.override(name="joint", space=("layerwise", "kv"), warm_start=("uniform", "owl", "depth_ramp"),
                                    kv=KVSpec(group_size=args.group_size, budget_bytes=budget),
                                    seed_plans=tuple(str(s) for s in seeds)))
    evaluator = TrialEvaluator(shared.ctx, spec)
    if sparsity_plan is not None:  # uniform bits on the searched sparsity: at group 32, and at the study's group
        own = [(args.group_size, evaluator)] if args.group_size != LADDER_GROUP else []
        for group, uniform_eval in [(LADDER_GROUP, ladder_eval), *own]:
            same_bits = uniform_kv_plan(uniform_eval.space, args.ladder_bits).kv_bits
            rows.append((f"uniform {args.ladder_bits}-bit, searched sparsity (sparsity-only evo)", group,
                         kv_bytes_per_token(layout.attention, same_bits, layout.kv_heads, layout.head_dim, group),
                         measure(uniform_eval, sparsity_plan.replace(kv_bits=same_bits))))
    with Timer() as t_study:
        result = run(spec, store, evaluator=evaluator, validate=True, export_dir=work / "joint")
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
               + (f" --eval-windows {args.eval_windows}" if args.eval_windows != 8 else "")
               + (" --calib-mix" if args.calib_mix else "")
               + (f" --sparsity-minutes {args.sparsity_minutes:g}" if args.sparsity_minutes else "")
               + (f" --sparsity-plan {from_root(args.sparsity_plan)}" if args.sparsity_plan else "")
               + (f" --seed-kv-plans {' '.join(map(from_root, args.seed_kv_plans))}" if args.seed_kv_plans else "")
               + f" --out {from_root(args.out)}")
    plan.save(Path(args.out).with_name(f"{Path(args.out).stem}_plan.json"))
    factor, bar_text = (0.95, "≤ 0.95×") if budget >= ladder_bytes else (1.0, "below")

    def cells(ppl: tuple[float, ...]) -> str:
        return " | ".join(f"{p:.2f} | {p / ref:.3f}" for p, ref in zip(ppl, ladder_ppl))

    checks = "".join(f"- [{'x' if found <= factor * ref and found_bytes <= budget + 1e-6 else ' '}] {name}: held-out PPL "
                     f"{bar_text} uniform {args.ladder_bits}-bit within {budget:.0f} B/token: {found:.2f} vs {factor * ref:.2f}\n"
                     for name, found, ref in zip(texts, found_ppl, ladder_ppl))
    text = (f"# Joint evo study under a KV byte budget at group {args.group_size} (benchmarks/kv_group_search.py)\n\n"
            f"Machine: {machine()}. SmolLM2-135M-Instruct (embedded GGUF, fp32), Wanda at {args.target:.0%}; texts and "
            f"held-out PPL (first {args.eval_windows}×{EVAL_SEQ_LEN} of WikiText-2 test and of the built-in Python-docs "
            f"evaluation text) as in kv_front.py"
            + ("; calibration half WikiText-2 valid, half the Python-docs calibration topics" if args.calib_mix else "")
            + f"; validation 8×512 of WikiText-2 valid bounded to 60 s.\n\nCommand: `{command}`\n\n"
            f"| plan | group | KV bytes/token | WikiText-2 test | ratio to uniform {args.ladder_bits}-bit | Python docs "
            f"| ratio to uniform {args.ladder_bits}-bit |\n|---|---|---|---|---|---|---|\n"
            f"| uniform {args.ladder_bits}-bit, uniform sparsity | {LADDER_GROUP} | {ladder_bytes:.0f} | {cells(ladder_ppl)} |\n"
            f"| evo joint (sparsity per Linear + K/V bits), budget {budget:.0f} B/token | {args.group_size} | {found_bytes:.0f} "
            f"| {cells(found_ppl)} |\n"
            + "".join(f"| {name} | {group} | {nbytes:.0f} | {cells(ppl)} |\n" for name, group, nbytes, ppl in rows)
            + "\n" + sparsity_note +
            f"- Joint study: {n_complete} complete + {n_pruned} pruned trials in {t_study.seconds / 60:.1f} min (search "
            f"{args.minutes:g} min, then validation); warm starts {', '.join(result.warm_starts)}; exported trial "
            f"{plan.provenance.get('trial')}.\n"
            f"- Found K bits {k_bits}, V bits {v_bits} (mean {sum(bits) / len(bits):.2f} bits at group "
            f"{args.group_size}).\n"
            + checks)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
