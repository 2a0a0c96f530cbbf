"""Run a study from Python: everything ``sparsealloc study run`` does, in one call (README, "From Python")."""

from __future__ import annotations

import shlex
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from sparsealloc.core.errors import StorageError, Interrupted, check_output_dir, writing
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.objectives.trial import TrialEvaluator
from sparsealloc.search.dispatch.base import DISPATCHERS
from sparsealloc.search.orchestrator import run_study
from sparsealloc.search.samplers.base import SAMPLERS, Sampler
from sparsealloc.search.session import (ValidationResult, build_evaluator, check_existing_study, enqueue_warm_starts,
                                        open_sampler, preflight, validate as validate_study, warm_start_trials,
                                        MIN_VALIDATION_SECONDS)
from sparsealloc.spaces.spec import StudySpec
from sparsealloc.storage.artifacts import attach_files, default_artifact_dir
from sparsealloc.storage.export import export_study
from sparsealloc.storage.rdb import (check_storage, open_storage, parse_storage_url, recover_orphans, redact,
                                     store_errors)

#: Seconds between trial heartbeats on a shared store (PostgreSQL), where several orchestrators may run.
HEARTBEAT_SECONDS = 10


@dataclass
class StudyResult:
    """What one :func:`run` did.

    Attributes:
        study: The Optuna study (all its trials, earlier runs' included).
        storage_url: The store's URL.
        told: Trials this run finished, by outcome ("complete", "failed", "pruned").
        retried: Failed trials whose parameters were queued again (their worker died).
        seconds: Time of the search loop.
        setup_seconds: Time to load the model and build the evaluator (about 0 for a given one).
        dispatcher_seconds: Time to start the dispatcher's workers.
        orphans: Trials an earlier run left RUNNING, failed and re-queued (SQLite stores).
        warm_starts: Warm starts this run queued (only a study without trials gets them).
        validation: Held-out perplexity of the re-scored trials; None when not validated.
        exported: The plan files written.
    """

    study: optuna.Study
    storage_url: str
    told: Counter = field(default_factory=Counter)
    retried: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    dispatcher_seconds: float = 0.0
    orphans: list[int] = field(default_factory=list)
    warm_starts: list[str] = field(default_factory=list)
    validation: ValidationResult | None = None
    exported: list[Path] = field(default_factory=list)

    @property
    def best_trial_number(self) -> int | None:
        """The best trial's number (one objective); None with several objectives or no complete trial."""
        try:
            return self.study.best_trial.number if len(self.study.directions) == 1 else None
        except ValueError:  # no complete trial
            return None


