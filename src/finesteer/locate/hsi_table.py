"""The HSI sweep table: per-head single-head steering results, their ranking and their file.

`HsiSweep` is what `finesteer.locate.hsi.sweep_heads` returns: a layer × head × α table of A/B
letter probabilities with the unsteered baseline. Its best-over-α gain is a `HeadScores` ranking;
by default the gain is letter-balanced (see `finesteer.locate.selection`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from finesteer.activations.diagnostics import DirectionDiagnostics
from finesteer.errors import FinesteerError
from finesteer.locate.scores import HeadScores
from finesteer.locate.selection import worst_letter_gain

RankBy = Literal["balanced", "max", "mean", "polarity"]
RANK_BY: tuple[str, ...] = ("balanced", "max", "mean", "polarity")


class SweepError(FinesteerError, ValueError):
    """A sweep that cannot run (empty α grid, mixed-sign α, unknown head) or a mismatched checkpoint."""


def check_alphas(alphas: Iterable[float]) -> tuple[float, ...]:
    """A non-empty grid of finite, non-zero α of one sign (the sign says toward / away from the behaviour)."""
    values = tuple(float(a) for a in alphas)
    if not values:
        raise SweepError("empty α grid")
    if any(not math.isfinite(a) for a in values):
        raise SweepError(f"α grid has a non-finite value: {values}")
    if any(a == 0 for a in values):
        raise SweepError("α = 0 is the baseline, which is always measured; leave it out of the grid")
    if len({a > 0 for a in values}) != 1:
        raise SweepError(f"α grid mixes signs {values}: sweep toward (α > 0) and away (α < 0) separately")
    if len(set(values)) != len(values):
        raise SweepError(f"α grid has duplicates: {values}")
    return values


def _sign(alphas: Sequence[float]) -> float:
    return 1.0 if alphas[0] > 0 else -1.0


@dataclass
class HsiSweep:
    """Per-head single-head steering results.

    `p_matching` and `matching_rate` are [n_layers, n_heads, n_alphas] (NaN for heads not swept),
    `per_item` is [n_layers, n_heads, n_alphas, n_items] p_matching; `baseline_p_matching` is the
    unsteered model's per-item value; `matching_letters` the items' matching letters (for the
    letter-balanced ranking, see `finesteer.locate.selection`); `groups` the items' letter × polarity
    groups (`polarity_groups`, for the "polarity" ranking: the worst group's gain).
    """

    alphas: tuple[float, ...]
    p_matching: Tensor
    matching_rate: Tensor
    per_item: Tensor
    baseline_p_matching: Tensor
    item_ids: list[str]
    matching_letters: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    groups: list[str] | None = None

    @property
    def baseline_mean(self) -> float:
        return float(self.baseline_p_matching.mean())

    @property
    def baseline_rate(self) -> float:
        return float(self.meta.get("baseline_matching_rate", float("nan")))

    @property
    def swept(self) -> Tensor:
        """[n_layers, n_heads] bool: which heads were measured."""
        return ~torch.isnan(self.p_matching).any(dim=-1)

    def gain_per_alpha(self, rank_by: RankBy = "balanced") -> Tensor:
        """[n_layers, n_heads, n_alphas] change of p_matching in the grid's direction (NaN if unswept).

        Positive = the head moved the answers the way the α sign asks (toward the behaviour for α > 0,
        away from it for α < 0).

        'balanced': the worst letter group's change of mean p_matching (a head must help items of
        every matching letter, so a mere letter-preference shift scores ≤ 0); 'polarity': the worst
        letter × polarity (Yes / not Yes) group's change, so a mere "Yes" bias scores ≤ 0 too;
        'max' / 'mean': the change of the plain mean over all items.
        """
        sign = _sign(self.alphas)
        if rank_by == "polarity":
            if self.groups is None:
                raise SweepError("this sweep has no polarity groups; rank it by 'balanced'")
            return worst_letter_gain(sign * self.per_item, sign * self.baseline_p_matching, self.groups)
        if rank_by == "balanced":
            return worst_letter_gain(
                sign * self.per_item, sign * self.baseline_p_matching, self.matching_letters
            )
        if rank_by in ("max", "mean"):
            return sign * (self.p_matching - self.baseline_mean)
        raise SweepError(f"unknown rank_by {rank_by!r}: use one of {', '.join(RANK_BY)}")

    def gain(self, rank_by: RankBy = "balanced") -> Tensor:
        """[n_layers, n_heads] ranking score: best α's gain ('balanced', 'max') or the grid mean ('mean')."""
        per_alpha = self.gain_per_alpha(rank_by)
        return per_alpha.mean(dim=-1) if rank_by == "mean" else per_alpha.max(dim=-1).values

    def ranked_heads(self, rank_by: RankBy = "balanced") -> list[tuple[int, int, float]]:
        """Swept heads, best first (ties in (layer, head) order)."""
        gain = self.gain(rank_by)
        n_heads = gain.shape[1]
        flat = gain.flatten().tolist()
        order = sorted((i for i, v in enumerate(flat) if not math.isnan(v)), key=lambda i: (-flat[i], i))
        return [(i // n_heads, i % n_heads, flat[i]) for i in order]

    def head_scores(self, rank_by: RankBy = "balanced", **provenance: Any) -> HeadScores:
        """The gain as a `HeadScores` table; unswept heads get the lowest swept score (listed in extra)."""
        gain = self.gain(rank_by)
        swept = self.swept
        if not bool(swept.any()):
            raise SweepError("no head was swept")
        floor = float(gain[swept].min())
        table = torch.where(swept, gain, torch.full_like(gain, floor))
        extra = {
            "alphas": list(self.alphas),
            "rank_by": rank_by,
            "baseline_p_matching": self.baseline_mean,
            "baseline_matching_rate": self.baseline_rate,
            "n_swept": int(swept.sum()),
            "unswept_heads": [[int(layer), int(h)] for layer, h in (~swept).nonzero().tolist()],
            **self.meta.get("extra", {}),
        }
        return HeadScores(
            scores=table,
            method="hsi",
            mode="steer_last",
            n_prompts=len(self.item_ids),
            extra=extra,
            **provenance,
        )

    def summary(
        self, top: int = 10, rank_by: RankBy = "balanced", diagnostics: DirectionDiagnostics | None = None
    ) -> dict[str, Any]:
        """JSON-able digest: baseline, best heads with their best α and values (and each head's
        direction diagnostics when given: consistency, d′, AUROC, `low` when below the thresholds)."""
        rows = []
        best_alpha = self.gain_per_alpha(rank_by).nan_to_num(float("-inf")).argmax(dim=-1)
        for layer, head, gain in self.ranked_heads(rank_by)[:top]:
            a = int(best_alpha[layer, head])
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "gain": gain,
                    "best_alpha": self.alphas[a],
                    "p_matching": float(self.p_matching[layer, head, a]),
                    "matching_rate": float(self.matching_rate[layer, head, a]),
                }
            )
            if diagnostics is not None:
                low = diagnostics.is_low(layer, head)
                rows[-1]["diagnostics"] = {**diagnostics.at(layer, head), "low": low}
        return {
            "alphas": list(self.alphas),
            "n_items": len(self.item_ids),
            "n_swept": int(self.swept.sum()),
            "rank_by": rank_by,
            "baseline_p_matching": self.baseline_mean,
            "baseline_matching_rate": self.baseline_rate,
            "top": rows,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "p_matching": self.p_matching.contiguous(),
            "matching_rate": self.matching_rate.contiguous(),
            "per_item": self.per_item.contiguous(),
            "baseline_p_matching": self.baseline_p_matching.contiguous(),
        }
        header = {
            "alphas": list(self.alphas),
            "item_ids": self.item_ids,
            "matching_letters": self.matching_letters,
            "meta": self.meta,
        }
        if self.groups is not None:
            header["groups"] = self.groups
        save_file(tensors, str(path), metadata={"finesteer_hsi_sweep": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> HsiSweep:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("finesteer_hsi_sweep")
            if raw is None:
                raise SweepError(f"{path} is not an HSI sweep file")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        header = json.loads(raw)
        return cls(
            tuple(header["alphas"]),
            tensors["p_matching"],
            tensors["matching_rate"],
            tensors["per_item"],
            tensors["baseline_p_matching"],
            header["item_ids"],
            header["matching_letters"],
            header.get("meta", {}),
            header.get("groups"),
        )
