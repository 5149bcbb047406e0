"""Gradient pre-ranking (attribution patching) of single-head ablations, then exact verification.

Every head gets a gate g (one per prompt row, layer and head) multiplying its query (Ships `ua`) or
its output (`sc`) at every position; g = 1 is the unmodified model and g = ε is exactly the Ships
ablation of that head (the same site and `Scale` op). One forward and a few backward passes, with
the weights frozen so only gate gradients are computed, estimate every head's effect at once:

- **first order** (a behaviour metric m, e.g. the log-probability of refusal tokens or the A/B
  letter margin): m(ε) − m(1) ≈ ∂m/∂g · (ε − 1). Importance is the drop, m(1) − m(ε).
- **second order** (KL(p_base ‖ p_ablated), whose value and gradient vanish at g = 1):
  KL ≈ ½ (1 − ε)² F_hh, with F_hh = Σ_y p_y (∂ log p_y / ∂g_h)² the Fisher information of the
  next-token distribution along the head's gate (the Hessian of KL at g = 1 is the Fisher, as the
  gradient term Σ_y ∂²p_y vanishes). Computing it over the whole vocabulary needs one backward per
  token, so the outcomes are coarsened to the `outcomes` most likely tokens (of the base model, per
  prompt) plus one "every other token" outcome: F is then the Fisher of that coarser variable, a
  lower bound of the full one (data processing) that is exact once the kept tokens carry all the mass
  or cover the vocabulary. Cost: forward + (outcomes + 1) gate-only backward passes.

`pre_ranked_scan` ranks all heads by the estimate, runs the exact (fast) scan on the `top_n` best and
reports how well the estimate ranked them (Spearman over the verified heads).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.hooks import CallContext, HookSet
from finesteer.interventions.edit import Intervention
from finesteer.locate.fast_scan import run_scan
from finesteer.locate.scan import (
    EncodedPrompts,
    KLFromBase,
    LastLogits,
    LastPosition,
    Readout,
    _batches,
    encode_prompts,
)
from finesteer.locate.scores import HeadScores
from finesteer.locate.ships import DEFAULT_EPS, Head, ablation, ablation_method, all_heads, check_eps
from finesteer.models.loading import LoadedModel
from finesteer.sites import Site

DEFAULT_OUTCOMES = 2
DEFAULT_TOP_N = 16


class AttributionError(ValueError):
    """Attribution that cannot run: bad metric targets, a metric without gradient, NaN estimates."""


class Metric(ABC):
    """A per-prompt differentiable function of the last-position logits (higher = more behaviour)."""

    order: int = 1

    @abstractmethod
    def values(self, logits: Tensor, rows: Tensor) -> Tensor:
        """[batch] metric of each row; `rows` are the prompt indices of the batch rows."""

    @abstractmethod
    def key(self) -> str:
        """Short description recorded with the scores."""


class TokenLogProb(Metric):
    """log Σ_{t ∈ tokens} p(t) at the last position: e.g. the refusal tokens ("I", "Sorry", …)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        ids = sorted({int(t) for t in token_ids})
        if not ids:
            raise AttributionError("TokenLogProb needs at least one token id")
        if ids[0] < 0:
            raise AttributionError(f"token ids must be ≥ 0, got {ids[0]}")
        self.token_ids = torch.tensor(ids)

    def values(self, logits: Tensor, rows: Tensor) -> Tensor:
        if int(self.token_ids.max()) >= logits.shape[-1]:
            raise AttributionError(f"token id {int(self.token_ids.max())} ≥ vocab size {logits.shape[-1]}")
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return torch.logsumexp(log_probs[:, self.token_ids.to(logits.device)], dim=-1)

    def key(self) -> str:
        return f"log_prob_of_tokens:{','.join(map(str, self.token_ids.tolist()))}"


