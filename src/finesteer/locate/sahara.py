"""Sahara (Zhou et al., ICLR 2025): greedily grow a group of heads whose joint ablation moves the
dataset-level safety subspace most.

Step s ablates the group found so far plus each remaining candidate head, scores each with the
dataset-level Ships principal-angle score against the unablated model, and keeps the best head.
Each step's scan is checkpointed in `checkpoint/step-<s>/` and finished steps are recorded in
`checkpoint/sahara.json`, so a killed search resumes at the step (and candidate) it stopped at.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from finesteer.interventions.edit import check_eps
from finesteer.locate.engine import EncodedPrompts, ScanError, as_encoded
from finesteer.locate.fast_scan import run_scan
from finesteer.locate.scan import LastHidden
from finesteer.locate.scores import HeadScores
from finesteer.locate.ships import (
    DEFAULT_EPS,
    ablation,
    all_heads,
    base_hidden,
    check_scan_settings,
    subspace_angle_score,
)
from finesteer.models.info import ModelInfo
from finesteer.models.loading import LoadedModel
from finesteer.runs import write_json_atomic
from finesteer.sites import Head, check_heads

STATE_FILE = "sahara.json"


@dataclass
class SaharaStep:
    """One greedy step: the head added, the group's score after adding it, and every candidate's score."""

    head: Head
    score: float
    candidate_scores: dict[Head, float]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": list(self.head),
            "score": self.score,
            "candidate_scores": {f"{lay}.{h}": s for (lay, h), s in self.candidate_scores.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SaharaStep:
        scores = {}
        for name, value in raw["candidate_scores"].items():
            layer, head = name.split(".")
            scores[(int(layer), int(head))] = float(value)
        return cls(tuple(raw["head"]), float(raw["score"]), scores, float(raw.get("seconds", 0.0)))  # type: ignore[arg-type]


@dataclass
class SaharaResult:
    """The head group in the order found, with per-step details and the run's settings."""

    group: list[Head]
    steps: list[SaharaStep]
    settings: dict[str, Any] = field(default_factory=dict)

    def step_scores(self, lm: LoadedModel, step: int = 0) -> HeadScores:
        """Step `step`'s candidate scores as a layer × head table (step 0 = dataset-level Ships)."""
        table = torch.zeros((lm.info.n_layers, lm.info.n_heads))
        for (layer, head), value in self.steps[step].candidate_scores.items():
            table[layer, head] = value
        return HeadScores(
            scores=table,
            method="sahara",
            mode=self.settings.get("mode"),
            eps=self.settings.get("eps"),
            model_name=lm.name,
            model_fingerprint=lm.fingerprint,
            prompts_hash=self.settings.get("prompts_hash", ""),
            n_prompts=int(self.settings.get("n_prompts", 0)),
            extra={"step": step, "group_before": [list(h) for h in self.group[:step]], **self.settings},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": [list(h) for h in self.group],
            "group_names": [f"{lay}.{h}" for lay, h in self.group],
            "scores": [s.score for s in self.steps],
            "settings": self.settings,
            "steps": [s.to_dict() for s in self.steps],
        }


def _load_state(path: Path, settings: dict[str, Any]) -> list[SaharaStep]:
    if not path.is_file():
        return []
    raw = json.loads(path.read_text())
    diff = sorted(k for k in settings if raw.get("settings", {}).get(k) != settings[k])
    if diff:
        raise ScanError(
            f"{path} is from a different Sahara run (differs in {', '.join(diff)}); use another folder"
        )
    return [SaharaStep.from_dict(s) for s in raw.get("steps", [])]


def _save_state(path: Path, result: SaharaResult) -> None:
    write_json_atomic(path, result.to_dict(), indent=1)


def check_sahara_settings(
    info: ModelInfo | None,
    *,
    group_size: int,
    candidates: Sequence[Head] | None = None,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    template: str = "chat",
    batch_size: int = 8,
    r_main: int = 1,
) -> list[Head]:
    """The candidate heads, after checking every setting that needs only the model's shape (so a
    command can call it with `peek_model_info` before loading): group size within 1..candidates,
    heads in range, a known ablation mode and a finite ε ≥ 0."""
    check_scan_settings(mode=mode, eps=eps, template=template, batch_size=batch_size, r_main=r_main)
    if info is None:  # shape unknown before loading: what can be checked without it
        pool = list(candidates or [])
        limit = len(pool) if candidates is not None else group_size
    else:
        pool = (
            check_heads(candidates, info.n_layers, info.n_heads)
            if candidates is not None
            else all_heads(info)
        )
        limit = len(pool)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= limit:
        raise ScanError(f"group_size must be in 1..{limit} (candidate heads), got {group_size!r}")
    return pool


def sahara(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    *,
    group_size: int = 3,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    r_main: int = 1,
    candidates: Sequence[Head] | None = None,
    batch_size: int = 8,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 8,
    progress: bool = True,
    on_candidate: Callable[[int], None] | None = None,
    engine: str = "fast",
) -> SaharaResult:
    """Greedy head group of `group_size` heads (default: search over every head of the model).

    `candidates` restricts the search (e.g. to the top-N dataset-level Ships heads, which makes each
    step N forwards instead of all heads). Ties go to the first head in (layer, head) order.
    `engine` picks the scan engine ('fast' or 'simple', `finesteer.locate.fast_scan.run_scan`).
    """
    encoded = as_encoded(lm, prompts)
    pool = check_sahara_settings(lm.info, group_size=group_size, candidates=candidates, mode=mode, eps=eps)
    if r_main > len(encoded):
        raise ScanError(f"r_main={r_main} needs at least {r_main} prompts, got {len(encoded)}")
    settings = {
        "mode": mode,
        "eps": check_eps(eps),
        "r_main": r_main,
        "group_size": group_size,
        "prompts_hash": encoded.texts_hash,
        "n_prompts": len(encoded),
        "model_fingerprint": lm.fingerprint,
        "candidates": [f"{lay}.{h}" for lay, h in pool],
    }
    folder = Path(checkpoint) if checkpoint else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    steps = _load_state(folder / STATE_FILE, settings) if folder else []
    steps = steps[:group_size]
    base = base_hidden(lm, encoded, batch_size=batch_size)
    result = SaharaResult([s.head for s in steps], steps, settings)
    while len(result.group) < group_size:
        step = len(result.group)
        started = time.perf_counter()
        remaining = [h for h in pool if h not in result.group]
        hidden = run_scan(
            lm,
            encoded,
            [ablation([*result.group, h], mode, eps) for h in remaining],
            LastHidden(),
            engine=engine,
            batch_size=batch_size,
            checkpoint=folder / f"step-{step + 1}" if folder else None,
            checkpoint_every=checkpoint_every,
            progress=progress,
            desc=f"sahara step {step + 1}/{group_size}",
            on_candidate=on_candidate,
        )
        scores = _scores(base, hidden, r_main)
        best = max(range(len(remaining)), key=lambda i: (scores[i], -i))
        result.steps.append(
            SaharaStep(
                remaining[best],
                scores[best],
                dict(zip(remaining, scores, strict=True)),
                round(time.perf_counter() - started, 3),
            )
        )
        result.group.append(remaining[best])
        if folder:
            _save_state(folder / STATE_FILE, result)
    return result


def _scores(base: Tensor, hidden: Tensor, r_main: int) -> list[float]:
    return [subspace_angle_score(base, m, r_main) for m in hidden]
