"""Labelled completions: the model's own answers to A/B questions, labelled by the behaviour they show.

HSI's original directions were not read from answer letters pasted after a prompt but from answers the
model wrote itself (sampled, then labelled by whether they chose the behaviour's option), at the
end-of-turn token after the answer. `sample_labelled_completions` does that for any A/B items: sample
`n_samples` replies per item to the HSI-format prompt, parse "(A)"/"(B)" with HSI's rule, and keep the
replies that name exactly one option. A JSONL file of {"prompt", "completion", "label"} rows (e.g. the
paper's hand-picked completions, or answers judged by an LLM) loads with `load_labelled_completions`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from finesteer.activations.directions import LabelledCompletion
from finesteer.data.errors import DatasetError
from finesteer.data.items import ABItem
from finesteer.errors import FinesteerError
from finesteer.generation import GenerationConfig, generate
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import UNDEFINED, ab_generation_prompt, parse_ab_answer

DEFAULT_SAMPLING = GenerationConfig(max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.95, seed=0)
"""The HSI sweep scripts' sampling temperature (0.8) and top-p (0.95); 40 tokens hold the answer line."""


class CompletionError(FinesteerError, ValueError):
    """Completions that cannot give directions (none parsed, one class missing, bad sampling settings)."""


@dataclass(frozen=True)
class SampledAnswer:
    """One sampled reply to an A/B prompt and the option it names (`undefined` when none or both)."""

    item_id: str
    prompt: str
    response: str
    answer: str
    matching_letter: str
    sample: int

    @property
    def defined(self) -> bool:
        return self.answer != UNDEFINED

    @property
    def label(self) -> bool:
        """Shows the behaviour: the reply names the behaviour-matching option."""
        return self.answer == self.matching_letter


@dataclass(frozen=True)
class CompletionSet:
    """Sampled answers plus how they turn into labelled completions (what directions are read from)."""

    answers: tuple[SampledAnswer, ...]
    end_of_turn: str

    def labelled(self) -> list[LabelledCompletion]:
        """(prompt, reply + end-of-turn token, label) for every reply that names one option."""
        return [
            (a.prompt, a.response.rstrip() + self.end_of_turn, a.label) for a in self.answers if a.defined
        ]

    def stats(self) -> dict[str, Any]:
        defined = [a for a in self.answers if a.defined]
        positive = sum(a.label for a in defined)
        return {
            "n_sampled": len(self.answers),
            "n_defined": len(defined),
            "n_matching": positive,
            "n_not_matching": len(defined) - positive,
            "defined_rate": len(defined) / len(self.answers) if self.answers else math.nan,
        }

    def save(self, path: str | Path) -> Path:
        """JSONL, one sampled answer per line (first line: the end-of-turn marker)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"end_of_turn": self.end_of_turn})]
        lines += [json.dumps(asdict(a), ensure_ascii=False) for a in self.answers]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CompletionSet:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
        if not rows or "end_of_turn" not in rows[0]:
            raise CompletionError(f"{path}: not a saved CompletionSet (no end_of_turn header line)")
        return cls(tuple(SampledAnswer(**row) for row in rows[1:]), rows[0]["end_of_turn"])


def end_of_turn_marker(tokenizer: Any) -> str:
    """The token that closes an assistant turn (HSI read its heads there): the tokenizer's EOS text."""
    eos = getattr(tokenizer, "eos_token", None)
    return eos if isinstance(eos, str) else ""


def sample_labelled_completions(
    lm: LoadedModel,
    items: Sequence[ABItem],
    *,
    n_samples: int = 2,
    config: GenerationConfig = DEFAULT_SAMPLING,
    system: str | None = None,
    progress: bool = False,
) -> CompletionSet:
    """Sample `n_samples` replies per item to its HSI-format prompt and parse the option each names.

    Sample s uses seed `config.seed + 1000·s` (batches are seeded further by position, as in
    `finesteer.generation`), so a rerun with the same settings gives the same answers.
    """
    if n_samples < 1:
        raise CompletionError(f"n_samples must be ≥ 1, got {n_samples}")
    if not items:
        raise CompletionError("no A/B items to sample answers for")
    prompts = [ab_generation_prompt(lm.tokenizer, item, system=system)[0] for item in items]
    answers: list[SampledAnswer] = []
    for sample in range(n_samples):
        seed = None if config.seed is None else config.seed + 1000 * sample
        responses = generate(lm, prompts, replace(config, seed=seed), progress=progress)
        for item, prompt, response in zip(items, prompts, responses, strict=True):
            answer = parse_ab_answer(response, item.options)
            answers.append(SampledAnswer(item.id, prompt, response, answer, item.matching_letter, sample))
    return CompletionSet(tuple(answers), end_of_turn_marker(lm.tokenizer))


def check_both_classes(completions: Sequence[LabelledCompletion], where: str) -> None:
    """Directions need replies of both kinds; say how many of each there were otherwise."""
    positive = sum(bool(c[2]) for c in completions)
    if positive == 0 or positive == len(completions):
        raise CompletionError(
            f"{where}: {positive} behaviour-matching and {len(completions) - positive} not-matching "
            "completions; directions need both (sample more replies, or more items)"
        )


def load_labelled_completions(path: str | Path) -> list[LabelledCompletion]:
    """Rows {"prompt": formatted prompt, "completion": reply, "label": true/false} from a JSONL file.

    The prompt must already carry the chat template (as the model saw it); a malformed row raises a
    `DatasetError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"completions file {path} does not exist")
    out: list[LabelledCompletion] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object with prompt, completion and label")
        missing = [key for key in ("prompt", "completion", "label") if key not in row]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {missing}")
        prompt, completion, label = row["prompt"], row["completion"], row["label"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt or not completion:
            raise DatasetError(f"{where}: prompt and completion must be non-empty strings")
        if not isinstance(label, bool):
            raise DatasetError(f"{where}: label must be true or false, got {label!r}")
        out.append((prompt, completion, label))
    if not out:
        raise DatasetError(f"{path}: no completions")
    return out
