"""The one method interface: a `Method` fits a `Steering` from a model, data and typed settings.

Every method declares `name`, a frozen `Settings` dataclass (subclass of `MethodSettings`, whose
construction rejects unknown keys, naming them and the allowed ones) and
`fit(lm, data, settings, run_dir=None) -> Steering`. Fitting is pure: a method writes files only
into `run_dir`, and only when one is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from finesteer.methods.errors import MethodError

if TYPE_CHECKING:
    from finesteer.fit.steering import Steering
    from finesteer.methods.data import BehaviourData, ContrastData
    from finesteer.models.loading import LoadedModel


S = TypeVar("S", bound="MethodSettings")


@dataclass(frozen=True)
class MethodSettings:
    """Base of every method's settings: frozen, unknown keys rejected when constructed.

    Lists given for tuple settings (e.g. from JSON) are stored as tuples, so settings stay hashable.
    """

    method: ClassVar[str] = "method"

    def __new__(cls, *args: Any, **kwargs: Any) -> MethodSettings:
        allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            accepted = ", ".join(allowed) if allowed else "no settings"
            raise MethodError(f"{cls.method} does not take setting(s) {unknown}; it accepts {accepted}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    @classmethod
    def parse(cls: type[S], settings: Mapping[str, Any] | S | None) -> S:
        """Settings from a mapping (e.g. `--settings` JSON), or the instance itself."""
        if isinstance(settings, cls):
            return settings
        if settings is None:
            return cls()
        if isinstance(settings, MethodSettings):
            raise MethodError(f"{cls.method} takes {cls.__name__}, got {type(settings).__name__}")
        return cls(**dict(settings))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Method(Protocol):
    """A steering method: `fit` returns a `Steering` bound to the model it runs on."""

    name: ClassVar[str]
    description: ClassVar[str]
    Settings: ClassVar[type[MethodSettings]]

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: Any,
        run_dir: Path | None = None,
    ) -> Steering: ...


__all__ = ["Method", "MethodSettings"]
