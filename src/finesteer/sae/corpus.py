"""Texts an SAE is trained and evaluated on: the prompts (and answers) finesteer ships, chat-formatted.

No pretrained SAE is reachable offline, so we train on what the behaviours we steer look like:
harmful requests, harmless instructions, and the CAA A/B questions with an answer turn (so the SAE
also sees assistant text, which is where STA reads its atoms), plus optionally the model's own greedy
replies. The evaluation sets (JailbreakBench, XSTest) are never included, so steering results on
them are not on SAE training text. `heldout_texts` draws from test splits only, for `sae eval`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finesteer.data import PromptItem, chat_prompt, load_ab_items, load_dataset
from finesteer.errors import FinesteerError
from finesteer.generation import GenerationConfig, generate

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

AB_BEHAVIOURS: tuple[str, ...] = (
    "refusal",
    "coordinate-other-ais",
    "corrigible-neutral-HHH",
    "hallucination",
    "myopic-reward",
    "survival-instinct",
    "sycophancy",
)
EVALUATION_SETS: tuple[tuple[str, str | None], ...] = (
    ("jailbreakbench", None),
    ("jailbreakbench-benign", None),
    ("xstest", "all"),
)
"""Held-out steering evaluation sets: their prompts are removed from every SAE corpus."""


class CorpusError(FinesteerError, ValueError):
    """A corpus request that yields no text (all sources empty or limits of zero)."""


@dataclass(frozen=True)
class CorpusSpec:
    """How many texts of each kind to include (upper bounds; sources are shuffled with `seed` first)."""

    harmful: int = 1000
    harmless: int = 3000
    ab_per_behaviour: int = 400
    behaviours: tuple[str, ...] = AB_BEHAVIOURS
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.harmful, self.harmless, self.ab_per_behaviour) < 0:
            raise CorpusError("corpus sizes must be ≥ 0")


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def evaluation_prompts() -> frozenset[str]:
    """Normalised texts of the steering evaluation sets (to exclude them from training corpora)."""
    texts: set[str] = set()
    for name, split in EVALUATION_SETS:
        texts.update(_norm(item.prompt) for item in load_dataset(name, split=split))  # type: ignore[union-attr]
    return frozenset(texts)


def overlaps(text: str, exclude: frozenset[str]) -> bool:
    """True when `text` equals, contains or is contained in an excluded text (normalised).

    Containment matters: JailbreakBench rewrote many AdvBench prompts by trimming them, so an exact
    match alone would let near-copies of the evaluation prompts into training data.
    """
    key = _norm(text)
    return key in exclude or any(e in key or key in e for e in exclude)


def _prompts(items: Iterable[Any], exclude: frozenset[str], seen: set[str]) -> list[str]:
    out = []
    for item in items:
        assert isinstance(item, PromptItem)
        key = _norm(item.prompt)
        if key in seen or overlaps(key, exclude):
            continue
        seen.add(key)
        out.append(item.prompt)
    return out


def _take(rng: random.Random, values: Sequence[str], n: int) -> list[str]:
    values = list(values)
    rng.shuffle(values)
    return values[:n]


def training_texts(tokenizer: Any, spec: CorpusSpec = CorpusSpec()) -> list[tuple[str, str]]:
    """(source, chat-formatted text) pairs in a seeded shuffled order.

    Harmful prompts: refusal-direction train+val (JailbreakBench-origin rows dropped) and AdvBench;
    harmless: refusal-direction-harmless train; A/B: each behaviour's `generate` split as a user turn
    plus an answer turn "(X) option text", alternating the matching and the other answer.
    """
    rng = random.Random(spec.seed)
    exclude = evaluation_prompts()
    seen: set[str] = set()
    harmful_items = [
        *load_dataset("refusal-direction-harmful", "train", exclude_origins="jailbreakbench"),
        *load_dataset("refusal-direction-harmful", "val", exclude_origins="jailbreakbench"),
        *load_dataset("advbench"),
    ]
    harmful = _take(rng, _prompts(harmful_items, exclude, seen), spec.harmful)
    harmless = _take(
        rng, _prompts(load_dataset("refusal-direction-harmless", "train"), exclude, seen), spec.harmless
    )
    texts = [("harmful", chat_prompt(tokenizer, p)) for p in harmful]
    texts += [("harmless", chat_prompt(tokenizer, p)) for p in harmless]
    for behaviour in spec.behaviours:
        items = load_ab_items(behaviour, "generate")
        rng.shuffle(items)
        for i, item in enumerate(items[: spec.ab_per_behaviour]):
            letter = item.matching_letter if i % 2 == 0 else item.not_matching_letter
            answer = f"({letter}) {item.answer_text(letter)}"
            texts.append((f"ab:{behaviour}", chat_prompt(tokenizer, item.question, assistant_prefix=answer)))
    if not texts:
        raise CorpusError("the corpus spec selects no text")
    rng.shuffle(texts)
    return texts


def heldout_texts(
    tokenizer: Any, n_per_source: int = 100, n_ab_per_behaviour: int = 20, seed: int = 1
) -> list[tuple[str, str]]:
    """Texts from test splits only (never in `training_texts`): for measuring an SAE on new data."""
    rng = random.Random(seed)
    exclude = evaluation_prompts()
    seen: set[str] = set()
    harmful = _prompts(
        load_dataset("refusal-direction-harmful", "test", exclude_origins="jailbreakbench"), exclude, seen
    )
    harmless = _prompts(load_dataset("refusal-direction-harmless", "test"), exclude, seen)
    texts = [("harmful", chat_prompt(tokenizer, p)) for p in _take(rng, harmful, n_per_source)]
    texts += [("harmless", chat_prompt(tokenizer, p)) for p in _take(rng, harmless, n_per_source)]
    for behaviour in AB_BEHAVIOURS:
        for i, item in enumerate(load_ab_items(behaviour, "test_ab", limit=n_ab_per_behaviour)):
            letter = item.matching_letter if i % 2 == 0 else item.not_matching_letter
            answer = f"({letter}) {item.answer_text(letter)}"
            texts.append((f"ab:{behaviour}", chat_prompt(tokenizer, item.question, assistant_prefix=answer)))
    rng.shuffle(texts)
    return texts


def with_generations(
    lm: LoadedModel, texts: Sequence[tuple[str, str]], n: int, max_new_tokens: int = 48, batch_size: int = 16
) -> list[tuple[str, str]]:
    """Append the model's greedy replies to the first `n` prompt-only texts (harmful / harmless).

    The SAE then sees the model's own refusals and compliances, the answer tokens STA encodes.
    """
    if n <= 0:
        return list(texts)
    prompts = [(i, text) for i, (source, text) in enumerate(texts) if source in ("harmful", "harmless")][:n]
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    replies = generate(lm, [t for _, t in prompts], config, progress=True)
    out = list(texts)
    for (i, text), reply in zip(prompts, replies, strict=True):
        if reply.strip():
            out[i] = (f"{texts[i][0]}+reply", text + reply)
    return out


__all__ = [
    "AB_BEHAVIOURS",
    "EVALUATION_SETS",
    "CorpusError",
    "CorpusSpec",
    "evaluation_prompts",
    "heldout_texts",
    "overlaps",
    "training_texts",
    "with_generations",
]
