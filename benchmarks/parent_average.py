"""Does the average of evo's latest parents beat the newest one? (a denoising check)

When the search's late phase is noise-limited, its parents random-walk among near-equal plans, and
their mean (each Linear's sparsity averaged over the latest K parents; the budget stays exact, the
budget being linear in the sparsities) should score below any one of them, as iterate averaging
does for noisy gradient steps (Polyak & Juditsky, 1992). This reads the parents from a finished
``search_quality.py`` store and scores the newest parent and the means of the latest K on the
validation text (8 × 512) and both held-out texts (20 × 512), with that protocol's calibration.

    python benchmarks/parent_average.py /tmp/run/studies.db --ks 4 8 16 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from _common import EVAL_SEQ_LEN, EVAL_WINDOWS, ROOT, Timer, load_smollm2, machine, markdown_table, require_data
from search_quality import heldout_streams, protocol_evaluator


def mean_plan(plans):
    """The plan whose sparsity per module is the mean of ``plans``' (the first plan's other fields)."""
    from sparsealloc.core.plan import AllocationPlan

    modules = plans[0].sparsity.keys()
    return AllocationPlan.from_dict({**plans[0].to_dict(),
                                     "sparsity": {m: float(np.mean([p.sparsity[m] for p in plans])) for m in modules}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="the SQLite file of a search_quality.py run (--store)")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "parent_average.md"))
    args = parser.parse_args()
    require_data()
    import optuna

    from sparsealloc.core import progress
    from sparsealloc.core.keys import PLAN
    from sparsealloc.core.plan import AllocationPlan
    from sparsealloc.pruning import perplexity, tokenize_stream
    from sparsealloc.search.samplers.evo import recent_parents

    progress.set_mode("quiet")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{args.store}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    parents = [AllocationPlan.from_dict(trials[n].user_attrs[PLAN]) for n in recent_parents(study, max(args.ks))]
    model, tokenizer, _ = load_smollm2()
    evaluator = protocol_evaluator(model, tokenizer, samples=args.calib_samples, seq_len=args.calib_seq_len)
    validation = evaluator.spec.validation  # the windows that pick search_quality.py's exported plan
    streams = {"validation": (tokenize_stream(tokenizer, Path(validation.text).read_text()), validation.windows),
               **{text: (stream, EVAL_WINDOWS) for text, stream in heldout_streams(tokenizer).items()}}
    candidates = {"newest parent": parents[0]}
    candidates |= {f"mean of the latest {k}": mean_plan(parents[:k]) for k in args.ks if k <= len(parents)}
    rows = []
    with Timer() as timer:
        for name, plan in candidates.items():
            with evaluator.applied(plan):
                rows.append({"plan": name, **{text: perplexity(model, stream, EVAL_SEQ_LEN, windows)
                                              for text, (stream, windows) in streams.items()}})
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    out.write_text("\n".join([
        "# The mean of evo's latest parents against the newest (benchmarks/parent_average.py)", "",
        f"Machine: {machine()}. Study `{study.study_name}` ({len(parents)} parents read); perplexities in this run "
        f"({timer.seconds / 60:.1f} min), validation 8×512, held-out texts 20×512.", "",
        f"Command: `python benchmarks/parent_average.py STORE --ks {' '.join(map(str, args.ks))}`", "",
        markdown_table(frame), ""]))
    print(out.read_text())


if __name__ == "__main__":
    main()
