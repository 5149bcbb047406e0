"""Which edit a request asks for: `model: "MODEL:a+b"` or the `intervention` / `scale` fields.

A request names zero or more registered interventions, each with an optional scale; they are
composed in the given order (`Intervention.__add__`). No name means the unmodified model. Scales
multiply additive edits (steering strengths) and must be finite and within the operator's bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finesteer.interventions.edit import Intervention
from finesteer.interventions.ops import Add
from finesteer.serve.errors import ServeError
from finesteer.serve.registry import InterventionRegistry


@dataclass(frozen=True)
class Resolved:
    """A request's composed intervention (None = unmodified) and the system prompt it brings."""

    intervention: Intervention | None
    system_prompt: str | None
    names: tuple[str, ...]


def split_model(model: str, served: str) -> list[str]:
    """Intervention names carried by the model field: `served` → [], `served:a+b` → [a, b]."""
    if model == served:
        return []
    if not model.startswith(served + ":"):
        raise ServeError(
            f"model '{model}' is not served here (this server runs '{served}')",
            404,
            code="model_not_found",
            param="model",
        )
    names = [n.strip() for n in model[len(served) + 1 :].split("+")]
    if any(not n for n in names):
        raise ServeError(
            f"bad model name '{model}': write MODEL or MODEL:name[+name…]",
            400,
            code="invalid_model",
            param="model",
        )
    return names


def check_scale(value: Any, max_scale: float, param: str = "scale") -> float:
    """A finite number with |value| ≤ max_scale (NaN and inf are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServeError(f"{param} must be a number, got {value!r}", 400, code="invalid_scale", param=param)
    value = float(value)
    if not math.isfinite(value) or abs(value) > max_scale:
        raise ServeError(
            f"{param} must be a finite number with |{param}| ≤ {max_scale:g}, got {value}",
            400,
            code="invalid_scale",
            param=param,
        )
    return value


def _items(field: Any, default_scale: float) -> list[tuple[str, float]]:
    """Normalise the `intervention` field: "a" | ["a", {"name": "b", "scale": 2}]."""
    if field is None:
        return []
    if isinstance(field, str):
        return [(field, default_scale)]
    if not isinstance(field, list):
        raise ServeError(
            "intervention must be a name or a list of names / {name, scale}",
            400,
            code="invalid_intervention",
            param="intervention",
        )
    items = []
    for item in field:
        if isinstance(item, str):
            items.append((item, default_scale))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            items.append((item["name"], item.get("scale", default_scale)))
        else:
            raise ServeError(
                f'bad intervention item {item!r}: use a name or {{"name": …, "scale": …}}',
                400,
                code="invalid_intervention",
                param="intervention",
            )
    return items


def resolve(
    registry: InterventionRegistry,
    *,
    model: str,
    served: str,
    field: Any = None,
    scale: Any = None,
    max_scale: float = 100.0,
) -> Resolved:
    """The composed intervention of one request; raises ServeError (4xx) for anything wrong."""
    default_scale = 1.0 if scale is None else check_scale(scale, max_scale)
    from_model = split_model(model, served)
    if from_model and field is not None:
        raise ServeError(
            "name the intervention either in the model or in the intervention field, not both",
            400,
            code="invalid_intervention",
            param="intervention",
        )
    items = [(n, default_scale) for n in from_model] if from_model else _items(field, default_scale)
    total: Intervention | None = None
    system_prompt: str | None = None
    for name, item_scale in items:
        entry = registry.get(name)
        factor = check_scale(item_scale, max_scale)
        if entry.intervention is None:
            if factor != 1.0:
                raise ServeError(
                    f"'{name}' is a prompt-only steering: it takes no scale",
                    400,
                    code="invalid_scale",
                    param="scale",
                )
            system_prompt = system_prompt or entry.system_prompt
            continue
        iv = entry.intervention
        if factor != 1.0:
            if not any(isinstance(e.op, Add) for e in iv.edits):
                raise ServeError(
                    f"'{name}' has no additive (steering) edit for a scale to multiply",
                    400,
                    code="invalid_scale",
                    param="scale",
                )
            iv = iv.scaled(factor)
        total = iv if total is None else total + iv
        system_prompt = system_prompt or entry.system_prompt
    return Resolved(total, system_prompt, tuple(name for name, _ in items))
