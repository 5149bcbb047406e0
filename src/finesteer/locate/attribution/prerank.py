"""Attribution estimates as head tables, exact verification by scan, and the pre-ranked scan that
estimates every head and verifies the best (see `finesteer.locate.attribution`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from finesteer.interventions.edit import Intervention, check_eps
from finesteer.locate.attribution.certify import (
    DEFAULT_CONFIDENCE,
    DEFAULT_K,
    DEFAULT_SAMPLE,
    DEFAULT_STEP,
    MissBound,
    adaptive_verification,
    check_settings,
    miss_bound,
)
from finesteer.locate.attribution.gradients import gate_pass
from finesteer.locate.attribution.metrics import AttributionError, KLDivergence, Metric, MetricReadout
from finesteer.locate.engine import EncodedPrompts, LastPosition, as_encoded
from finesteer.locate.fast_scan import PrefixCache, run_scan
from finesteer.locate.rank_stats import spearman
from finesteer.locate.scan import KLFromBase, LastLogits
from finesteer.locate.scores import HeadScores
from finesteer.locate.ships import DEFAULT_EPS, ablation, all_heads
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head, check_heads

DEFAULT_TOP_N = 16


def estimate_effects(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric,
    *,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    linearize: str = "activation",
    batch_size: int = 8,
    progress: bool = False,
) -> HeadScores:
    """Estimated importance of ablating each head (per prompt and mean), higher = more important.

    First-order metrics: the drop m(model) − m(ablated) ≈ −∂m/∂a. KL: ½·Fisher along a.
    """
    encoded = as_encoded(lm, prompts)
    return _estimate(lm, encoded, metric, mode, check_eps(eps), linearize, batch_size, progress)[0]


def _estimate(
    lm: LoadedModel,
    encoded: EncodedPrompts,
    metric: Metric,
    mode: str,
    eps: float,
    linearize: str,
    batch_size: int,
    progress: bool,
) -> tuple[HeadScores, Tensor]:
    started = time.perf_counter()
    raw, base = gate_pass(lm, encoded, metric, mode, eps, linearize, batch_size, progress)
    per_prompt = 0.5 * raw if metric.order == 2 else -raw
    extra = {"metric": metric.key(), "order": metric.order, "linearize": linearize}
    table = per_prompt.mean(0).float()
    extra["seconds"] = _since(started)
    return _head_scores(lm, encoded, table, "attribution", mode, eps, extra, per_prompt.float()), base


def _head_scores(
    lm: LoadedModel,
    encoded: EncodedPrompts,
    table: Tensor,
    method: str,
    mode: str,
    eps: float,
    extra: dict[str, Any],
    per_prompt: Tensor | None = None,
) -> HeadScores:
    """A layer × head table of `method` on these prompts, labelled with the model and ablation."""
    return HeadScores(
        scores=table,
        method=method,
        mode=mode,
        eps=eps,
        model_name=lm.name,
        model_fingerprint=lm.fingerprint,
        prompts_hash=encoded.texts_hash,
        n_prompts=len(encoded),
        extra=extra,
        per_prompt=per_prompt,
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
    base_logits: Tensor | None = None,
    progress: bool = False,
    prefixes: PrefixCache | None = None,
) -> Tensor:
    """Exact importance of ablating each head alone, [len(heads), P] (same convention as the estimate):
    the unit of work a distributed verification runs (any list of heads).

    `base_logits` [P, vocab] are the unablated last-position logits when already known; `prefixes`
    (fast engine) recorded layer inputs to reuse across calls on the same prompts.
    """
    encoded = as_encoded(lm, prompts)
    candidates = [ablation([h], mode, eps) for h in check_heads(heads, lm.info.n_layers, lm.info.n_heads)]
    options: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "engine": engine}
    if prefixes is not None and engine == "fast":
        options["prefixes"] = prefixes
    base = base_logits
    if base is None:
        base = run_scan(lm, encoded, [Intervention()], LastLogits(), **{**options, "progress": False})[0]
    if metric.order == 2:
        return run_scan(lm, encoded, candidates, KLFromBase(base), desc="verify", **options)
    readout = MetricReadout(metric)
    base_value = readout(LastPosition(base, None, torch.arange(len(encoded))))
    return base_value[None] - run_scan(lm, encoded, candidates, readout, desc="verify", **options)


@dataclass
class PreRankedScan:
    """Every head's estimate, the exact values of the verified (estimated best) heads, and the ranking.

    `scores` holds the exact mean importance of the verified heads and 0 elsewhere (see `verified`);
    `ranking()` is the authoritative order: verified heads by exact value, then the rest by estimate.
    `bound`: how many heads were not verified and the estimated probability that one of them belongs in
    the top-k (`finesteer.locate.attribution.certify`).
    """

    estimate: HeadScores
    scores: HeadScores
    verified: list[Head]
    exact: Tensor
    agreement: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bound: MissBound | None = None

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
    linearize: str = "activation",
    batch_size: int = 8,
    engine: str = "fast",
    progress: bool = True,
) -> PreRankedScan:
    """Estimate every head by attribution, then verify the `top_n` best exactly (default metric: KL,
    i.e. query-level Ships)."""
    metric = metric if metric is not None else KLDivergence()
    encoded = as_encoded(lm, prompts)
    heads = all_heads(lm.info)
    if not 1 <= top_n <= len(heads):
        raise AttributionError(f"top_n must be in 1..{len(heads)}, got {top_n}")
    started = time.perf_counter()
    estimate, base = _estimate(lm, encoded, metric, mode, check_eps(eps), linearize, batch_size, progress)
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
        base_logits=base,
        progress=progress,
    )
    flat = estimate.scores.flatten().tolist()
    means = {lay * lm.info.n_heads + h: float(v) for (lay, h), v in zip(verified, exact.mean(1), strict=True)}
    bound = miss_bound(flat, means, min(DEFAULT_K, top_n), space=_space(metric))
    seconds = {"estimate": round(mid - started, 3), "verify": _since(mid), "total": _since(started)}
    return _result(lm, encoded, estimate, metric, verified, exact, seconds, bound)


def _space(metric: Metric) -> str:
    """Residual space of the calibration: log for KL (non-negative), linear for signed drops."""
    return "log" if metric.order == 2 else "linear"


def _result(
    lm: LoadedModel,
    encoded: EncodedPrompts,
    estimate: HeadScores,
    metric: Metric,
    verified: list[Head],
    exact: Tensor,
    seconds: dict[str, float],
    bound: MissBound,
) -> PreRankedScan:
    """The verified heads' exact table, agreement and bound as a `PreRankedScan`."""
    table = torch.zeros(lm.info.n_layers, lm.info.n_heads)
    for (layer, head), value in zip(verified, exact.mean(1).tolist(), strict=True):
        table[layer, head] = value
    est_verified = torch.tensor([estimate[h] for h in verified])
    agreement = {"spearman_verified": spearman(est_verified, exact.mean(1)) if len(verified) > 1 else 1.0}
    extra = {"metric": metric.key(), "verified": [f"{lay}.{h}" for lay, h in verified], **agreement}
    extra = {**extra, "seconds": seconds, "bound": bound.to_dict()}
    scores = _head_scores(lm, encoded, table, "pre_ranked", estimate.mode, estimate.eps, extra)
    return PreRankedScan(estimate, scores, verified, exact.float(), agreement, seconds, bound)