class LetterMargin(Metric):
    """A/B letter margin per prompt: logit(matching letter) − logsumexp(logits of the other options).

    `matching[i]` is prompt i's matching-letter token id and `others[i]` its other options' ids
    (two options: the plain logit difference).
    """

    def __init__(self, matching: Sequence[int], others: Sequence[Sequence[int]]) -> None:
        if not matching or len(matching) != len(others):
            raise AttributionError(
                f"LetterMargin needs one matching id and its other options per prompt, got "
                f"{len(matching)} and {len(others)}"
            )
        for i, (m, rest) in enumerate(zip(matching, others, strict=True)):
            if not rest or int(m) in {int(o) for o in rest}:
                raise AttributionError(
                    f"prompt {i}: other options {list(rest)} must be non-empty, without {m}"
                )
        self.matching = [int(m) for m in matching]
        self.others = [[int(o) for o in rest] for rest in others]

    @classmethod
    def from_targets(cls, targets: Sequence[Any]) -> LetterMargin:
        """From `finesteer.locate.last_token.ABTarget`s (their option ids and matching index)."""
        matching = [t.option_ids[t.matching_index] for t in targets]
        others = [[o for j, o in enumerate(t.option_ids) if j != t.matching_index] for t in targets]
        return cls(matching, others)

    def values(self, logits: Tensor, rows: Tensor) -> Tensor:
        out = []
        for row, prompt in enumerate(rows.tolist()):
            if prompt >= len(self.matching):
                raise AttributionError(
                    f"LetterMargin has targets for {len(self.matching)} prompts, not {prompt + 1}"
                )
            z = logits[row].float()
            out.append(z[self.matching[prompt]] - torch.logsumexp(z[self.others[prompt]], dim=0))
        return torch.stack(out)

    def key(self) -> str:
        return f"letter_margin:{len(self.matching)}"


class KLDivergence(Metric):
    """KL(p_base ‖ p_ablated) at the last position, estimated to second order over `outcomes` tokens."""

    order = 2

    def __init__(self, outcomes: int = DEFAULT_OUTCOMES) -> None:
        if outcomes < 1:
            raise AttributionError(f"outcomes must be ≥ 1, got {outcomes}")
        self.outcomes = int(outcomes)

    def values(self, logits: Tensor, rows: Tensor) -> Tensor:
        raise AttributionError("KL from the base is 0 at the base; it has no first-order value to read")

    def key(self) -> str:
        return f"kl_second_order:{self.outcomes}"


class MetricReadout(Readout):
    """A metric as a scan readout, so the exact ablation effect uses the same code as the estimate."""

    needs_logits = True

    def __init__(self, metric: Metric) -> None:
        if metric.order != 1:
            raise AttributionError(f"{metric.key()} has no exact readout of its own")
        self.metric = metric

    def __call__(self, out: LastPosition) -> Tensor:
        assert out.logits is not None
        with torch.no_grad():
            return self.metric.values(out.logits, out.rows).double()

    def key(self) -> str:
        return f"metric:{self.metric.key()}"


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Weights without gradients: backward then only computes what the gates need (about half)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _gate_hook(gates: Tensor, layer: int, head_dim: int) -> Any:
    def multiply(act: Tensor, ctx: CallContext) -> Tensor:
        scale = gates[:, layer].repeat_interleave(head_dim, dim=-1)
        return act * scale[:, None, :].to(act.dtype)

    return multiply


