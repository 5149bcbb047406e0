"""HSI head selection: the binary-choice sensitivity sweep and top-k + shared-α choice.

For every head (or a subset), steer that head alone by α·σ·v̂ at the last position for each α of a
grid and measure the behaviour-matching A/B letter probabilities. The result is a layer × head × α
table (`HsiSweep`); its best-over-α gain is a `HeadScores` ranking. By default the gain is
letter-balanced (the worst matching-letter group's gain), so heads that merely shift the model's
A/B letter preference do not rank. `select_heads` then steers the top heads together and picks how
many (≤ k) and one shared α on a validation split.

Sweeps are exact but cheap: every edit acts on the last prompt token only, so each prompt's prefix
KV cache is computed once and many (head, α) rows share it (`LastTokenScorer`). A run folder gets one
checkpoint per layer, and a rerun with the same configuration skips the finished layers.
"""

from __future__ import annotations

import hashlib
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
from tqdm.auto import tqdm

from finesteer.capture.directions import HeadDirections, directions_fingerprint
from finesteer.data.items import ABItem
from finesteer.errors import FinesteerError
from finesteer.interventions.edit import Intervention
from finesteer.locate.last_token import LastTokenScorer, prepare_targets
from finesteer.locate.scores import HeadScores, hash_prompts
from finesteer.locate.selection import Selection, select_prefix_and_alpha, worst_letter_gain
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head

SWEEP_DIR = "sweep"
BASELINE_FILE = "baseline.safetensors"
RankBy = Literal["balanced", "max", "mean"]
RANK_BY: tuple[str, ...] = ("balanced", "max", "mean")


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
    letter-balanced ranking, see `finesteer.locate.selection`).
    """

    alphas: tuple[float, ...]
    p_matching: Tensor
    matching_rate: Tensor
    per_item: Tensor
    baseline_p_matching: Tensor
    item_ids: list[str]
    matching_letters: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

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
        every matching letter, so a mere letter-preference shift scores ≤ 0); 'max' / 'mean': the
        change of the plain mean over all items.
        """
        sign = _sign(self.alphas)
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

    def summary(self, top: int = 10, rank_by: RankBy = "balanced") -> dict[str, Any]:
        """JSON-able digest: baseline, best heads with their best α and values."""
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
        )


