"""CAA (Rimsky et al., 2024): contrastive activation addition with one residual vector per layer.

Vector: for each A/B item, the decoder-layer output (`resid_post`) at the answer-letter token of
prompt + "(A" (behaviour-matching answer) minus the same at prompt + "(B" (not matching); the CAA
vector of layer L is the mean of these differences. It is *not* normalised (CAA adds the raw mean
difference with a multiplier); its norm is reported.

The letter is passed to `capture` as a separate completion, so the read position is exactly the
letter token even where the tokenizer would merge "(A" into one token (Qwen2.5 does), and it is the
same conditioning the letter-probability metric uses ("…(" → next token "A").

Application: `steer_residual(L, v, multiplier, scope="from_end:K")`, i.e. every position from the
end of the instruction (the last K prompt tokens, then every generated token), where K is the
number of tokens the chat template writes after the user's text *including* the pre-filled "(":
for ChatML (SmolLM2, Qwen2.5) that is `<|im_end|>`, "\\n", `<|im_start|>`, "assistant", "\\n", "(".
CAA on Llama-2 steered the tokens after "[/INST]" (just " (" and the answer); with ChatML the
closing/opening markers take the place of "[/INST]", so they are steered too. On a prompt without
the pre-fill (open-ended questions) the same K also covers the last token of the user's text.

Layer and multiplier are chosen on a validation split with the letter-probability metric. The sweep
uses a fast path that computes each prompt's unchanged prefix once and re-runs only the K steered
tail tokens per (layer, multiplier); tests check it equals the plain evaluation.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.capture.activations import capture
from finesteer.data.items import ABItem
from finesteer.data.prompts import ab_prompt, chat_prompt
from finesteer.errors import FinesteerError
from finesteer.fit import FittedIntervention
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention, steer_residual
from finesteer.sites import Site

if TYPE_CHECKING:
    from finesteer.evaluate.ab import LetterTargets
    from finesteer.models.loading import LoadedModel

log = logging.getLogger(__name__)

PROBE_USER_TEXT = "Which option do you choose?"
"""User text used to measure the chat template's tail (any text whose end is a word boundary works)."""

DEFAULT_MULTIPLIERS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
"""CAA's natural scale (1), the grid HSI's authors swept for their CAA baseline (1, 2, 5), and 0.5."""

Direction = Literal["towards", "away"]


class CAAError(FinesteerError, ValueError):
    """CAA inputs that cannot give a vector (no items, letters that are not single tokens, NaN)."""


# --- where steering starts ------------------------------------------------------------------------


def template_tail_ids(tokenizer: Any, *, system: str | None = None, prefill: str = "(") -> list[int]:
    """Token ids the chat template writes after the user's text, followed by `prefill`'s tokens.

    Measured on a probe message with the tokenizer's character offsets: a token belongs to the tail
    when it ends after the user text does (a token straddling the seam counts as tail, so steering
    never starts too late).
    """
    text = chat_prompt(tokenizer, PROBE_USER_TEXT, system, prefill)
    end = text.rfind(PROBE_USER_TEXT)
    if end < 0:
        raise CAAError("the chat template does not reproduce the user's text; cannot locate its end")
    end += len(PROBE_USER_TEXT)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        # Slow tokenizers have no offsets: count the tokens added by the tail instead.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        head = tokenizer(text[:end], add_special_tokens=False)["input_ids"]
        return list(ids[len(head) :])
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    first = next((i for i, (_, stop) in enumerate(offsets) if stop > end), len(ids))
    return ids[first:]


def scored_prefill(tokenizer: Any, *, system: str | None = None, prefill: str = "(") -> str:
    """The part of `prefill` that is in the token sequence the letter-probability metric scores.

    `finesteer.evaluate.ab.letter_targets` reads "A" after a "(" token where the tokenizer keeps them
    apart (SmolLM2), but stops before the "(" and scores the merged "(A" token where the tokenizer
    merges them (Qwen2.5). Steering must start at the same place relative to the end of that sequence.
    """
    from finesteer.evaluate.ab import letter_targets

    probe = chat_prompt(tokenizer, PROBE_USER_TEXT, system, prefill)
    target = letter_targets(tokenizer, probe, ("A", "B"), prefill=prefill, item_id="template probe")
    return prefill[:-1] if target.mode == "merged_paren" else prefill


