"""Every error class finesteer defines derives from `FinesteerError` (and keeps its old base)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import finesteer
from finesteer.errors import FinesteerError

# Not user-facing errors: a test hook that simulates a kill, and a private control-flow signal.
NOT_ERRORS = {"StepInterrupted", "_StopForward"}


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(finesteer.__path__, "finesteer."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found.append(value)
    return found


def test_every_error_is_a_finesteer_error():
    classes = _exception_classes()
    assert len(classes) >= 37
    missing = [
        c.__qualname__
        for c in classes
        if c.__name__ not in NOT_ERRORS and not issubclass(c, FinesteerError)
    ]
    assert missing == []


def test_old_bases_are_kept():
    from finesteer.data.errors import DatasetError
    from finesteer.evaluate.judges import JudgeRequestError
    from finesteer.sites import SiteError

    assert issubclass(DatasetError, ValueError)
    assert issubclass(SiteError, ValueError)
    assert issubclass(JudgeRequestError, RuntimeError)


def test_check_heads_is_the_one_head_validator():
    import pytest

    from finesteer.interventions import InterventionError, check_eps
    from finesteer.sites import HeadError, check_heads

    assert check_heads([(1, 2), ("0", 3.0)], 2, 4) == [(1, 2), (0, 3)]  # type: ignore[list-item]
    assert check_heads([], 2, 4) == []
    with pytest.raises(HeadError, match=r"unknown head 2\.0: out of range; .*layer 0\.\.1, head 0\.\.3"):
        check_heads([(2, 0)], 2, 4)
    with pytest.raises(HeadError, match=r"duplicate head 1\.1 in \['1\.1', '0\.0', '1\.1'\]"):
        check_heads([(1, 1), (0, 0), (1, 1)], 2, 4)
    assert check_eps(0) == 0.0
    with pytest.raises(InterventionError, match="finite number"):
        check_eps(float("nan"))
