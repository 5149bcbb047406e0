"""Gradient pre-ranking (attribution patching) of single-head ablations, then exact verification.

Every head gets a gate a (one per prompt row, layer and head) that moves it from the model (a = 0)
to its Ships ablation (a = 1), at every position:

- `linearize="gate"`: the head's query (`ua`) or output (`sc`) is multiplied by 1 + a(ε − 1), so
  a = 1 is exactly the `Scale(ε)` op the exact scan applies;
- `linearize="activation"` (default; for `sc` it is the same path): the head's output z moves along
  z + a·Δz, where for `ua` Δz = (its output under uniform attention) − z, computed for every head at
  once from the layer's own values and mask (softmax of the mask alone = uniform over what each
  position may attend to). a = 1 is then the ε → 0 limit of the `ua` ablation, so the attention
  softmax — the part the query gate linearises badly when ε ≈ 0 — is exact, and only the effect of
  the changed output on later layers is linearised (attribution patching, Nanda 2023). On
  smollm2-135m-instruct (16 advbench prompts, ua, ε = 1e-5, 2 outcomes) this lifts the Spearman
  correlation with the exact query-level Ships scan over all 270 heads from 0.56 (gate) to 0.91.

One forward and a few backward passes, with the weights frozen so only gate gradients are computed,
estimate every head's effect at once:

- **first order** (a behaviour metric m, e.g. the log-probability of refusal tokens or the A/B
  letter margin): m(1) − m(0) ≈ ∂m/∂a. Importance is the drop, −∂m/∂a.
- **second order** (KL(p_base ‖ p_a), whose value and gradient vanish at a = 0):
  KL ≈ ½ F_hh with F_hh = Σ_y p_y (∂ log p_y / ∂a_h)², the Fisher information of the next-token
  distribution along the head's gate (the Hessian of KL at a = 0 is the Fisher, as the term
  Σ_y ∂²p_y vanishes). Over the whole vocabulary that needs one backward per token, so the outcomes
  are coarsened to the `outcomes` likeliest tokens (of the base model, per prompt) plus one "every
  other token" outcome: F is then the Fisher of that coarser variable, a lower bound of the full
  one (data processing), exact once the kept tokens carry all the mass or cover the vocabulary.
  Cost: one forward + (outcomes + 1) gate-only backward passes.

`pre_ranked_scan` ranks all heads by the estimate, runs the exact (fast) scan on the `top_n` best and
reports how well the estimate ranked them (Spearman over the verified heads); `rank_agreement`
compares an estimate with a full exact scan.
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
from finesteer.locate.ships import (
    DEFAULT_EPS,
    Head,
    ablation,
    ablation_method,
    all_heads,
    check_eps,
    check_heads,
)
from finesteer.models.loading import LoadedModel
from finesteer.sites import Site

DEFAULT_OUTCOMES = 2
DEFAULT_TOP_N = 16
LINEARIZE: tuple[str, ...] = ("activation", "gate")
MAX_UNIFORM_EPS = 1e-3


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
        """From `finesteer.scoring.ab.LetterTarget`s (their option ids and matching index)."""
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


REFUSAL_OPENINGS: tuple[str, ...] = ("I", "Sorry", "As", "Unfortunately", "I'm", "Cannot")


def refusal_token_ids(tokenizer: Any, openings: Sequence[str] = REFUSAL_OPENINGS) -> list[int]:
    """First token of each typical refusal opening, as the response's first token (a `TokenLogProb`
    over them is the log-probability that the answer starts like a refusal)."""
    ids = []
    for text in openings:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise AttributionError(f"refusal opening {text!r} tokenises to nothing")
        ids.append(int(tokens[0]))
    return sorted(set(ids))


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


def _scale_hook(gates: Tensor, layer: int, head_dim: int, eps: float) -> Any:
    """act · (1 + a(ε − 1)) per head: a = 0 is the model, a = 1 the Ships `Scale(ε)` ablation."""

    def scale(act: Tensor, ctx: CallContext) -> Tensor:
        factor = 1 + gates[:, layer].repeat_interleave(head_dim, dim=-1) * (eps - 1)
        return act * factor[:, None, :].to(act.dtype)

    return scale


def _uniform_weights(mask: Any, batch: int, seq: int, device: torch.device) -> Tensor:
    """[b, 1|heads, S, S] attention weights of a head whose scores are all 0: softmax of the layer's
    mask alone (uniform over what each position may attend to: causal prefix, sliding window)."""
    if mask is None:
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None]
        scores = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, -math.inf)
    elif isinstance(mask, Tensor) and mask.dtype == torch.bool:
        scores = torch.zeros(mask.shape, device=device).masked_fill(~mask, -math.inf)
    elif isinstance(mask, Tensor) and mask.is_floating_point():
        scores = mask.float()
    else:
        raise AttributionError(
            f"unsupported attention mask {type(mask).__name__} for the uniform-attention estimate; "
            "use linearize='gate'"
        )
    if scores.dim() != 4 or scores.shape[-2] != seq or scores.shape[-1] != seq:
        raise AttributionError(f"attention mask of shape {tuple(scores.shape)} for {seq} tokens")
    return torch.softmax(scores, dim=-1)


def _uniform_hooks(lm: LoadedModel, gates: Tensor, layer: int, hooks: HookSet, handles: list[Any]) -> None:
    """act + a·Δz at the head outputs, Δz = (uniform attention over the layer's own values) − z:
    the exact change of one head's output under `ua` with ε → 0, computed for all heads at once."""
    info = lm.info
    seen: dict[str, Any] = {}

    def keep_mask(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def keep_values(module: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        seen["values"] = output.detach()

    def add_delta(act: Tensor, ctx: CallContext) -> Tensor:
        batch, seq = act.shape[0], act.shape[1]
        values = seen["values"].view(batch, seq, info.n_kv_heads, info.head_dim)
        values = values.repeat_interleave(info.n_heads // info.n_kv_heads, dim=2)
        weights = _uniform_weights(seen["mask"], batch, seq, act.device).to(values.dtype)
        uniform = torch.einsum("bhts,bshd->bthd", weights.expand(batch, info.n_heads, seq, seq), values)
        delta = uniform.reshape(batch, seq, info.z_dim) - act.detach()
        return act + gates[:, layer].repeat_interleave(info.head_dim, dim=-1)[:, None, :] * delta

    block = lm.adapter.block(lm.model, layer)
    handles.append(block.register_forward_pre_hook(keep_mask, with_kwargs=True))
    handles.append(
        lm.adapter.attn_part(lm.model, layer, lm.adapter.v_proj).register_forward_hook(keep_values)
    )
    hooks.add(Site(layer, "z"), add_delta)


@contextmanager
def gated_ablation(
    lm: LoadedModel, gates: Tensor, mode: str, eps: float = DEFAULT_EPS, linearize: str = "activation"
) -> Iterator[None]:
    """Within the block, head (l, h) of batch row b is ablated to the degree gates[b, l, h]: 0 = the
    model, 1 = the Ships ablation (`linearize='activation'` with `ua`: its ε → 0 limit). Gradients
    flow to `gates`; this is the path along which the estimates are derivatives."""
    _check_linearize(mode, check_eps(eps), linearize)
    if gates.dim() != 3 or tuple(gates.shape[1:]) != (lm.info.n_layers, lm.info.n_heads):
        raise AttributionError(
            f"gates must be [batch, {lm.info.n_layers}, {lm.info.n_heads}], got {tuple(gates.shape)}"
        )
    uniform = ablation_method(mode) == "uniform_attention"
    handles: list[Any] = []
    with HookSet(lm.model, lm.adapter) as hooks:
        try:
            for layer in range(lm.info.n_layers):
                if uniform and linearize == "activation":
                    _uniform_hooks(lm, gates, layer, hooks, handles)
                else:
                    site = Site(layer, "q" if uniform else "z")
                    hooks.add(site, _scale_hook(gates, layer, lm.info.head_dim, eps))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _fisher(logits: Tensor, gates: Tensor, outcomes: int) -> Tensor:
    """Σ_o p_o (∂ log p_o / ∂a)² per row, layer and head over the top tokens + 'the rest'."""
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


def _check_linearize(mode: str, eps: float, linearize: str) -> None:
    if linearize not in LINEARIZE:
        raise AttributionError(f"unknown linearize '{linearize}'; choose {' or '.join(LINEARIZE)}")
    if ablation_method(mode) == "uniform_attention" and linearize == "activation" and eps > MAX_UNIFORM_EPS:
        raise AttributionError(
            f"the activation estimate of 'ua' takes the ε → 0 limit (uniform attention); ε = {eps:g} is "
            f"not small (> {MAX_UNIFORM_EPS:g}): use linearize='gate'"
        )


def gate_gradients(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric,
    *,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    linearize: str = "activation",
    batch_size: int = 8,
    progress: bool = False,
) -> Tensor:
    """Per prompt, layer and head [P, L, H]: ∂m/∂a (first-order metrics) or the Fisher Σ_o p_o
    (∂ log p_o/∂a)² (KL), with a the head's gate from the model (0) to its ablation (1)."""
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
    return _gate_pass(lm, encoded, metric, mode, check_eps(eps), linearize, batch_size, progress)[0]


def _gate_pass(
    lm: LoadedModel,
    encoded: EncodedPrompts,
    metric: Metric,
    mode: str,
    eps: float,
    linearize: str,
    batch_size: int,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """Gate derivatives [P, L, H] and the model's own last-position logits [P, vocab] (all gates at 0
    add exact zeros / multiply by exactly 1, so these are the unablated logits)."""
    _check_linearize(mode, eps, linearize)
    info = lm.info
    out = torch.empty((len(encoded), info.n_layers, info.n_heads), dtype=torch.float64)
    base: Tensor | None = None
    batches = _batches(encoded, batch_size, lm.tokenizer.pad_token_id, lm.device)
    with _frozen(lm.model):
        for batch in tqdm(batches, desc=f"attribution {mode}", unit="batch", disable=not progress):
            size = int(batch.input_ids.shape[0])
            gates = torch.zeros((size, info.n_layers, info.n_heads), device=lm.device, requires_grad=True)
            positions = torch.unique(batch.last)
            with gated_ablation(lm, gates, mode, eps, linearize), torch.enable_grad():
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
            if base is None:
                base = torch.empty((len(encoded), logits.shape[-1]))
            base[batch.rows] = logits.detach().float().cpu()
    assert base is not None
    return out, base


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
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
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
    raw, base = _gate_pass(lm, encoded, metric, mode, eps, linearize, batch_size, progress)
    per_prompt = 0.5 * raw if metric.order == 2 else -raw
    scores = HeadScores(
        scores=per_prompt.mean(0).float(),
        method="attribution",
        mode=mode,
        eps=eps,
        model_name=lm.name,
        model_fingerprint=lm.fingerprint,
        prompts_hash=encoded.texts_hash,
        n_prompts=len(encoded),
        extra={
            "metric": metric.key(),
            "order": metric.order,
            "linearize": linearize,
            "seconds": _since(started),
        },
        per_prompt=per_prompt.float(),
    )
    return scores, base


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
) -> Tensor:
    """Exact importance of ablating each head alone, [len(heads), P] (same convention as the estimate).

    `base_logits` [P, vocab] are the unablated last-position logits when already known.
    """
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
    candidates = [ablation([h], mode, eps) for h in check_heads(lm.info, heads)]
    options: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "engine": engine}
    base = base_logits
    if base is None:
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
    linearize: str = "activation",
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