def _config_key(
    lm: LoadedModel, items: Sequence[ABItem], directions: HeadDirections, alphas: Sequence[float], fmt: str
) -> str:
    """What a checkpoint must match to be reused: model, items, directions, α grid, prompt format."""
    payload = json.dumps(
        {
            "model": [lm.name, lm.fingerprint],
            "items": hash_prompts(f"{i.id}\x00{i.question}\x00{i.matching}" for i in items),
            "directions": directions_fingerprint(directions),
            "alphas": list(alphas),
            "format": fmt,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _heads_by_layer(
    directions: HeadDirections, heads: Iterable[Head] | None, n_layers: int, n_heads: int
) -> dict[int, list[int]]:
    if (directions.n_layers, directions.n_heads) != (n_layers, n_heads):
        raise SweepError(
            f"directions cover {directions.n_layers}×{directions.n_heads} heads; the model has "
            f"{n_layers}×{n_heads}"
        )
    if heads is None:
        has_direction = directions.directions.norm(dim=-1) > 0
        chosen = [(int(layer), int(h)) for layer, h in has_direction.nonzero().tolist()]
    else:
        chosen = sorted({(int(layer), int(h)) for layer, h in heads})
        for layer, head in chosen:
            directions.check_head(layer, head)
    if not chosen:
        raise SweepError("no heads to sweep")
    grouped: dict[int, list[int]] = {}
    for layer, head in chosen:
        grouped.setdefault(layer, []).append(head)
    return grouped


def _read_checkpoint(path: Path, key: str) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("config_key") != key:
            raise SweepError(
                f"checkpoint {path} was written by a sweep with another configuration (model, items, "
                "directions, α grid or prompt format); use a new run folder or delete it"
            )
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def sweep_heads(
    lm: LoadedModel,
    items: Sequence[ABItem],
    directions: HeadDirections,
    alphas: Sequence[float],
    *,
    heads: Iterable[Head] | None = None,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    max_rows: int = 128,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> HsiSweep:
    """Steer each head alone with each α and score the A/B items; resumable per layer in `run_dir`."""
    alphas = check_alphas(alphas)
    info = lm.info
    grouped = _heads_by_layer(directions, heads, info.n_layers, info.n_heads)
    targets = prepare_targets(lm.tokenizer, items, system=system, prefill=prefill)
    key = _config_key(lm, items, directions, alphas, json.dumps([system, prefill]))
    folder = Path(run_dir) / SWEEP_DIR if run_dir is not None else None
    shape = (info.n_layers, info.n_heads, len(alphas))
    p_matching = torch.full(shape, float("nan"))
    rate = torch.full(shape, float("nan"))
    per_item = torch.full((*shape, len(targets)), float("nan"))

    scorer: LastTokenScorer | None = None

    def get_scorer() -> LastTokenScorer:
        nonlocal scorer
        if scorer is None:
            scorer = LastTokenScorer(lm, targets, batch_size=batch_size, max_rows=max_rows)
        return scorer

    baseline_ckpt = _read_checkpoint(folder / BASELINE_FILE, key) if folder else None
    if baseline_ckpt is None:
        base = get_scorer().score([Intervention()])
        baseline_p, baseline_rate = base.p_matching[0], float(base.matching_rate[0])
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(
                {"p_matching": baseline_p.contiguous(), "matching_rate": torch.tensor([baseline_rate])},
                str(folder / BASELINE_FILE),
                metadata={"config_key": key},
            )
    else:
        baseline_p, baseline_rate = baseline_ckpt["p_matching"], float(baseline_ckpt["matching_rate"][0])

    resumed = []
    for layer in tqdm(sorted(grouped), desc="hsi sweep (layers)", disable=not progress, unit="layer"):
        layer_heads = grouped[layer]
        path = folder / f"layer_{layer:03d}.safetensors" if folder else None
        ckpt = _read_checkpoint(path, key) if path else None
        if ckpt is not None and ckpt["heads"].tolist() == layer_heads:
            resumed.append(layer)
            layer_p = ckpt["per_item"]
            layer_match = ckpt["matching"].bool()
        else:
            interventions = [directions.intervention([(layer, h)], a) for h in layer_heads for a in alphas]
            scores = get_scorer().score(interventions)
            layer_p = scores.p_matching.view(len(layer_heads), len(alphas), len(targets))
            layer_match = scores.matching.view(len(layer_heads), len(alphas), len(targets))
            if path is not None:
                save_file(
                    {
                        "heads": torch.tensor(layer_heads),
                        "per_item": layer_p.contiguous(),
                        "matching": layer_match.to(torch.uint8).contiguous(),
                    },
                    str(path),
                    metadata={"config_key": key},
                )
        index = torch.tensor(layer_heads)
        per_item[layer, index] = layer_p
        p_matching[layer, index] = layer_p.mean(-1)
        rate[layer, index] = layer_match.float().mean(-1)

    meta = {
        "config_key": key,
        "baseline_matching_rate": baseline_rate,
        "resumed_layers": resumed,
        "system": system,
        "prefill": prefill,
        "model_name": lm.name,
    }
    letters = [item.matching_letter for item in items]
    sweep = HsiSweep(alphas, p_matching, rate, per_item, baseline_p, [t.id for t in targets], letters, meta)
    if folder is not None:
        sweep.save(folder.parent / "sweep.safetensors")
    return sweep


def select_heads(
    lm: LoadedModel,
    sweep: HsiSweep,
    val_items: Sequence[ABItem],
    directions: HeadDirections,
    *,
    k: int = 4,
    alphas: Sequence[float] | None = None,
    rank_by: RankBy = "balanced",
    search_k: bool = True,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    max_rows: int = 128,
) -> Selection:
    """Steer the sweep's top heads together and choose how many (≤ k) and the shared α on `val_items`.

    `alphas` defaults to the sweep's grid; the criterion is the letter-balanced validation matching
    rate (`finesteer.locate.selection`). Without `search_k` exactly k heads are used.
    """
    if k < 1:
        raise SweepError(f"k must be ≥ 1, got {k}")
    grid = check_alphas(alphas if alphas is not None else sweep.alphas)
    ranked = sweep.ranked_heads(rank_by)
    if len(ranked) < k:
        raise SweepError(f"asked for k={k} heads but only {len(ranked)} were swept")
    return select_prefix_and_alpha(
        lm,
        [(layer, head) for layer, head, _ in ranked[:k]],
        directions,
        val_items,
        grid,
        k=k,
        search_k=search_k,
        system=system,
        prefill=prefill,
        batch_size=batch_size,
        max_rows=max_rows,
    )


def plot_sweep(
    sweep: HsiSweep, folder: str | Path, *, rank_by: RankBy = "balanced", top: int = 8
) -> list[Path]:
    """Heatmaps: the ranking gain, and mean p_matching at each α (one PNG each)."""
    from finesteer.report.heatmap import plot_head_heatmap

    folder = Path(folder)
    scores = sweep.head_scores(rank_by)
    model = sweep.meta.get("model_name", "")
    paths = [
        plot_head_heatmap(
            scores,
            folder / "hsi_gain.png",
            title=f"HSI {rank_by} gain in p(matching), best α · {model}",
            annotate_top=top,
            label="Δ p(matching)",
            cmap="RdBu_r",
        )
    ]
    swept = sweep.swept
    for i, alpha in enumerate(sweep.alphas):
        table = sweep.p_matching[..., i]
        table = torch.where(swept, table, torch.full_like(table, sweep.baseline_mean))
        paths.append(
            plot_head_heatmap(
                table,
                folder / f"hsi_p_matching_alpha_{alpha:g}.png",
                title=f"p(matching) steering one head, α={alpha:g} (baseline {sweep.baseline_mean:.3f})",
                annotate_top=0,
                label="p(matching)",
                cmap="RdBu_r",
            )
        )
    return paths
