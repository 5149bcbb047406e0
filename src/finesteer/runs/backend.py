"""Where a plan's jobs run: in this process (`LocalBackend`) or on Ray actors (`RayBackend`).

A plan is a deterministic list of jobs, each an id and a picklable payload, plus ONE task function
`task(worker, payload) -> record` that both backends call the same way. A worker holds the state
every job needs (a loaded model) and a `memo` for values it may reuse across its jobs (e.g. the
unablated logits of a prompt batch). The state comes from a picklable `setup()` (e.g.
`functools.partial(load_model, name, device=…, dtype=…)`), so a Ray actor loads the model itself,
once. This stage knows nothing of models or scans: the task and setup are passed in by the stages
that own them (locate, fit, evaluate), and `finesteer.runs.runner.run_jobs` stores each record
under its job id as it arrives, so a resume skips finished jobs whichever backend ran them.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from finesteer.errors import FinesteerError, check_count

BACKENDS: tuple[str, ...] = ("local", "ray")


class BackendError(FinesteerError, ValueError):
    """A backend that cannot run: unknown name, bad actor counts, Ray missing, workers lost."""


@dataclass
class Worker:
    """What one worker keeps between jobs: its state (a loaded model) and a memo of reusable values."""

    state: Any
    memo: dict[str, Any] = field(default_factory=dict)


Task = Callable[[Worker, Any], Any]
"""`task(worker, payload) -> record`: one job; a module-level function, so Ray can pickle it."""


class Backend(Protocol):
    def map(self, task: Task, items: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Run `task` on every (id, payload); yield (id, record) as each job finishes."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendOptions:
    """How to run a plan: `local` (in process) or `ray` (model-holding actors; see `RayBackend`).

    `threads`: torch threads per actor (default: `num_cpus`, so actors never oversubscribe cores).
    """

    backend: str = "local"
    ray_address: str | None = None
    actors: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BackendError(f"--backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        check_count(self.actors, "actors")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise BackendError(
                f"--num-cpus must be > 0 and --num-gpus ≥ 0, got {self.num_cpus}, {self.num_gpus}"
            )
        if self.threads is not None:
            check_count(self.threads, "threads")

    @property
    def actor_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, int(self.num_cpus))


class LocalBackend:
    """Jobs one after another in this process, on `state` (or on `setup()`, called at the first job)."""

    def __init__(self, state: Any = None, setup: Callable[[], Any] | None = None) -> None:
        if state is None and setup is None:
            raise BackendError("a local backend needs the worker state or a setup function")
        self._worker = Worker(state) if state is not None else None
        self._setup = setup

    def map(self, task: Task, items: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        for job_id, payload in items:
            if self._worker is None:
                assert self._setup is not None
                self._worker = Worker(self._setup())
            yield job_id, task(self._worker, payload)

    def close(self) -> None:
        self._worker = None


def tensor_record(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as a JSON-able record field (dtype, shape, base64 bytes): exact, so a table rebuilt
    from stored records is byte-identical to one rebuilt from records just computed."""
    flat = tensor.detach().cpu().contiguous()
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"dtype": str(flat.dtype).removeprefix("torch."), "shape": list(flat.shape),
            "data": base64.b64encode(data).decode("ascii")}  # fmt: skip


def record_tensor(field_: Mapping[str, Any]) -> torch.Tensor:
    """The tensor a `tensor_record` field holds."""
    dtype = getattr(torch, field_["dtype"])
    raw = bytearray(base64.b64decode(field_["data"]))
    if not raw:
        return torch.empty(field_["shape"], dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(field_["shape"]).clone()


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendOptions",
    "LocalBackend",
    "Task",
    "Worker",
    "record_tensor",
    "tensor_record",
]
