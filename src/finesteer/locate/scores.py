"""`HeadScores`: one layer × head table of importance scores plus where it came from.

Every locate method (Ships, Sahara, HSI, ITI, …) produces this one type, so rankings can be compared
across methods and models (`jaccard_top_k`), saved next to a run (`scores.safetensors` +
`heads.json`), plotted (`finesteer.report.heatmap`) and turned into interventions. Higher score
means more important, for every method. Scores must be finite: a NaN is a bug upstream, not a value
to rank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from finesteer.errors import FinesteerError

FORMAT = "finesteer.head_scores"
FORMAT_VERSION = 1
SCORES_FILE = "scores.safetensors"
HEADS_FILE = "heads.json"


class HeadScoresError(FinesteerError, ValueError):
    """A score table with a bad shape or values, or a folder that does not hold one."""


def hash_prompts(prompts: Iterable[str]) -> str:
    """Stable sha256 of an ordered prompt list, recorded so a table says which data it was scored on."""
    digest = hashlib.sha256()
    for text in prompts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _check_table(name: str, table: Tensor, dims: int) -> Tensor:
    if not isinstance(table, Tensor):
        table = torch.as_tensor(table)
    if table.dim() != dims:
        raise HeadScoresError(f"{name} must be {dims}-D, got shape {tuple(table.shape)}")
    if table.numel() == 0:
        raise HeadScoresError(f"{name} is empty (shape {tuple(table.shape)})")
    if not table.is_floating_point():
        table = table.float()
    bad = ~torch.isfinite(table)
    if bool(bad.any()):
        where = [tuple(int(i) for i in idx) for idx in bad.nonzero()[:5]]
        raise HeadScoresError(f"{name} has {int(bad.sum())} NaN/inf entries, e.g. at {where}")
    return table.detach().cpu()


@dataclass
class HeadScores:
    """A [n_layers, n_heads] score table (higher = more important) and its provenance.

    `per_prompt` optionally keeps the [n_prompts, n_layers, n_heads] scores behind a mean (query-level
    Ships). `mode`/`eps` describe the ablation where the method has one; `extra` holds any other
    JSON-able detail (r_main, dataset name, timing, …).
    """

    scores: Tensor
    method: str
    mode: str | None = None
    eps: float | None = None
    model_name: str = ""
    model_fingerprint: str = ""
    prompts_hash: str = ""
    n_prompts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    per_prompt: Tensor | None = None

    def __post_init__(self) -> None:
        self.scores = _check_table("scores", self.scores, 2)
        if not self.method:
            raise HeadScoresError("HeadScores needs a method name (e.g. 'ships', 'sahara', 'hsi')")
        if self.per_prompt is not None:
            self.per_prompt = _check_table("per_prompt", self.per_prompt, 3)
            if tuple(self.per_prompt.shape[1:]) != self.shape:
                raise HeadScoresError(
                    f"per_prompt has layer × head shape {tuple(self.per_prompt.shape[1:])}, "
                    f"scores has {self.shape}"
                )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.scores.shape[0]), int(self.scores.shape[1]))

    @property
    def n_layers(self) -> int:
        return self.shape[0]

    @property
    def n_heads(self) -> int:
        return self.shape[1]

    def __getitem__(self, head: tuple[int, int]) -> float:
        layer, index = head
        self._check_head(layer, index)
        return float(self.scores[layer, index])

    def _check_head(self, layer: int, index: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= index < self.n_heads):
            raise HeadScoresError(
                f"head {layer}.{index} is outside this table ({self.n_layers} layers × {self.n_heads} heads)"
            )

    def ranked(self) -> list[tuple[int, int, float]]:
        """All heads, best first; ties keep (layer, head) order so rankings are reproducible."""
        flat = self.scores.flatten().tolist()
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
        return [(i // self.n_heads, i % self.n_heads, flat[i]) for i in order]

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The k highest-scoring heads as (layer, head, score)."""
        if k < 1:
            raise HeadScoresError(f"top(k) needs k ≥ 1, got {k}")
        return self.ranked()[:k]

    def top_heads(self, k: int = 10) -> list[tuple[int, int]]:
        """The k best heads as (layer, head) pairs, ready for `ablate_heads`."""
        return [(layer, head) for layer, head, _ in self.top(k)]

    def metadata(self) -> dict[str, Any]:
        """Everything except the tensors, JSON-able."""
        return {
            "method": self.method,
            "mode": self.mode,
            "eps": self.eps,
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "prompts_hash": self.prompts_hash,
            "n_prompts": self.n_prompts,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "extra": self.extra,
        }

    def save(self, folder: str | Path) -> Path:
        """Write `scores.safetensors` (tensors + metadata) and `heads.json` (every head, ranked)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        tensors = {"scores": self.scores.contiguous()}
        if self.per_prompt is not None:
            tensors["per_prompt"] = self.per_prompt.contiguous()
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        save_file(tensors, str(folder / SCORES_FILE), metadata={"finesteer": json.dumps(header)})
        heads = [
            {"rank": rank, "layer": layer, "head": head, "name": f"{layer}.{head}", "score": score}
            for rank, (layer, head, score) in enumerate(self.ranked(), start=1)
        ]
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "heads": heads}
        (folder / HEADS_FILE).write_text(json.dumps(payload, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> HeadScores:
        """Read a folder written by `save` (or the path of its `scores.safetensors`)."""
        path = Path(folder)
        if path.is_dir():
            path = path / SCORES_FILE
        if not path.is_file():
            raise HeadScoresError(f"no {SCORES_FILE} in {path.parent}: not a finesteer scores folder")
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("finesteer", "{}"))
            if header.get("format") != FORMAT:
                raise HeadScoresError(f"{path} is not a finesteer head-score file")
            if int(header.get("format_version", 0)) > FORMAT_VERSION:
                raise HeadScoresError(f"{path}: format version {header['format_version']} is too new")
            keys = set(handle.keys())
            scores = handle.get_tensor("scores")
            per_prompt = handle.get_tensor("per_prompt") if "per_prompt" in keys else None
        return cls(
            scores=scores,
            method=header["method"],
            mode=header.get("mode"),
            eps=header.get("eps"),
            model_name=header.get("model_name", ""),
            model_fingerprint=header.get("model_fingerprint", ""),
            prompts_hash=header.get("prompts_hash", ""),
            n_prompts=int(header.get("n_prompts", 0)),
            extra=header.get("extra", {}),
            per_prompt=per_prompt,
        )


def jaccard_top_k(a: HeadScores, b: HeadScores, k: int = 10) -> float:
    """|top_k(a) ∩ top_k(b)| / |top_k(a) ∪ top_k(b)|: how much two rankings agree on the best heads.

    Both tables must have the same layer × head shape (two methods on one model, or two checkpoints
    of one architecture); comparing different architectures by index would be meaningless.
    """
    if a.shape != b.shape:
        raise HeadScoresError(f"cannot compare head tables of shapes {a.shape} and {b.shape}")
    if not 1 <= k <= a.n_layers * a.n_heads:
        raise HeadScoresError(f"k must be in 1..{a.n_layers * a.n_heads}, got {k}")
    first, second = set(a.top_heads(k)), set(b.top_heads(k))
    return len(first & second) / len(first | second)
