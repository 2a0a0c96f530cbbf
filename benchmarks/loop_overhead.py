"""Does the study loop's work per trial grow with the study? Loop overhead at trial 100 and at trial 2,000.

One study per sampler on a tiny random Llama (4 blocks, hidden 64, SmolLM2's tokenizer; scoring
takes milliseconds, so the loop's own cost shows), in process, SQLite store, through
:func:`sparsealloc.search.study.run`. Every outcome the loop tells is timestamped; for the first
``--window`` told outcomes and for the last ``--window`` (outcomes ``N − window`` … ``N``), measured
in the same run:

* loop ms/trial = (wall time of the window − the trials' own scoring time) / window: everything the
  orchestrator does besides scoring (sampler ask and tell, store writes, trial counting, heartbeats);
* ask+tell ms/trial: the part spent in the sampler's ``ask`` and ``tell`` (TPE's or evo's own work and
  the trial's store writes);
* ratio late / early of the loop overhead: 1.0 means the loop's work per trial does not grow.

``random`` and ``evo`` (per-Linear genes, 28 parameters per trial, multi-stage) are measured; TPE's
own proposal cost grows with the trials by design (it models all of them) and is reported apart.

    python benchmarks/loop_overhead.py            # → benchmarks/loop_overhead.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from _common import ROOT, machine, markdown_table, require_data
from throughput import spec_for, tiny_model_dir


class Stamped:
    """Wraps a sampler: timestamps every tell, adds up ask/tell seconds per told outcome."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.stamps: list[float] = []  # perf_counter at each tell
        self.busy: list[float] = []  # the told trial's own scoring seconds
        self.sampler_s: list[float] = []  # ask + tell seconds accumulated up to each tell
        self._acc = 0.0

    def ask(self, n: int = 1):
        start = time.perf_counter()
        try:
            return self.sampler.ask(n)
        finally:
            self._acc += time.perf_counter() - start

    def tell(self, number, outcome):
        start = time.perf_counter()
        try:
            return self.sampler.tell(number, outcome)
        finally:
            self._acc += time.perf_counter() - start
            self.stamps.append(time.perf_counter())
            self.busy.append(float(outcome.attrs.get("trial_seconds") or 0.0))
            self.sampler_s.append(self._acc)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def window_row(stamped: Stamped, lo: int, hi: int) -> dict[str, float]:
    """Loop and ask+tell ms per told outcome between outcomes ``lo`` and ``hi`` (indices)."""
    n = hi - lo
    wall = stamped.stamps[hi - 1] - stamped.stamps[lo - 1]
    busy = sum(stamped.busy[lo:hi])
    ask_tell = stamped.sampler_s[hi - 1] - stamped.sampler_s[lo - 1]
    return {"loop ms/trial": 1000 * (wall - busy) / n, "ask+tell ms/trial": 1000 * ask_tell / n,
            "scoring ms/trial": 1000 * busy / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--told", type=int, default=2000, help="outcomes told per study")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--samplers", nargs="+", default=["random", "evo", "tpe"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "loop_overhead.md"))
    args = parser.parse_args()
    require_data()
    from sparsealloc.core import progress
    from sparsealloc.pruning.model.models import load_tokenizer, resolve_source
    from sparsealloc.search.study import run
    from sparsealloc.spaces.spec import StudySpec

    progress.set_mode("quiet")
    work = Path(tempfile.mkdtemp(prefix="sparsealloc-loop-"))
    model = tiny_model_dir(load_tokenizer(resolve_source("smollm2-135m")), work / "tiny")
    rows = []
    for sampler in args.samplers:
        spec = spec_for(model, f"loop-{sampler}", args.told, 8, 64)
        data = {**spec.to_dict(), "sampler": sampler, "objectives": None, "proxy_dtype": None,
                "layerwise": {**spec.to_dict()["layerwise"], "granularity": None}}
        if sampler == "evo":  # COMPLETE trials are 3 of every 19 told outcomes with the default stages
            data["trials"] = max(1, args.told * 3 // 19 + 3)
            data["calibration"]["samples"] = 8
        spec = StudySpec.from_dict(data)
        stamped: list[Stamped] = []

        def hook(s):
            stamped.append(Stamped(s))
            return stamped[-1]

        result = run(spec, f"sqlite:///{work / 'loop.db'}", validate=False, sampler_hook=hook)
        timed = stamped[0]
        told = len(timed.stamps)
        late_lo = told - args.window
        early, late = window_row(timed, 1, args.window + 1), window_row(timed, late_lo, told)
        for label, row in (("first", early), ("last", late)):
            rows.append({"sampler": sampler, "parameters": len(result.study.trials[-1].params),
                         "outcomes told": told, "window": f"{label} {args.window}",
                         **{k: round(v, 2) for k, v in row.items()}})
        rows[-1]["late / early loop"] = round(late["loop ms/trial"] / early["loop ms/trial"], 2)
        print(f"{sampler}: {told} outcomes in {result.seconds:.1f} s", flush=True)
    table = pd.DataFrame(rows)
    text = ["# Loop overhead at the start and the end of a study (benchmarks/loop_overhead.py)", "",
            f"Machine: {machine()}. Tiny random Llama (4 blocks, hidden 64), in process, SQLite (WAL), "
            f"calibration 8×64 tokens, no warm starts; one study per sampler of about {args.told} told "
            "outcomes; the loop's time outside scoring per told outcome over the first and the last "
            f"{args.window} outcomes of the same study.", "", markdown_table(table), ""]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