def _fisher(logits: Tensor, gates: Tensor, outcomes: int) -> Tensor:
    """Σ_o p_o (∂ log p_o / ∂g)² per row, layer and head over the top tokens + 'the rest'."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    vocab = log_probs.shape[-1]
    k = min(outcomes, vocab)
    top = log_probs.detach().topk(k, dim=-1).indices
    parts = [log_probs.gather(1, top)]
    if k < vocab:
        rest = log_probs.scatter(1, top, -math.inf)
        parts.append(torch.logsumexp(rest, dim=-1, keepdim=True))
    outcome_log_probs = torch.cat(parts, dim=1)  # [B, O]
    weights = outcome_log_probs.detach().exp()
    fisher = torch.zeros_like(gates, dtype=torch.float64)
    for o in range(outcome_log_probs.shape[1]):
        (grad,) = torch.autograd.grad(outcome_log_probs[:, o].sum(), gates, retain_graph=True)
        fisher += weights[:, o, None, None] * grad.double() ** 2
    return fisher


def gate_gradients(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric,
    *,
    mode: str = "ua",
    batch_size: int = 8,
    progress: bool = False,
) -> Tensor:
    """Per prompt, layer and head: ∂m/∂g (first-order metrics) or the Fisher F (KL), [P, L, H]."""
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
    component = "q" if ablation_method(mode) == "uniform_attention" else "z"
    info = lm.info
    out = torch.empty((len(encoded), info.n_layers, info.n_heads), dtype=torch.float64)
    batches = _batches(encoded, batch_size, lm.tokenizer.pad_token_id, lm.device)
    with _frozen(lm.model):
        for batch in tqdm(batches, desc=f"attribution {mode}", unit="batch", disable=not progress):
            size = int(batch.input_ids.shape[0])
            gates = torch.ones((size, info.n_layers, info.n_heads), device=lm.device, requires_grad=True)
            positions = torch.unique(batch.last)
            with HookSet(lm.model, lm.adapter) as hooks, torch.enable_grad():
                for layer in range(info.n_layers):
                    hooks.add(Site(layer, component), _gate_hook(gates, layer, info.head_dim))
                output = lm.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.mask,
                    use_cache=False,
                    logits_to_keep=positions,
                )
                column = torch.searchsorted(positions, batch.last)
                logits = output.logits[torch.arange(size, device=lm.device), column]
                if metric.order == 2:
                    assert isinstance(metric, KLDivergence)
                    values = _fisher(logits, gates, metric.outcomes)
                else:
                    m = metric.values(logits, batch.rows)
                    if not m.requires_grad:
                        raise AttributionError(f"metric {metric.key()} does not depend on the logits")
                    (values,) = torch.autograd.grad(m.sum(), gates)
            if not bool(torch.isfinite(values).all()):
                raise AttributionError(f"attribution gave NaN/inf for prompts {batch.rows.tolist()}")
            out[batch.rows] = values.detach().double().cpu()
    return out


def estimate_effects(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric,
    *,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    progress: bool = False,
) -> HeadScores:
    """Estimated importance of ablating each head (per prompt and mean), higher = more important.

    First-order metrics: m(1) − m(ε) ≈ (1 − ε)·∂m/∂g (the drop in the behaviour). KL: ½(1 − ε)²·F.
    """
    eps = check_eps(eps)
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
    started = time.perf_counter()
    raw = gate_gradients(lm, encoded, metric, mode=mode, batch_size=batch_size, progress=progress)
    per_prompt = 0.5 * (1 - eps) ** 2 * raw if metric.order == 2 else (1 - eps) * raw
    return HeadScores(
        scores=per_prompt.mean(0).float(),
        method="attribution",
        mode=mode,
        eps=eps,
        model_name=lm.name,
        model_fingerprint=lm.fingerprint,
        prompts_hash=encoded.texts_hash,
        n_prompts=len(encoded),
        extra={"metric": metric.key(), "order": metric.order, "seconds": _since(started)},
        per_prompt=per_prompt.float(),
    )


def exact_effects(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric,
    heads: Sequence[Head],
    *,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    engine: str = "fast",
    progress: bool = False,
) -> Tensor:
    """Exact importance of ablating each head alone, [len(heads), P] (same convention as the estimate)."""
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
    candidates = [ablation([h], mode, eps) for h in heads]
    options: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "engine": engine}
    base = run_scan(lm, encoded, [Intervention()], LastLogits(), **{**options, "progress": False})[0]
    if metric.order == 2:
        return run_scan(lm, encoded, candidates, KLFromBase(base), desc="verify", **options)
    readout = MetricReadout(metric)
    base_value = readout(LastPosition(base, None, torch.arange(len(encoded))))
    return base_value[None] - run_scan(lm, encoded, candidates, readout, desc="verify", **options)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equally long vectors (average ranks for ties)."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() != b.numel() or a.numel() < 2:
        raise AttributionError(f"spearman needs two vectors of one length ≥ 2, got {a.numel()}, {b.numel()}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else 0.0


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def top_k_overlap(a: Tensor, b: Tensor, k: int = 10) -> int:
    """How many of a's k highest entries are among b's k highest (flattened tables)."""
    a, b = a.flatten(), b.flatten()
    if a.numel() != b.numel() or not 1 <= k <= a.numel():
        raise AttributionError(f"top_k_overlap needs equal sizes and 1 ≤ k ≤ size, got k={k}")
    first = set(_top(a, k))
    return len(first & set(_top(b, k)))


def _top(x: Tensor, k: int) -> list[int]:
    values = x.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def rank_agreement(estimate: Tensor, exact: Tensor, k: int = 10) -> dict[str, float]:
    """Spearman and top-k overlap of two head tables (e.g. estimate vs the exact scan of all heads)."""
    return {"spearman": spearman(estimate, exact), f"top{k}_overlap": top_k_overlap(estimate, exact, k)}


@dataclass
class PreRankedScan:
    """Every head's estimate, the exact values of the verified (estimated best) heads, and the ranking.

    `scores` holds the exact mean importance of the verified heads and 0 elsewhere (see `verified`);
    `ranking()` is the authoritative order: verified heads by exact value, then the rest by estimate.
    """

    estimate: HeadScores
    scores: HeadScores
    verified: list[Head]
    exact: Tensor
    agreement: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def ranking(self) -> list[Head]:
        exact = {h: float(v) for h, v in zip(self.verified, self.exact.mean(1).tolist(), strict=True)}
        first = sorted(self.verified, key=lambda h: (-exact[h], h))
        rest = [(lay, h) for lay, h, _ in self.estimate.ranked() if (lay, h) not in exact]
        return first + rest

    def top_heads(self, k: int = 10) -> list[Head]:
        return self.ranking()[:k]


def pre_ranked_scan(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric | None = None,
    *,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    top_n: int = DEFAULT_TOP_N,
    batch_size: int = 8,
    engine: str = "fast",
    progress: bool = True,
) -> PreRankedScan:
    """Estimate every head by attribution, then verify the `top_n` best exactly (default metric: KL,
    i.e. query-level Ships)."""
    metric = metric if metric is not None else KLDivergence()
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
    heads = all_heads(lm.info)
    if not 1 <= top_n <= len(heads):
        raise AttributionError(f"top_n must be in 1..{len(heads)}, got {top_n}")
    started = time.perf_counter()
    estimate = estimate_effects(
        lm, encoded, metric, mode=mode, eps=eps, batch_size=batch_size, progress=progress
    )
    mid = time.perf_counter()
    verified = [(lay, h) for lay, h, _ in estimate.ranked()[:top_n]]
    exact = exact_effects(
        lm,
        encoded,
        metric,
        verified,
        mode=mode,
        eps=eps,
        batch_size=batch_size,
        engine=engine,
        progress=progress,
    )
    table = torch.zeros(lm.info.n_layers, lm.info.n_heads)
    for (layer, head), value in zip(verified, exact.mean(1).tolist(), strict=True):
        table[layer, head] = value
    est_verified = torch.tensor([estimate[h] for h in verified])
    agreement = {"spearman_verified": spearman(est_verified, exact.mean(1)) if top_n > 1 else 1.0}
    seconds = {"estimate": round(mid - started, 3), "verify": _since(mid), "total": _since(started)}
    scores = HeadScores(
        scores=table,
        method="pre_ranked",
        mode=mode,
        eps=eps,
        model_name=lm.name,
        model_fingerprint=lm.fingerprint,
        prompts_hash=encoded.texts_hash,
        n_prompts=len(encoded),
        extra={
            "metric": metric.key(),
            "verified": [f"{lay}.{h}" for lay, h in verified],
            **agreement,
            "seconds": seconds,
        },
    )
    return PreRankedScan(estimate, scores, verified, exact.float(), agreement, seconds)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)