def instruction_tail_tokens(tokenizer: Any, *, system: str | None = None, prefill: str = "(") -> int:
    """K for the `from_end:K` scope: tokens after the user's text, the scored pre-fill included.

    SmolLM2 (ChatML, "(" a token of its own): 7 = `<|im_end|>` "\n" `<|im_start|>` "ass" "istant"
    "\n" "("; Qwen2.5 (merges "(A", so the metric's sequence ends before "("): 5.
    """
    scored = scored_prefill(tokenizer, system=system, prefill=prefill)
    return len(template_tail_ids(tokenizer, system=system, prefill=scored))


def caa_scope(k: int) -> str:
    """The scope string CAA interventions use: the last K prompt tokens and every generated token."""
    if k < 1:
        raise CAAError(f"K must be ≥ 1, got {k}")
    return f"from_end:{k}"


# --- vectors --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CAAVectors:
    """Raw mean-difference vectors [len(layers), hidden], one per layer (not normalised)."""

    vectors: Tensor
    layers: tuple[int, ...]
    n_items: int

    def __post_init__(self) -> None:
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.layers):
            raise CAAError(
                f"vectors must be [{len(self.layers)} layers, hidden], got {tuple(self.vectors.shape)}"
            )
        if not torch.isfinite(self.vectors).all():
            raise CAAError("CAA vectors contain NaN/inf (check the model's activations)")

    def vector(self, layer: int) -> Tensor:
        if layer not in self.layers:
            raise CAAError(f"no CAA vector for layer {layer}; fitted layers: {list(self.layers)}")
        return self.vectors[self.layers.index(layer)]

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in zip(self.layers, self.vectors, strict=True)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"layers": json.dumps(list(self.layers)), "n_items": str(self.n_items)}
        save_file({"vectors": self.vectors.contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CAAVectors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if "layers" not in meta:
            raise CAAError(f"{path} is not a CAA vector file (no 'layers' metadata)")
        vectors = load_file(str(path))["vectors"]
        return cls(vectors, tuple(json.loads(meta["layers"])), int(meta.get("n_items", 0)))


def _targets(tokenizer: Any, item: ABItem, system: str | None, prefill: str) -> LetterTargets:
    from finesteer.evaluate.ab import letter_targets

    prompt = ab_prompt(tokenizer, item, system=system, prefill=prefill)
    return letter_targets(tokenizer, prompt, item.options, prefill=prefill, item_id=item.id)


def caa_contrast_inputs(
    tokenizer: Any, items: Sequence[ABItem], *, system: str | None = None, prefill: str = "("
) -> list[str]:
    """Prompt + matching letter, then prompt + not-matching letter, for each item.

    The last token of each text is the answer-letter token the letter-probability metric scores
    ("A" after "(", or the merged "(A"); `letter_targets` checks that this holds for every item.
    """
    if not items:
        raise CAAError("no A/B items to compute CAA vectors from")
    inputs = []
    for item in items:
        _targets(tokenizer, item, system, prefill)
        prompt = ab_prompt(tokenizer, item, system=system, prefill=prefill)
        inputs += [prompt + item.matching_letter, prompt + item.not_matching_letter]
    return inputs


def caa_vectors(
    lm: LoadedModel,
    items: Sequence[ABItem],
    *,
    layers: Sequence[int] | None = None,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    progress: bool = False,
) -> CAAVectors:
    """Mean over items of resid_post(letter of matching) − resid_post(letter of not matching), per layer."""
    chosen = tuple(range(lm.info.n_layers)) if layers is None else tuple(int(x) for x in layers)
    if not chosen:
        raise CAAError("no layers given")
    if len(set(chosen)) != len(chosen):
        raise CAAError(f"duplicate layers in {list(chosen)}")
    sites = [Site(layer, "resid_post") for layer in chosen]
    for site in sites:
        site.validate(lm.info)
    inputs = caa_contrast_inputs(lm.tokenizer, items, system=system, prefill=prefill)
    acts = capture(lm, inputs, sites, position="last", batch_size=batch_size, progress=progress)
    stacked = torch.stack([acts[site] for site in sites], dim=1).double()  # [2N, layers, hidden]
    diff = (stacked[0::2] - stacked[1::2]).mean(0)
    return CAAVectors(diff.float(), chosen, len(items))


def caa_intervention(vector: Tensor, layer: int, multiplier: float, k: int) -> Intervention:
    """The CAA edit: add multiplier·v to layer `layer`'s output from the end of the instruction."""
    return steer_residual(layer, vector, multiplier, scope=caa_scope(k))


# --- letter-probability sweep (fast path) ------------------------------------------------------------------


@dataclass(frozen=True)
class LetterScores:
    """Per item: p(matching letter) normalised over the item's option letters, and whether it is the
    most probable option (ties to the earlier option), as `finesteer.evaluate.ab` computes them."""

    p_matching: Tensor  # [N] float64
    matched: Tensor  # [N] bool

    @property
    def mean_p_matching(self) -> float:
        return float(self.p_matching.mean())

    @property
    def matching_rate(self) -> float:
        return float(self.matched.double().mean())


def _letter_scores(logits: Tensor, items: Sequence[ABItem], targets: Sequence[LetterTargets]) -> LetterScores:
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    if torch.isnan(logp).any():
        raise CAAError("the model produced NaN logits during the CAA sweep (multiplier too large?)")
    p_match, matched = [], []
    for row, (item, target) in enumerate(zip(items, targets, strict=True)):
        letters = list(item.options)
        ids = torch.tensor([target.letter_ids[letter] for letter in letters])
        normalised = torch.softmax(logp[row, ids].double(), dim=0)
        index = letters.index(item.matching_letter)
        p_match.append(float(normalised[index]))
        matched.append(int(torch.argmax(normalised)) == index)
    return LetterScores(torch.tensor(p_match, dtype=torch.float64), torch.tensor(matched))


def prefix_cached_letter_scores(
    lm: LoadedModel,
    items: Sequence[ABItem],
    tail_interventions: Sequence[Intervention | None],
    *,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    progress: bool = False,
) -> list[LetterScores]:
    """Letter scores of the A/B items under each intervention acting only on the last K tokens.

    Every scored sequence ends in the same K template-tail tokens (checked). The prefix before
    them is run once per batch (an edit on the tail cannot change it: attention is causal), then
    the tail alone is re-run per intervention on top of the prefix's KV cache. Interventions must
    use scope "all": in the tail-only call that is exactly `from_end:K` of the full prompt.
    Equal to `finesteer.evaluate.ab.letter_probabilities` with the `from_end:K` edit (tested).
    """
    if not items:
        raise CAAError("no validation items")
    tokenizer, model = lm.tokenizer, lm.model
    scored = scored_prefill(tokenizer, system=system, prefill=prefill)
    tail = template_tail_ids(tokenizer, system=system, prefill=scored)
    k = len(tail)
    for intervention in tail_interventions:
        if intervention is not None:
            intervention.validate(lm.info)
            if any(str(edit.scope) != "all" for edit in intervention.edits):
                raise CAAError("tail interventions of the prefix-cached sweep must use scope 'all'")
    targets = [_targets(tokenizer, item, system, prefill) for item in items]
    for item, target in zip(items, targets, strict=True):
        if len(target.tokens) <= k or list(target.tokens[-k:]) != tail:
            raise CAAError(
                f"item {item.id!r}: its scored prompt does not end with the {k} template-tail tokens; "
                "the prefix-cached sweep needs a fixed tail"
            )
    device = lm.device
    results: list[list[LetterScores]] = [[] for _ in tail_interventions]
    batches = range(0, len(items), batch_size)
    for start in tqdm(batches, desc="CAA sweep", disable=not progress, unit="batch"):
        chunk = list(items[start : start + batch_size])
        chunk_targets = targets[start : start + batch_size]
        prefixes = [t.tokens[:-k] for t in chunk_targets]
        width = max(len(ids) for ids in prefixes)
        prefix = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(prefixes):  # left padding: the tail follows every prefix directly
            prefix[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        lengths = mask.sum(1)
        with torch.no_grad():
            cache = model(
                input_ids=prefix.to(device),
                attention_mask=mask.to(device),
                position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(device),
                use_cache=True,
                logits_to_keep=1,  # the prefix's logits are never read; skip the vocabulary projection
            ).past_key_values
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()  # sliding-window layers keep what a rollback needs
        croppable = bool(getattr(cache, "is_croppable", False))
        tail_ids = torch.tensor(tail, dtype=torch.long).expand(len(chunk), k).to(device)
        full_mask = torch.cat([mask, torch.ones((len(chunk), k), dtype=torch.long)], dim=1).to(device)
        tail_pos = (lengths[:, None] + torch.arange(k)[None, :]).to(device)
        for c, intervention in enumerate(tail_interventions):
            work = cache if croppable else copy.deepcopy(cache)
            context = intervene(lm, intervention) if intervention is not None else nullcontext()
            with torch.no_grad(), context:
                logits = model(
                    input_ids=tail_ids,
                    attention_mask=full_mask,
                    position_ids=tail_pos,
                    past_key_values=work,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
            if croppable:
                cache.crop(-k)  # a negative count removes that many tokens
            results[c].append(_letter_scores(logits, chunk, chunk_targets))
    return [
        LetterScores(torch.cat([r.p_matching for r in rows]), torch.cat([r.matched for r in rows]))
        for rows in results
    ]


@dataclass(frozen=True)
class SweepPoint:
    layer: int
    multiplier: float
    mean_p_matching: float
    matching_rate: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "layer": self.layer,
            "multiplier": self.multiplier,
            "mean_p_matching": self.mean_p_matching,
            "matching_rate": self.matching_rate,
        }


def sweep_caa(
    lm: LoadedModel,
    vectors: CAAVectors,
    val_items: Sequence[ABItem],
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    *,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[LetterScores, list[SweepPoint]]:
    """Unsteered scores, and validation scores for every (fitted layer, multiplier)."""
    mults = [float(m) for m in multipliers]
    if not mults or any(not math.isfinite(m) for m in mults):
        raise CAAError(f"multipliers must be a non-empty list of finite numbers, got {list(multipliers)}")
    grid = [(layer, m) for layer in vectors.layers for m in mults]
    ivs: list[Intervention | None] = [None]
    ivs += [steer_residual(layer, vectors.vector(layer), m, scope="all") for layer, m in grid]
    scores = prefix_cached_letter_scores(
        lm, val_items, ivs, system=system, prefill=prefill, batch_size=batch_size, progress=progress
    )
    points = [
        SweepPoint(layer, m, s.mean_p_matching, s.matching_rate)
        for (layer, m), s in zip(grid, scores[1:], strict=True)
    ]
    return scores[0], points


def select_point(
    points: Sequence[SweepPoint],
    unsteered: float,
    direction: Direction = "towards",
    tolerance: float = 0.1,
) -> SweepPoint:
    """The sweep point to keep, by validation mean p(matching) (lowest for "away").

    Among the points whose gain over the `unsteered` score is at least (1 − `tolerance`) of the
    best gain, the smallest |multiplier| wins: when several settings saturate the A/B score, the
    gentlest (least damaging) one is kept. The tolerance is relative to the gain, so when every
    gain is small the best point is still the one chosen. No point improving → the best one.
    """
    if not points:
        raise CAAError("empty sweep")
    if direction not in ("towards", "away"):
        raise CAAError(f"direction must be 'towards' or 'away', got {direction!r}")
    if not 0 <= tolerance < 1:
        raise CAAError(f"tolerance must be in [0, 1), got {tolerance}")
    sign = 1.0 if direction == "towards" else -1.0
    gains = [sign * (p.mean_p_matching - unsteered) for p in points]
    best = max(gains)
    if best <= 0:
        return points[gains.index(best)]
    near = [p for p, gain in zip(points, gains, strict=True) if gain >= (1 - tolerance) * best]
    return min(near, key=lambda p: (abs(p.multiplier), -sign * p.mean_p_matching, p.layer))


# --- fit ------------------------------------------------------------------------------------------


def fit_caa(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    *,
    layers: Sequence[int] | None = None,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    direction: Direction = "towards",
    tolerance: float = 0.1,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> FittedIntervention:
    """CAA vectors from `train_items`, layer × multiplier chosen on `val_items` (letter probability).

    `direction="away"` negates the multipliers and picks the lowest p(matching). Writes
    `caa_vectors.safetensors` and `caa_sweep.json` to `run_dir` when given.
    """
    if not train_items:
        raise CAAError("no training items for CAA")
    if not val_items:
        raise CAAError("no validation items for CAA's layer/multiplier sweep")
    if direction not in ("towards", "away"):
        raise CAAError(f"direction must be 'towards' or 'away', got {direction!r}")
    started = time.perf_counter()
    k = instruction_tail_tokens(lm.tokenizer, system=system, prefill=prefill)
    vectors = caa_vectors(
        lm,
        train_items,
        layers=layers,
        system=system,
        prefill=prefill,
        batch_size=batch_size,
        progress=progress,
    )
    sign = 1.0 if direction == "towards" else -1.0
    mults = [sign * abs(float(m)) for m in multipliers]
    base, points = sweep_caa(
        lm,
        vectors,
        val_items,
        mults,
        system=system,
        prefill=prefill,
        batch_size=batch_size,
        progress=progress,
    )
    chosen = select_point(points, base.mean_p_matching, direction, tolerance)
    intervention = caa_intervention(vectors.vector(chosen.layer), chosen.layer, chosen.multiplier, k)
    norms = vectors.norms()
    # Report the chosen setting through the plain evaluation path (a full forward per prompt).
    from finesteer.evaluate.ab import ab_matching_rate_prob

    check = ab_matching_rate_prob(
        lm, val_items, system=system, intervention=intervention, batch_size=batch_size, prefill=prefill
    )
    if abs(float(check.mean_p_matching or 0.0) - chosen.mean_p_matching) > 1e-3:
        log.warning(
            "CAA sweep fast path and plain evaluation disagree: %.4f vs %.4f",
            chosen.mean_p_matching,
            check.mean_p_matching,
        )
    metadata: dict[str, Any] = {
        "method": "caa",
        "layer": chosen.layer,
        "multiplier": chosen.multiplier,
        "vector_norm": norms[chosen.layer],
        "scope": caa_scope(k),
        "template_tail_tokens": k,
        "direction": direction,
        "selection": (
            f"best val mean p(matching) ({direction}); smallest |multiplier| among points with ≥ "
            f"{1 - tolerance:.0%} of the best gain over unsteered"
        ),
        "val_mean_p_matching": check.mean_p_matching,
        "val_matching_rate": check.matching_rate,
        "val_baseline_mean_p_matching": base.mean_p_matching,
        "val_baseline_matching_rate": base.matching_rate,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "layers_swept": list(vectors.layers),
        "multipliers_swept": mults,
        "vector_norms": {str(layer): n for layer, n in norms.items()},
        "system_prompt": system,
        "prefill": prefill,
        "fit_seconds": round(time.perf_counter() - started, 2),
    }
    if run_dir is not None:
        folder = Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        vectors.save(folder / "caa_vectors.safetensors")
        sweep = {"baseline": {"mean_p_matching": base.mean_p_matching, "matching_rate": base.matching_rate}}
        sweep["points"] = [p.to_dict() for p in points]  # type: ignore[assignment]
        (folder / "caa_sweep.json").write_text(
            json.dumps({**sweep, "chosen": chosen.to_dict()}, indent=2) + "\n"
        )
    log.info(
        "CAA: layer %d, multiplier %g (|v| = %.3g): val p(matching) %.3f (unsteered %.3f)",
        chosen.layer,
        chosen.multiplier,
        norms[chosen.layer],
        chosen.mean_p_matching,
        base.mean_p_matching,
    )
    return FittedIntervention("caa", intervention, metadata)


__all__ = [
    "DEFAULT_MULTIPLIERS",
    "CAAError",
    "CAAVectors",
    "LetterScores",
    "SweepPoint",
    "caa_contrast_inputs",
    "caa_intervention",
    "caa_scope",
    "caa_vectors",
    "fit_caa",
    "instruction_tail_tokens",
    "prefix_cached_letter_scores",
    "scored_prefill",
    "select_point",
    "sweep_caa",
    "template_tail_ids",
]
