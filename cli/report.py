"""``sparsealloc report``: plots and a summary of one study (PNG + HTML, summary.md, summary.html)."""

from __future__ import annotations

import argparse
import logging

from sparsealloc.cli.study import DEFAULT_STORAGE

logger = logging.getLogger(__name__)


def register(sub) -> None:
    parser = sub.add_parser("report", help="plots and a summary of a study (PNG, HTML, Markdown)")
    parser.add_argument("name", help="study name")
    parser.add_argument("--storage", default=DEFAULT_STORAGE)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--model", default=None,
                        help="model whose layout weights per-block sparsity (default: the study's model; "
                             "config only, no weights are loaded)")
    parser.add_argument("--no-model", action="store_true",
                        help="do not read the model's config; per-block sparsity is then an unweighted mean")
    parser.set_defaults(handler=run)


def layout_numels(name: str | None) -> dict[str, int] | None:
    """Linear FQN → weights of model ``name`` from its config (meta device), or None if unavailable."""
    from sparsealloc.core.errors import SparseAllocError
    from sparsealloc.pruning.model.models import load_layout

    if not name:
        return None
    try:
        return dict(load_layout(name).numels)
    except (SparseAllocError, OSError, ValueError, KeyError, ImportError) as exc:
        logger.warning("report: layout of %r unavailable (%s); per-block sparsity is unweighted", name, exc)
        return None


def run(args: argparse.Namespace) -> int:
    from sparsealloc.core.errors import check_output_dir, writing
    from sparsealloc.core.keys import SPEC_ATTR
    from sparsealloc.storage.rdb import load_study, open_storage, redact, store_errors
    from sparsealloc.storage.report import report_trial, write_report

    check_output_dir(args.out, "--out")
    with store_errors(args.storage):
        study = load_study(open_storage(args.storage, create=False), args.name)
        report_trial(study)  # no completed trial → one-line error before anything is written
        model = args.model or (study.user_attrs.get(SPEC_ATTR) or {}).get("model")
        numels = None if args.no_model else layout_numels(model)
        with writing(f"the report to {args.out!r}"):
            report = write_report(study, args.out, numels=numels, storage_label=redact(args.storage))
    for path in report.files:
        print(f"wrote: {path}")
    for note in report.notes:
        print(f"note: {note}")
    return 0
