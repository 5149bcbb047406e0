"""Ships (Zhou et al., ICLR 2025): how much ablating one head changes a safety-relevant output.

Two levels, both over every head with a single-head ablation (`ua` = uniform attention: the head's
query × ε, so its attention is uniform over the causal prefix; `sc` = scale contribution: the head's
output × ε):

- query level: KL(p_base ‖ p_ablated) of the next-token distribution at the last prompt position,
  per prompt, then averaged over prompts;
- dataset level: stack the final-norm last-token hidden states of all prompts into M (N × d) and
  score the sum of the first `r_main` principal angles (degrees) between the top left singular
  subspaces of M_base and M_ablated (the authors' code uses r_main = 1).

Prompts are formatted with the model's chat template by default; `template="ships"` /
`"sahara"` reproduces the authors' raw `## Query: …\\n## Answer:` inputs (BOS added as their
tokenizer call did, no system prompt).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from finesteer.data.prompts import SAHARA_TEMPLATE, SHIPS_TEMPLATE, chat_prompt, raw_prompt
from finesteer.errors import check_count
from finesteer.interventions.edit import AblationMethod, Intervention, ablate_heads, check_eps
from finesteer.locate.engine import EncodedPrompts, Readout, ScanError, as_encoded
from finesteer.locate.fast_scan import run_scan
from finesteer.locate.scan import KLAndHidden, KLFromBase, LastHidden, LastLogits, scan
from finesteer.locate.scores import HeadScores
from finesteer.models.info import ModelInfo
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head

ABLATION_MODES: MappingProxyType[str, AblationMethod] = MappingProxyType(
    {"ua": "uniform_attention", "sc": "scale_output"}
)
TEMPLATES = MappingProxyType({"ships": SHIPS_TEMPLATE, "sahara": SAHARA_TEMPLATE})
DEFAULT_EPS = 1e-5


def ablation_method(mode: str) -> AblationMethod:
    """Map a Ships mode name ('ua' / 'sc') to the intervention ablation method."""
    if mode not in ABLATION_MODES:
        raise ScanError(
            f"unknown Ships mode '{mode}'; choose 'ua' (uniform attention) or 'sc' (scale output)"
        )
    return ABLATION_MODES[mode]


def all_heads(info: ModelInfo) -> list[Head]:
    return [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]


def ablation(heads: Sequence[Head], mode: str, eps: float = DEFAULT_EPS) -> Intervention:
    """The Ships ablation of a head group, at every position (as in the authors' forked forward)."""
    return ablate_heads(heads, ablation_method(mode), eps=check_eps(eps))


def check_template(template: str) -> str:
    """The prompt format of `template` ('chat', 'ships', 'sahara' or a string with a `{query}` field);
    ScanError otherwise. Needs no model, so commands call it before loading one."""
    fmt = TEMPLATES.get(template, template)
    if template != "chat" and "{query}" not in fmt:
        raise ScanError(
            f"template must be 'chat', 'ships', 'sahara' or contain '{{query}}', got {template!r}"
        )
    return fmt


def check_scan_settings(
    *, mode: str, eps: float, template: str, batch_size: int = 8, r_main: int = 1
) -> None:
    """Every setting of a Ships / Sahara scan that needs no model: mode, ε, template, counts."""
    ablation_method(mode)
    check_eps(eps)
    check_template(template)
    check_count(batch_size, "batch_size")
    check_count(r_main, "r_main")


def format_queries(lm: LoadedModel, queries: Sequence[str], template: str = "chat") -> list[str]:
    """Turn raw requests into model inputs: 'chat' (chat template, no system prompt), 'ships' /
    'sahara' (the authors' raw templates, BOS prepended where the tokenizer adds one), or any
    string with a `{query}` field."""
    if not queries:
        raise ScanError("no queries to format")
    fmt = check_template(template)
    if template == "chat":
        return [chat_prompt(lm.tokenizer, q) for q in queries]
    bos = lm.tokenizer.bos_token
    ids = lm.tokenizer("x", add_special_tokens=True)["input_ids"]
    prefix = bos if bos and ids and ids[0] == lm.tokenizer.bos_token_id else ""
    return [prefix + raw_prompt(fmt, query=q) for q in queries]


def _table(lm: LoadedModel, flat: Tensor, heads: Sequence[Head]) -> Tensor:
    """Scatter per-candidate values [C, …] into a [n_layers, n_heads, …] table (0 where unscored)."""
    table = torch.zeros((lm.info.n_layers, lm.info.n_heads, *flat.shape[1:]), dtype=torch.float32)
    for value, (layer, head) in zip(flat, heads, strict=True):
        table[layer, head] = value.float()
    return table


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles (degrees, ascending) between the column spaces of two orthonormal bases.

    cos θ are the singular values of AᵀB; for small angles the sines (singular values of
    B − A(AᵀB)) are used instead, because arccos is ill-conditioned near 1 (Björck & Golub; as in
    scipy.linalg.subspace_angles). Invariant to the sign (and any rotation) of the basis vectors.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"bases must be two [n, r] matrices of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    a, b = a.double(), b.double()
    cross = a.T @ b
    cos = torch.linalg.svdvals(cross).clamp(-1.0, 1.0)  # descending → angles ascending
    sin = torch.linalg.svdvals(b - a @ cross).clamp(-1.0, 1.0).flip(0)  # ascending
    angles = torch.where(cos**2 >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return torch.rad2deg(angles)


def left_singular_basis(matrix: Tensor, r: int) -> Tensor:
    """Top-r left singular vectors of an [N, d] matrix (the authors' subspace lives in query space)."""
    if matrix.dim() != 2:
        raise ValueError(f"expected an [N, d] matrix, got shape {tuple(matrix.shape)}")
    if not 1 <= r <= min(matrix.shape):
        raise ValueError(
            f"r_main must be in 1..{min(matrix.shape)} for a {tuple(matrix.shape)} matrix, got {r}"
        )
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("hidden-state matrix contains NaN/inf")
    u = torch.linalg.svd(matrix.double(), full_matrices=False)[0]
    return u[:, :r]


def subspace_angle_score(base: Tensor, ablated: Tensor, r_main: int = 1) -> float:
    """Σ_{r=1..r_main} principal angle (degrees) between the top-r_main left singular subspaces."""
    if base.shape != ablated.shape:
        raise ValueError(f"matrices differ in shape: {tuple(base.shape)} vs {tuple(ablated.shape)}")
    angles = principal_angles(left_singular_basis(base, r_main), left_singular_basis(ablated, r_main))
    return float(angles.sum())


def base_logits(lm: LoadedModel, prompts: EncodedPrompts, *, batch_size: int = 8) -> Tensor:
    """Unablated next-token logits at the last position, [P, vocab]."""
    return scan(lm, prompts, [Intervention()], LastLogits(), batch_size=batch_size, progress=False)[0]


def base_hidden(lm: LoadedModel, prompts: EncodedPrompts, *, batch_size: int = 8) -> Tensor:
    """Unablated final-norm last-token hidden states, [P, hidden]."""
    return scan(lm, prompts, [Intervention()], LastHidden(), batch_size=batch_size, progress=False)[0]


def ships_scores(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    *,
    levels: Sequence[str] = ("query", "dataset"),
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    r_main: int = 1,
    batch_size: int = 8,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 8,
    progress: bool = True,
    on_candidate: Callable[[int], None] | None = None,
    engine: str = "fast",
) -> dict[str, HeadScores]:
    """Ships for every single-head ablation, at the requested levels, from ONE scan of the model.

    `engine`: 'fast' (heads batched into rows, layers before each head reused; same scores up to
    float rounding) or 'simple' (one hooked forward per head), see `finesteer.locate.fast_scan`.

    query: `per_prompt` [P, L, H] KL(p_base ‖ p_ablated) at the last position, `scores` their mean.
    dataset: sum of the first `r_main` principal angles (degrees) between the top left singular
    subspaces of the base and ablated [P, hidden] final-norm last-token matrices.
    """
    levels = tuple(dict.fromkeys(levels))
    if not levels or any(level not in ("query", "dataset") for level in levels):
        raise ScanError(f"levels must be 'query' and/or 'dataset', got {levels}")
    encoded = as_encoded(lm, prompts)
    if "dataset" in levels and not 1 <= r_main <= len(encoded):
        raise ScanError(f"r_main={r_main} needs 1 ≤ r_main ≤ number of prompts ({len(encoded)})")
    heads = all_heads(lm.info)
    candidates = [ablation([h], mode, eps) for h in heads]
    started = time.perf_counter()
    readout, base = ships_readout(lm, encoded, levels, batch_size)
    values = run_scan(
        lm,
        encoded,
        candidates,
        readout,
        engine=engine,
        batch_size=batch_size,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        progress=progress,
        desc=f"ships {'+'.join(levels)} {mode}",
        on_candidate=on_candidate,
    )
    seconds = _since(started)
    common = {
        "mode": mode,
        "eps": eps,
        "model_name": lm.name,
        "model_fingerprint": lm.fingerprint,
        "prompts_hash": encoded.texts_hash,
        "n_prompts": len(encoded),
    }
    return level_scores(lm, values, levels, heads, base, r_main, common, seconds)


def level_scores(
    lm: LoadedModel,
    values: Tensor,
    levels: tuple[str, ...],
    heads: list[Head],
    base: Tensor | None,
    r_main: int,
    common: dict[str, Any],
    seconds: float,
) -> dict[str, HeadScores]:
    """The scan's values as query-level (KL) and/or dataset-level (subspace angle) head tables."""
    out: dict[str, HeadScores] = {}
    if "query" in levels:
        kl = values if levels == ("query",) else values[:, :, 0]
        per_prompt = _table(lm, kl, heads).permute(2, 0, 1).contiguous()
        out["query"] = HeadScores(
            scores=per_prompt.mean(0),
            method="ships_query",
            per_prompt=per_prompt,
            extra={"score": "KL(p_base || p_ablated), last position, nats", "scan_seconds": seconds},
            **common,
        )
    if "dataset" in levels:
        assert base is not None
        hidden = values if levels == ("dataset",) else values[:, :, 1:]
        angles = torch.tensor([subspace_angle_score(base, m, r_main) for m in hidden])
        out["dataset"] = HeadScores(
            scores=_table(lm, angles, heads),
            method="ships_dataset",
            extra={
                "score": "sum of first r_main principal angles (degrees), final-norm last-token states",
                "r_main": r_main,
                "scan_seconds": seconds,
            },
            **common,
        )
    return out


def ships_readout(
    lm: LoadedModel, encoded: EncodedPrompts, levels: tuple[str, ...], batch_size: int
) -> tuple[Readout, Tensor | None]:
    """The scan readout for `levels`, and the base hidden states the dataset level compares against."""
    if levels == ("dataset",):
        return LastHidden(), base_hidden(lm, encoded, batch_size=batch_size)
    logits = base_logits(lm, encoded, batch_size=batch_size)
    readout = KLFromBase(logits) if levels == ("query",) else KLAndHidden(logits)
    base = base_hidden(lm, encoded, batch_size=batch_size) if "dataset" in levels else None
    return readout, base


def ships_query(lm: LoadedModel, prompts: EncodedPrompts | Sequence[str], **kwargs: Any) -> HeadScores:
    """Query-level Ships for every head (see `ships_scores`; same keyword arguments)."""
    return ships_scores(lm, prompts, levels=("query",), **kwargs)["query"]


def ships_dataset(lm: LoadedModel, prompts: EncodedPrompts | Sequence[str], **kwargs: Any) -> HeadScores:
    """Dataset-level Ships for every head (see `ships_scores`; same keyword arguments)."""
    return ships_scores(lm, prompts, levels=("dataset",), **kwargs)["dataset"]


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)