def run(spec: StudySpec, storage_url: str, *, dispatcher: str | None = None,
        dispatcher_options: Mapping[str, Any] | None = None, validate: bool = True,
        export_dir: str | Path | None = None, export_by: str = "validation",
        evaluator: TrialEvaluator | None = None, sampler_hook: Callable[[Sampler], Sampler] | None = None,
        echo: Callable[[str], None] | None = None) -> StudyResult:
    """Run (or continue) study ``spec.name`` until it holds ``spec.trials`` COMPLETE trials.

    Nothing is loaded or written before the names, the export folder, the model's files, the data
    files (:func:`~sparsealloc.search.session.preflight`) and the store are checked. Then: build the
    evaluator, open the study (created, or continued when its stored spec matches), re-queue trials
    an earlier run left RUNNING (SQLite), queue the warm starts (new study), run the trials through
    the dispatcher, validate the best plans by held-out perplexity, export.

    Args:
        spec: The study spec.
        storage_url: Store URL (``sqlite:///file.db``, ``postgresql+psycopg2://...``) or a .db path.
        dispatcher: A name in ``DISPATCHERS``: "local" (the default: in process) or "ray".
        dispatcher_options: Its keywords; Ray: workers, cpus_per_worker, gpus_per_worker, address.
        validate: Re-score the best trials by held-out perplexity (``spec.validation``).
        export_dir: Write the best plan (or the Pareto set) here and attach it to the study.
        export_by: Single objective: "validation" exports the best validated trial when validation
            ran (the lowest proxy can overfit the calibration windows), "proxy" the lowest proxy.
        evaluator: A ready evaluator for ``spec`` (saves loading the model); default
            ``build_evaluator(spec)``.
        sampler_hook: Wraps the opened sampler (instrumentation, e.g. timing ask and tell).
        echo: Gets the lines ``sparsealloc study run`` prints, when they happen; default: silent.

    Raises:
        SpecError: bad input, before anything is loaded or written.
        StorageError: the store cannot be used, or failed mid-run (the message says how to resume).
        AllTrialsFailed: too many trials in a row failed.
        NoWorkersLeft: every worker of the dispatcher died.
        Interrupted: Ctrl-C (a KeyboardInterrupt) after the store was opened; the message names the
            ``study resume`` command that finishes the study.
    """
    url = parse_storage_url(storage_url)
    SAMPLERS.get(spec.sampler)
    dispatcher_cls = DISPATCHERS.get(dispatcher or "local")
    if export_dir:
        check_output_dir(export_dir, "--export")
    preflight(spec, validate)
    check_storage(url)
    _check_name_free(spec, url)
    start = time.perf_counter()
    evaluator = build_evaluator(spec) if evaluator is None else evaluator
    setup_seconds = time.perf_counter() - start
    say = echo or (lambda line: None)
    resume = resume_command(spec.name, url, validate=validate, export_dir=export_dir, dispatcher=dispatcher,
                            dispatcher_options=dispatcher_options)
    hint = f"trials written so far are kept; continue with: {resume}"
    with store_errors(url, hint), _resume_on_interrupt(resume):
        shared = not url.startswith("sqlite")
        # Shared stores (PostgreSQL) may have several orchestrators: heartbeats instead of orphan sweeps.
        sampler = open_sampler(spec, open_storage(url, heartbeat_interval=HEARTBEAT_SECONDS if shared else None),
                               evaluator.space)
        sampler = sampler_hook(sampler) if sampler_hook else sampler
        study = sampler.study
        orphans = [] if shared else recover_orphans(study)
        if orphans:
            say(f"re-queued {len(orphans)} trial(s) left RUNNING by an earlier run: {orphans}")
        warm_starts = enqueue_warm_starts(sampler, evaluator)
        if spec.early_stopping.enabled and dispatcher_cls.early_stopping_note:
            say(dispatcher_cls.early_stopping_note)
        start = time.perf_counter()
        workers = dispatcher_cls.for_study(spec, evaluator, **dict(dispatcher_options or {}))
        dispatcher_seconds = time.perf_counter() - start
        try:
            done = run_study(sampler, workers, spec.trials, spec.timeout)
        finally:
            workers.close()
        result = StudyResult(study, url, done.told, done.retried, done.seconds, setup_seconds, dispatcher_seconds,
                             orphans, warm_starts)
        say(f"study: {spec.name}  store: {url}  space: {','.join(spec.space)}  sampler: {spec.sampler}")
        say(f"setup: {setup_seconds:.1f} s  trials this run: {dict(done.told)}  in {done.seconds:.1f} s")
        if validate and spec.validation.top_k > 0:
            bound = spec.validation.max_seconds
            bound = max(done.seconds, MIN_VALIDATION_SECONDS) if bound is None else bound
            result.validation = validate_study(study, evaluator, spec, budget_seconds=bound)
            for line in validation_lines(study, result.validation.to_dict()):
                say(line)
        if export_dir:
            with writing(f"the exported plans to {str(export_dir)!r}"):
                result.exported = export_study(study, export_dir, by=export_by)
                attach_files(study, result.exported, default_artifact_dir(url))  # shown by sparsealloc dashboard
            for path in result.exported:
                say(f"exported: {path}")
            provenance = AllocationPlan.load(result.exported[0]).provenance if len(result.exported) == 1 else {}
            validated = provenance.get("validation", {})
            ppl, by_text = validated.get("perplexity"), validated.get("perplexity_by_text")
            if ppl is not None:
                say(f"exported plan perplexity: {ppl:.3f}" + (
                    f" (geometric mean over {len(by_text)} texts: {', '.join(f'{v:.3f}' for v in by_text.values())})"
                    if by_text else ""))
                chosen = provenance.get("trial")
                if chosen != study.best_trial.number:
                    say(f"exported trial {chosen}, the best on held-out text; the lowest proxy is trial "
                        f"{study.best_trial.number} (export it with: sparsealloc export --by proxy)")
    return result


