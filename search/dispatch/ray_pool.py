"""Ray dispatcher: a pool of long-lived scorer actors, kept busy asynchronously.

Each actor loads the model once, receives the calibration windows through the object store (a
numpy array: zero-copy, read-only, no per-actor pickling), builds its evaluator as the driver does
(:func:`~sparsealloc.search.session.build_evaluator`: statistics, pristine weights, dense reference)
and then scores trials. Actors never touch the study store: the orchestrator stays the single writer.

Early stopping is in process only: actors never call back to the orchestrator, so ``report`` is
ignored here and every trial runs to full fidelity (its intermediate values are written after the
fact, and the zero-forward rung is skipped). Use the local dispatcher for multi-fidelity studies.

Faults: an actor that dies mid-trial (``RayActorError``) is restarted by Ray (``max_restarts``);
its trial comes back as a failed outcome with the reason and ``retry=True``, so the orchestrator
records it and queues its parameters once more for the next free (live or restarted) actor. A
restarting actor counts as busy until a ping (retried by Ray through the restart) gets through, so
no trial is handed to it while it reloads the model. An actor that is dead for good (restarts used
up, or its restart failed: ``ActorDiedError``) leaves the pool, so it cannot fail every later trial
at once; with no actor left (``capacity`` 0) the study stops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from sparsealloc.core.errors import SpecError
from sparsealloc.core.types import Outcome, Proposal
from sparsealloc.search.dispatch.base import Dispatcher, failure_reason


def _require_ray():
    try:
        import ray
    except ImportError:
        raise SpecError("--workers needs Ray: pip install 'sparsealloc[ray]'") from None
    return ray


class ScorerActor:
    """Body of the Ray actor (wrapped with ``ray.remote`` at pool creation)."""

    def __init__(self, spec_dict: Mapping[str, Any], windows_holder: list, threads: int,
                 window_domains: tuple[int, ...] | None = None) -> None:
        import numpy as np
        import ray
        import torch

        from sparsealloc.core import progress
        from sparsealloc.search.session import build_evaluator
        from sparsealloc.spaces.spec import StudySpec

        progress.set_mode("quiet")
        torch.set_num_threads(max(1, threads))
        # small: (n, seq_len) ids; then the held-out windows trials are scored on, where there are any
        windows, *scored = (torch.from_numpy(np.array(ray.get(ref))) for ref in windows_holder)
        self.evaluator = build_evaluator(StudySpec.from_dict(dict(spec_dict)), windows=windows,
                                         score_windows=scored[0] if scored else None, window_domains=window_domains)
        self.pid = os.getpid()

    def score(self, params: Mapping[str, Any], windows: tuple[int, ...] | None = None) -> Outcome:
        try:
            return self.evaluator(params) if windows is None else self.evaluator(params, windows=windows)
        except Exception as exc:  # a trial fault is data
            return Outcome("failed", reason=failure_reason(exc))

    def ping(self) -> int:
        return self.pid


class RayDispatcher(Dispatcher):
    """Scores proposals on ``workers`` Ray actors (see module docstring).

    Args:
        spec: The study spec (as a dict or StudySpec); actors rebuild everything from it.
        windows: Calibration token ids, shape (n, seq_len) (torch or numpy).
        score_windows: The held-out windows trials are scored on (``calibration.score_samples``), or None.
        window_domains: The domain of each scored window (``calibration.domains``, a windows file's
            clusters), or None.
        workers: Number of actors.
        cpus_per_worker: ``num_cpus`` of each actor (also its torch threads).
        gpus_per_worker: ``num_gpus`` of each actor (fractional allowed).
        address: Ray cluster address ("auto", "HOST:PORT") or None for a local cluster.
        max_restarts: Ray restarts of a dead actor.
        actor_body: The actor's class: :class:`ScorerActor` or a subclass of it (instrumented
            scorers, e.g. in tests).
    """

    early_stopping_note = "note: early stopping runs in process only; Ray workers score every trial to full fidelity"

    @classmethod
    def for_study(cls, spec, evaluator, **options) -> RayDispatcher:
        """Actors that rebuild the evaluator from ``spec`` on ``evaluator``'s calibration windows."""
        return cls(spec, evaluator.ctx.windows, score_windows=evaluator.ctx.score_windows,
                   window_domains=evaluator.ctx.window_domains, **options)

    def __init__(self, spec, windows, workers: int = 2, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                 address: str | None = None, max_restarts: int = 1,
                 actor_body: type[ScorerActor] = ScorerActor, score_windows=None,
                 window_domains: tuple[int, ...] | None = None) -> None:
        import numpy as np

        ray = _require_ray()
        self.ray = ray
        if workers < 1:
            raise SpecError(f"--workers must be at least 1, but got {workers}")
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True,
                                      "log_to_driver": False}
            if address is None:
                kwargs["num_cpus"] = max(int(workers * cpus_per_worker), os.cpu_count() or 1)
            ray.init(address=address, **kwargs)
        spec_dict = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        arrays = [w.numpy() if hasattr(w, "numpy") else np.asarray(w)
                  for w in (windows, score_windows) if w is not None]
        # Held for the pool's lifetime: an actor restarted after a crash re-runs __init__ and fetches
        # the windows again, which fails once the driver has dropped its last reference.
        self._windows_refs = windows_refs = [ray.put(array) for array in arrays]
        actor_cls = ray.remote(actor_body).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                    max_restarts=max_restarts, max_task_retries=0)
        self.actors = [actor_cls.remote(spec_dict, windows_refs, int(max(1, cpus_per_worker)), window_domains)
                       for _ in range(workers)]
        ray.get([a.ping.remote() for a in self.actors])  # surface start-up errors now
        self._idle = list(self.actors)
        self._inflight: dict[Any, tuple[Any, Proposal]] = {}
        self._waking: dict[Any, Any] = {}  # ping ref -> actor that Ray is restarting

    def submit(self, proposal: Proposal, report=None) -> None:
        if not self._idle:
            raise RuntimeError("submit() called with no idle worker; respect capacity")
        actor = self._idle.pop(0)
        ref = actor.score.remote(dict(proposal.params), proposal.windows)
        self._inflight[ref] = (actor, proposal)

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        """Finished trials; also returns (maybe empty) when a restarting worker is free again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        finished: list[tuple[int, Outcome]] = []
        woke = False
        while (self._inflight or self._waking) and not finished and not woke:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = self.ray.wait([*self._inflight, *self._waking], num_returns=1, timeout=left)
            if not ready:
                break  # timeout
            for ref in ready:
                if ref in self._waking:
                    woke |= self._woken(self._waking.pop(ref), ref)
                else:
                    finished.append(self._collect(ref))
        return finished

    def _collect(self, ref) -> tuple[int, Outcome]:
        actor, proposal = self._inflight.pop(ref)
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            reason = f"worker died: {failure_reason(exc)}"
            if isinstance(exc, self.ray.exceptions.ActorDiedError):
                self._retire(actor)  # restarts used up, or its restart failed
            else:  # ActorUnavailableError: Ray is restarting it; busy until a ping gets through
                self._waking[actor.ping.options(max_task_retries=-1).remote()] = actor
            return proposal.trial_number, Outcome("failed", reason=reason, retry=True)
        except self.ray.exceptions.RayError as exc:
            self._idle.append(actor)
            return proposal.trial_number, Outcome("failed", reason=failure_reason(exc))
        self._idle.append(actor)
        return proposal.trial_number, outcome

    def _woken(self, actor, ping_ref) -> bool:
        """A restarting actor answered (back to idle, True) or died for good (retired, False)."""
        try:
            self.ray.get(ping_ref)
        except self.ray.exceptions.RayActorError:
            self._retire(actor)
            return False
        self._idle.append(actor)
        return True

    def _retire(self, actor) -> None:
        """Take a permanently dead actor out of the pool (its trial was already failed and re-queued)."""
        self.actors = [a for a in self.actors if a is not actor]
        self._idle = [a for a in self._idle if a is not actor]

    @property
    def capacity(self) -> int:
        """Live actors (restarting ones included); the orchestrator stops once this reaches 0."""
        return len(self.actors)

    @property
    def in_flight(self) -> int:
        """Trials being scored plus restarting workers (busy until they answer a ping)."""
        return len(self._inflight) + len(self._waking)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors, self._idle, self._inflight, self._waking = [], [], {}, {}
