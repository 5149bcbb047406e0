"""What to do to an activation: small typed operations, each a pure function of the activation.

Ops act on the selected slice (one head's [.., head_dim] or a whole site's [.., width]) and must
return a tensor of the same shape. Tensors inside ops are saved by the artifact format under keys
given by `tensors()`; everything else goes in `params()`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from finesteer.errors import FinesteerError


class OpError(FinesteerError, ValueError):
    """An operation built with bad values (NaN, zero direction, wrong vector size)."""


def _check_vector(name: str, vector: Tensor) -> Tensor:
    if not isinstance(vector, Tensor):
        vector = torch.as_tensor(vector, dtype=torch.float32)
    if vector.dim() != 1:
        raise OpError(f"{name}: vector must be 1-D, got shape {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise OpError(f"{name}: vector contains NaN or inf")
    return vector.detach()


def _check_scalar(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise OpError(f"{name}: {value} is not a finite number")
    return value


@dataclass(frozen=True, eq=False)
class Op:
    """Base of all operations; subclasses set `kind` and implement `__call__`."""

    kind: ClassVar[str] = ""

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def vector_width(self) -> int | None:
        """Length the op's vector needs to match at its site, or None when it has no vector."""
        return None

    def params(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def is_identity(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        """Value equality that compares tensors element-wise (dataclass eq would fail on tensors)."""
        if not isinstance(other, Op) or other.kind != self.kind or other.params() != self.params():
            return False
        mine, theirs = self.tensors(), other.tensors()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.params().items()))))


@dataclass(frozen=True, eq=False)
class Add(Op):
    """x + scale·vector: steering (HSI/ITI per head, CAA per layer). scale 0 is exactly a no-op."""

    kind: ClassVar[str] = "add"
    vector: Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", _check_vector("Add", self.vector))
        object.__setattr__(self, "scale", _check_scalar("Add scale", self.scale))

    def __call__(self, x: Tensor) -> Tensor:
        return x + self.scale * self.vector.to(device=x.device, dtype=x.dtype)

    def vector_width(self) -> int:
        return int(self.vector.shape[0])

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def tensors(self) -> dict[str, Tensor]:
        return {"vector": self.vector}

    def is_identity(self) -> bool:
        return self.scale == 0.0


@dataclass(frozen=True, eq=False)
class Scale(Op):
    """x·factor. At a head's query with factor ε: Ships' uniform attention; at its output: scaled
    contribution."""

    kind: ClassVar[str] = "scale"
    factor: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_scalar("Scale factor", self.factor))

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.factor

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def is_identity(self) -> bool:
        return self.factor == 1.0


@dataclass(frozen=True, eq=False)
class Zero(Op):
    """Zero ablation."""

    kind: ClassVar[str] = "zero"

    def __call__(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


@dataclass(frozen=True, eq=False)
class SetTo(Op):
    """Replace the activation by a fixed vector, e.g. its dataset mean (mean ablation)."""

    kind: ClassVar[str] = "set"
    vector: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", _check_vector("SetTo", self.vector))

    def __call__(self, x: Tensor) -> Tensor:
        return self.vector.to(device=x.device, dtype=x.dtype).expand_as(x).clone()

    def vector_width(self) -> int:
        return int(self.vector.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        return {"vector": self.vector}


@dataclass(frozen=True, eq=False)
class ProjectOut(Op):
    """x − strength·(x·d̂)d̂: remove a direction (strength 1 = full directional ablation)."""

    kind: ClassVar[str] = "project_out"
    direction: Tensor
    strength: float = 1.0
    _unit: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        direction = _check_vector("ProjectOut", self.direction)
        norm = direction.norm()
        if norm == 0:
            raise OpError("ProjectOut: direction has zero norm")
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "strength", _check_scalar("ProjectOut strength", self.strength))
        object.__setattr__(self, "_unit", direction / norm)

    def __call__(self, x: Tensor) -> Tensor:
        unit = self._unit.to(device=x.device, dtype=x.dtype)
        return x - self.strength * (x @ unit)[..., None] * unit

    def vector_width(self) -> int:
        return int(self.direction.shape[0])

    def params(self) -> dict[str, Any]:
        return {"strength": self.strength}

    def tensors(self) -> dict[str, Tensor]:
        return {"direction": self.direction}

    def is_identity(self) -> bool:
        return self.strength == 0.0


OP_KINDS: Mapping[str, type[Op]] = MappingProxyType(
    {cls.kind: cls for cls in (Add, Scale, Zero, SetTo, ProjectOut)}
)


def op_from_parts(kind: str, params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Op:
    """Rebuild an op from its serialised kind, parameters and tensors."""
    cls = OP_KINDS.get(kind)
    if cls is None:
        raise OpError(f"unknown operation '{kind}'; known: {', '.join(OP_KINDS)}")
    return cls(**params, **tensors)