def resume_command(name: str, url: str, *, validate: bool = True, export_dir: str | Path | None = None,
                   dispatcher: str | None = None, dispatcher_options: Mapping[str, Any] | None = None) -> str:
    """The ``sparsealloc study resume`` command line that finishes a run of study ``name``.

    Args:
        name: The study name (shell-quoted in the result).
        url: The store's URL (its password hidden in the result).
        validate: False adds ``--no-validate``.
        export_dir: Adds ``--export DIR``.
        dispatcher: "ray" adds the worker flags from ``dispatcher_options``.
        dispatcher_options: workers, address, gpus_per_worker, cpus_per_worker.

    Returns:
        A command a shell runs as it is.
    """
    words = ["sparsealloc", "study", "resume", name, "--storage", redact(url)]
    if not validate:
        words.append("--no-validate")
    if export_dir:
        words += ["--export", str(export_dir)]
    if dispatcher == "ray":
        options = dict(dispatcher_options or {})
        words += ["--workers", str(options.get("workers", 1))]
        if options.get("address"):
            words += ["--ray-address", str(options["address"])]
        if options.get("gpus_per_worker"):
            words += ["--gpus-per-worker", f"{options['gpus_per_worker']:g}"]
        if options.get("cpus_per_worker", 1.0) != 1.0:
            words += ["--cpus-per-worker", f"{options['cpus_per_worker']:g}"]
    return shlex.join(words)


@contextmanager
def _resume_on_interrupt(resume: str) -> Iterator[None]:
    """Ctrl-C once the study is in the store: an :class:`Interrupted` naming the command that finishes it."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the finished trials are saved in the store (a trial cut off is "
                          f"redone); finish the study with: {resume}") from None


def _check_name_free(spec: StudySpec, url: str) -> None:
    """A study of this name stored with another spec fails now, before the model is loaded."""
    if url.startswith("sqlite") and not Path(url.removeprefix("sqlite:///")).is_file():
        return  # no store yet
    try:
        existing = open_storage(url, create=False)
    except StorageError:
        return  # no study store there yet: nothing to conflict with
    check_existing_study(spec, existing)


def validation_lines(study: optuna.Study, validation: Mapping[str, Any]) -> list[str]:
    """A stored validation (``ValidationResult.to_dict()``) as ``study run`` and ``study show`` print it."""
    names = {t.number: f"warm start: {n}" for n, t in warm_start_trials(study).items()}
    best = study.best_trial.number if len(study.directions) == 1 else None
    by_text = validation.get("by_text") or {}
    lines = ["validation (held-out perplexity" + (f", geometric mean over {len(by_text)} texts):" if by_text else "):")]
    lines += [f"  text {i + 1}: {text}" for i, text in enumerate(by_text)]
    for number, ppl in sorted(validation["ppl"].items(), key=lambda kv: kv[1]):
        label = names.get(int(number), "best" if int(number) == best else "")
        each = "".join(f"  text {i + 1} {per.get(number, float('nan')):.3f}" for i, per in enumerate(by_text.values()))
        lines.append(f"  trial {int(number):4d}  proxy {validation['proxy'][number]:.5g}  ppl {ppl:10.3f}{each}  {label}")
    rho = validation.get("spearman")
    lines.append(f"  spearman(proxy, ppl) = {rho:.3f}" if rho is not None else "  spearman: too few trials")
    skipped = validation.get("skipped") or []
    if skipped:
        lines.append(f"  {len(skipped)} more plan(s) not validated: validation stops when it would take longer "
                     f"than the search (validation.max_seconds sets the bound; {validation.get('seconds', 0):.0f} s used)")
    return lines
