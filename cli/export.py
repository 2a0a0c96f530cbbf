"""``sparsealloc export``: a study's best plan (or Pareto set) as AllocationPlan JSON files."""

from __future__ import annotations

import argparse

from sparsealloc.cli.study import DEFAULT_STORAGE


def register(sub) -> None:
    parser = sub.add_parser("export", help="write the best plan (or the Pareto set) as JSON")
    parser.add_argument("name", help="study name")
    parser.add_argument("--storage", default=DEFAULT_STORAGE)
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--pareto", action="store_true", help="write DIR/pareto/*.json (multi-objective)")
    parser.add_argument("--by", choices=("validation", "proxy"), default="validation",
                        help="single objective: the trial with the lowest held-out perplexity when the study was "
                             "validated (default), or the lowest proxy value")
    parser.add_argument("--artifact-dir", default=None, metavar="DIR",
                        help="also attach the plans to the study as artifacts here (default: beside a SQLite "
                             "store, STORE-artifacts/; ./sparsealloc-artifacts for a server store)")
    parser.add_argument("--no-artifacts", action="store_true", help="only write the files")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sparsealloc.core.errors import check_output_dir, writing
    from sparsealloc.storage.export import export_study
    from sparsealloc.storage.rdb import load_study, open_storage, store_errors

    check_output_dir(args.out, "--out")
    with store_errors(args.storage), writing(f"the exported plans to {args.out!r}"):
        study = load_study(open_storage(args.storage, create=False), args.name)
        paths = export_study(study, args.out, pareto=True if args.pareto else None, by=args.by)
    for path in paths:
        print(f"exported: {path}")
    if not args.no_artifacts:
        from sparsealloc.storage.artifacts import attach_files, default_artifact_dir

        folder = args.artifact_dir or default_artifact_dir(args.storage)
        with store_errors(args.storage), writing(f"the study artifacts to {str(folder)!r}"):
            attach_files(study, paths, folder)
        shown_by = f"sparsealloc dashboard --storage {args.storage}"
        if args.artifact_dir:
            shown_by += f" --artifact-dir {args.artifact_dir}"
        print(f"attached to study {args.name!r} as artifacts in {folder} ({shown_by} shows them)")
    return 0
