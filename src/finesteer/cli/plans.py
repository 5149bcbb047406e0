"""The backend options of the commands that run plans (`--backend/--ray-address/--actors/--num-cpus/
--num-gpus`): checked before any model loads, and a backend opened and closed around the run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from finesteer.models import load_model
from finesteer.runs.backend import BackendOptions
from finesteer.runs.ray_backend import import_ray
from finesteer.runs.runner import make_backend


def backend_options(
    backend: str, ray_address: str | None, actors: int, num_cpus: float, num_gpus: float
) -> BackendOptions:
    """The options as `BackendOptions`; with `--backend ray`, Ray must be importable (else a one-line
    'install finesteer[ray]' error), all before the model loads."""
    options = BackendOptions(backend, ray_address, actors, num_cpus, num_gpus)
    if options.backend == "ray":
        import_ray()
    return options


@contextmanager
def open_backend(options: BackendOptions, model: str, lm: Any, **load: Any) -> Iterator[Any]:
    """The backend for `model`: local runs on `lm` (already loaded); Ray actors load `model` themselves
    (with the same `load` keywords, e.g. device and dtype). Closed (actors killed) at the end."""
    runner = make_backend(options, setup=partial(load_model, model, **load), state=lm)
    try:
        yield runner
    finally:
        runner.close()
