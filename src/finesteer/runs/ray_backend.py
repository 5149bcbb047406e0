"""`RayBackend`: a plan's jobs on model-holding Ray actors (`--backend ray`).

Each actor calls the plan's picklable `setup()` once (it loads the model itself, on the device and
in the dtype the setup names) and then runs jobs with the same `task(worker, payload)` function the
local backend calls. Torch threads per actor are set (default: its `num_cpus`), so N actors on N
cores do not oversubscribe them. Two jobs are queued per actor so it never waits for the driver.

Faults: an actor that dies (OOM, a killed process, a lost node) is restarted by Ray and its queued
jobs are retried on it (`max_restarts`, `max_task_retries`); if it is gone for good its jobs go to
the other actors. The driver stores every record as it arrives (`runs.runner.run_jobs`), so a
killed driver resumes from the store with `--resume`. Ray is optional (`pip install
'finesteer[ray]'`) and imported only here, when a Ray backend is made.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from finesteer.runs.backend import BackendError, BackendOptions, Task, Worker

MAX_RETRIES = 3
"""Restarts of a dead actor, and retries of each job it held, before its jobs move elsewhere."""
QUEUED_PER_ACTOR = 2


def import_ray() -> Any:
    """The `ray` module, or a BackendError saying how to install it (checked before any model loads)."""
    try:
        import ray  # optional and heavy: `import finesteer` must not import it
    except ImportError as exc:
        raise BackendError("--backend ray needs Ray: pip install 'finesteer[ray]' (ray>=2.9)") from exc
    return ray


class JobActor:
    """The body of one Ray actor: the worker state loaded once, then one job per call."""

    def __init__(self, setup: Callable[[], Any], threads: int) -> None:
        torch.set_num_threads(threads)
        self.worker = Worker(setup())

    def run(self, task: Task, payload: Any) -> Any:
        return task(self.worker, payload)

    def pid(self) -> int:
        return os.getpid()


class RayBackend:
    """Jobs on `options.actors` Ray actors (see the module doc); connects to `options.ray_address`
    or starts a local Ray instance (shut down again by `close`) when none is running."""

    def __init__(self, setup: Callable[[], Any], options: BackendOptions) -> None:
        ray = import_ray()
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            if options.ray_address:
                ray.init(address=options.ray_address, log_to_driver=False)
            else:
                cpus = max(os.cpu_count() or 1, math.ceil(options.actors * options.num_cpus))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
            max_restarts=MAX_RETRIES,
            max_task_retries=MAX_RETRIES,
        )(JobActor)
        self._actors = [remote.remote(setup, options.actor_threads) for _ in range(options.actors)]
        self._alive = list(range(len(self._actors)))

    def pids(self) -> list[int]:
        """The process id of every live actor (what a fault test kills)."""
        return list(self._ray.get([self._actors[a].pid.remote() for a in self._alive]))

    def map(self, task: Task, items: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        ray = self._ray
        queue = deque(items)
        inflight: dict[Any, tuple[int, str, Any]] = {}
        while queue or inflight:
            for actor in list(self._alive):
                while queue and sum(1 for a, _, _ in inflight.values() if a == actor) < QUEUED_PER_ACTOR:
                    job_id, payload = queue.popleft()
                    inflight[self._actors[actor].run.remote(task, payload)] = (actor, job_id, payload)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, job_id, payload = inflight.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                self._lost(actor, exc)
                queue.appendleft((job_id, payload))
                continue
            yield job_id, record

    def _lost(self, actor: int, exc: BaseException) -> None:
        """An actor past its restarts: its jobs go to the others; none left is an error."""
        if actor in self._alive:
            self._alive.remove(actor)
        if not self._alive:
            raise BackendError(f"every Ray actor died (last: {exc}); rerun with --resume") from exc

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._alive = [], []
        if self._owns:
            self._ray.shutdown()


__all__ = ["MAX_RETRIES", "JobActor", "RayBackend", "import_ray"]
