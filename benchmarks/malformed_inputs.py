"""Malformed inputs tried against the CLI, and the failures found (traceback, wrong exit code,
several stderr lines, a missing "what was expected / what was received", a store written, a model
loaded before the error).

Runs the catalogue of ``tests/fuzz/catalogue.py`` (the same cases the tests use) plus a seeded
random sample (one field of a valid spec, one flag of a valid command line, or one store URL made
bad), in process, on a tiny random Llama and a store holding three studies. Nothing here needs
SmolLM2 or the network.

    python benchmarks/malformed_inputs.py [--random 60] [--seed 0] [--before COMMIT]

``--before COMMIT`` also runs the same inputs against the package as it was at COMMIT (a temporary
git worktree, imported in a subprocess instead of the installed tree), to count the failures the
catalogue finds in older code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from _common import ROOT, machine, markdown_table

KINDS = (("traceback", ("raised", "traceback")), ("wrong exit code", ("exit code",)),
         ("not one error line", ("lines on stderr", "does not start")), ("message lacks a fragment", ("lacks",)),
         ("store written", ("store changed", "new store")), ("model loaded first", ("model was loaded",)),
         ("password shown", ("password",)))


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_model(folder: Path) -> tuple[Path, Path]:
    """The tests' tiny random Llama (tests/conftest.py builders) saved to ``folder``, and a text file."""
    conftest = load(ROOT / "tests" / "conftest.py", "sparsealloc_bench_conftest")
    model_dir = folder / "tiny-llama"
    conftest.build_tiny_model("llama").save_pretrained(model_dir)
    conftest.build_tokenizer().save_pretrained(model_dir)
    text = folder / "corpus.txt"
    text.write_text(conftest.CORPUS * 8, encoding="utf-8")
    return model_dir, text


PACKAGES = ("core", "spaces", "pruning", "objectives", "storage", "search", "cli")


def use_package_root(root: Path) -> None:
    """Import ``sparsealloc.X`` from ``root/X`` (a checkout of another commit), not the installed tree."""
    import types

    sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in type(f).__name__ + getattr(f, "__name__", "")]
    top = types.ModuleType("sparsealloc")
    top.__path__ = []
    sys.modules["sparsealloc"] = top
    for name in PACKAGES:
        spec = importlib.util.spec_from_file_location(f"sparsealloc.{name}", root / name / "__init__.py",
                                                      submodule_search_locations=[str(root / name)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        setattr(top, name, module)
    for name in PACKAGES:
        module = sys.modules[f"sparsealloc.{name}"]
        module.__spec__.loader.exec_module(module)


def kind_of(problem: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in problem for k in keys)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=60, help="random inputs per category (specs, flags; URLs: half)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "malformed_inputs.md"))
    parser.add_argument("--before", metavar="COMMIT", help="also measure the package at this commit")
    parser.add_argument("--package-root", help=argparse.SUPPRESS)  # internal: run against another checkout
    parser.add_argument("--json", help=argparse.SUPPRESS)  # internal: write the rows here
    args = parser.parse_args()
    if args.package_root:
        use_package_root(Path(args.package_root))

    from sparsealloc.core.progress import track

    catalogue = load(ROOT / "tests" / "fuzz" / "catalogue.py", "sparsealloc_tests_fuzz_catalogue")
    cases = [(c, "catalogue") for c in catalogue.CASES]
    cases += [(c, "random") for c in catalogue.random_spec_cases(args.random, args.seed)]
    cases += [(c, "random") for c in catalogue.random_cli_cases(args.random, args.seed)]
    cases += [(c, "random") for c in catalogue.random_storage_cases(args.random // 2, args.seed)]

    start = time.perf_counter()
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, text = tiny_model(root)
        env = catalogue.make_env(root / "env", model_dir, text)
        for case, source in track(cases, desc="malformed inputs", total=len(cases), unit="input"):
            result = catalogue.run_case(case, env, root / "case")
            rows.append({"category": case.category, "source": source, "clean": result.clean,
                         "kinds": sorted({kind_of(p) for p in result.problems})})
            if not result.clean:
                failures.append((case, result))
    seconds = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": seconds, "failures": [
            {"id": case.id, "problems": result.problems} for case, result in failures]}), encoding="utf-8")
        return

    lines = [
        "# Malformed inputs: clean errors and failures",
        "",
        f"Measured by `python benchmarks/malformed_inputs.py --random {args.random} --seed {args.seed}"
        f"{f' --before {args.before}' if args.before else ''}` ({machine()}).",
        "",
        "Each input runs `sparsealloc.cli.main.main(argv)` in process. A clean error means exit code 2 and exactly",
        "one stderr line starting with `error:`, which holds the case's expected fragments (catalogue inputs).",
        "It also means no traceback, the existing store unchanged row by row, no new store created, and no",
        "model loaded before the error (unless the input can only be judged against the tiny model). Catalogue",
        "inputs are the table-driven cases of `tests/fuzz/catalogue.py`. Random inputs are seeded: one field of",
        "a valid spec, one flag of a valid `study run`, or one store URL made bad.",
        "",
        f"## This tree ({len(rows)} inputs in {seconds:.0f} s)",
        "",
        *report(rows, [(case.id, result.problems) for case, result in failures]),
    ]
    if args.before:
        before = run_before(args)
        lines += [f"## At commit {args.before} ({len(before['rows'])} inputs in {before['seconds']:.0f} s)", "",
                  "The same inputs against the package as it was at that commit. There, \"message lacks a "
                  "fragment\" can also mean a clean message worded differently from today's.", "",
                  *report(before["rows"], [(f["id"], f["problems"]) for f in before["failures"]])]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


def run_before(args: argparse.Namespace) -> dict:
    """Run this script against a temporary worktree of ``args.before``; returns its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before],
                       check=True, capture_output=True)
        try:
            out = Path(tmp) / "rows.json"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--random", str(args.random), "--seed",
                            str(args.seed), "--package-root", str(tree), "--json", str(out)], check=True)
            return json.loads(out.read_text(encoding="utf-8"))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                           capture_output=True)


def report(rows: list[dict], failures: list[tuple[str, list[str]]]) -> list[str]:
    """The per-category table and the list of failures, as Markdown lines."""
    frame = pd.DataFrame(rows)
    table = []
    for (category, source), group in frame.groupby(["category", "source"], sort=True):
        kinds = Counter(k for ks in group["kinds"] for k in ks)
        table.append({"category": category, "inputs": source, "tried": len(group), "clean errors": int(group["clean"].sum()),
                      "failures": int((~group["clean"]).sum()),
                      "failure kinds": ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "-"})
    table.append({"category": "**all**", "inputs": "", "tried": len(frame), "clean errors": int(frame["clean"].sum()),
                  "failures": int((~frame["clean"]).sum()), "failure kinds": ""})
    lines = [markdown_table(pd.DataFrame(table)), ""]
    if failures:
        lines += ["Failures:", ""]
        lines += [f"- `{case_id}`: {'; '.join(problems)}".replace("\n", " ") for case_id, problems in failures]
        lines += [""]
    return lines


if __name__ == "__main__":
    main()
