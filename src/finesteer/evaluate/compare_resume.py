"""When a comparison may reuse a finished method's result: the same items, settings, judge and setup.

A stored `methods/<name>.json` carries the keys it was made with; `resume_problems` names what
differs, and the comparison refuses such a resume, so it never mixes two experiments.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def resume_problems(
    saved: Mapping[str, Any],
    shared_key: Mapping[str, Any],
    pending_key: Mapping[str, Any] | None,
    setup_key: Any | None,
) -> list[str]:
    """What differs between a finished method's stored keys and this run's: items and settings
    (`shared_key`), the method settings (`pending_key`) and the built setup (`setup_key`, for a
    steering given ready-made). Empty when the result may be reused."""
    old_shared = saved.get("shared_key", {})
    problems = [k for k in shared_key if not same_json(old_shared.get(k), shared_key[k])]
    if pending_key is not None and not same_json(saved.get("pending_key"), pending_key):
        problems.append("method settings")
    if setup_key is not None and saved.get("setup_key") != setup_key:
        problems.append("setup (weights, intervention or system prompt)")
    return problems


__all__ = ["digest", "resume_problems", "same_json"]