def certified_scan(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric | None = None,
    *,
    k: int = DEFAULT_K,
    confidence: float = DEFAULT_CONFIDENCE,
    step: int = DEFAULT_STEP,
    sample: int = DEFAULT_SAMPLE,
    max_verify: int | None = None,
    seed: int = 0,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    linearize: str = "activation",
    batch_size: int = 8,
    engine: str = "fast",
    progress: bool = True,
) -> PreRankedScan:
    """Estimate every head, then verify exactly in estimated order until the calibrated stop rule says
    no unverified head can enter the top-k, plus a random sample of the rest; the result carries the
    bound (`finesteer.locate.attribution.certify`). Default metric: KL (query-level Ships)."""
    metric = metric if metric is not None else KLDivergence()
    encoded = as_encoded(lm, prompts)
    heads = all_heads(lm.info)
    check_settings(len(heads), k, _space(metric), confidence, step, sample, max_verify)
    started = time.perf_counter()
    estimate, base = _estimate(lm, encoded, metric, mode, check_eps(eps), linearize, batch_size, progress)
    mid = time.perf_counter()
    cache = PrefixCache(lm, encoded, batch_size) if engine == "fast" else None

    def verify(indices: list[int]) -> Tensor:
        chosen = [heads[i] for i in indices]
        return exact_effects(
            lm, encoded, metric, chosen, mode=mode, eps=eps, batch_size=batch_size, engine=engine,
            base_logits=base, progress=False, prefixes=cache,
        )  # fmt: skip

    certificate = adaptive_verification(
        estimate.scores.flatten(), verify, k, space=_space(metric), confidence=confidence, step=step,
        sample=sample, max_verify=max_verify, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    verified = [heads[i] for i in certificate.order]
    exact = torch.stack([certificate.exact[i] for i in certificate.order]).float()
    seconds = {"estimate": round(mid - started, 3), "verify": _since(mid), "total": _since(started)}
    return _result(lm, encoded, estimate, metric, verified, exact, seconds, certificate.bound)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def attribution_scan(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric,
    *,
    top_n: int | None = None,
    say: Callable[[str], None] | None = None,
    **options: Any,
) -> PreRankedScan:
    """`pre_ranked_scan` of the `top_n` best when `top_n` is given, else `certified_scan` (adaptive);
    `say` gets the bound's line ("heads not verified: N; estimated probability …"), which every
    pre-ranked scan reports. Options: those of the function chosen."""
    if top_n:
        fixed = {k: v for k, v in options.items() if k not in ("k", "confidence", "sample", "max_verify")}
        result = pre_ranked_scan(lm, prompts, metric, top_n=top_n, **fixed)
    else:
        result = certified_scan(lm, prompts, metric, **options)
    assert result.bound is not None
    if say is not None:
        say(result.bound.line())
    return result
