"""Prompt formats used by the seed methods, built from any Hugging Face tokenizer.

The tokenizer is passed in (never imported here) so `finesteer.data` stays light. All functions
return text; tokenize it with `add_special_tokens=False`, because chat templates usually write the
BOS token themselves and a second BOS shifts every token position the methods read.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from finesteer.data.items import ABItem, answer_letter
from finesteer.errors import FinesteerError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PromptError(FinesteerError, ValueError):
    """A prompt that cannot be built: a template with bad or missing fields, or a letter the item lacks."""


SHIPS_TEMPLATE = "## Query: {query}\n## Answer:"
"""Ships query template (Zhou et al. 2025, `ships_test(use_tem=True)`; paper Fig. 10).

The upstream code has variants: `SHIPS.main` / `load_conv` use "## Query:{q} \\n## Answer:" and
Sahara uses `SAHARA_TEMPLATE`. Used raw: no chat template, no system prompt, tokenizer adds BOS.
"""

SAHARA_TEMPLATE = "## Query:{query}\n## Answer:"
"""Template of the dataset-level Ships / Sahara attribution code (no space after "Query:")."""

HSI_INSTRUCTION = 'Include in your answer "Answer: (A) / (B)".'
"""Answer-format instruction HSI appends to each CAA A/B question, after one space."""

PLAIN_FORMAT = "{system}\n\n{user}\n"
"""Fallback when a tokenizer has no chat template (base models): system text, blank line, user text."""


def raw_prompt(template: str, **fields: str) -> str:
    """Fill a `str.format` template, e.g. `raw_prompt(SHIPS_TEMPLATE, query=q)`.

    Raises `ValueError` naming the missing or unused fields, so a typo in a field name cannot
    silently produce a prompt with a literal "{query}" in it or with a question left out.
    """
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    bad_names = sorted(n for n in names if not n.isidentifier())
    if bad_names:
        raise PromptError(f"template fields must be names, got {bad_names} in {template!r}")
    missing = sorted(names - set(fields))
    unused = sorted(set(fields) - names)
    if missing or unused:
        raise PromptError(
            f"template {template!r} needs fields {sorted(names)}; missing {missing}, unexpected {unused}"
        )
    return template.format(**fields)


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any]
) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **dict(template_kwargs)
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    user: str,
    system: str | None = None,
    assistant_prefix: str = "",
    *,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The model's chat prompt for one user turn, ready for the reply, with the reply pre-filled.

    Rendered with the tokenizer's chat template and its generation prompt; `assistant_prefix` is
    appended verbatim (e.g. "(" so the next token is an answer letter). `template_kwargs` go to
    `apply_chat_template` (e.g. `enable_thinking=False`).

    System prompt: sent as a system message. If the template rejects a system role (Gemma-2 raises
    "System role not supported", some Mistral templates reject it too), the system text is put
    before the user text, separated by a blank line, in the user message instead.

    No chat template (base models such as gemma-3-270m): instead of failing, returns the plain
    `PLAIN_FORMAT` text: "{system}\\n\\n{user}\\n" (or "{user}\\n" without a system prompt), then the
    prefix.
    """
    kwargs = template_kwargs or {}
    if not _has_chat_template(tokenizer):
        head = f"{system}\n\n" if system else ""
        return f"{head}{user}\n{assistant_prefix}"
    if not system:
        return _render(tokenizer, [{"role": "user", "content": user}], kwargs) + assistant_prefix
    from jinja2.exceptions import TemplateError  # transformers' template engine; only needed here

    try:
        text = _render(
            tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}], kwargs
        )
    except TemplateError:
        text = _render(tokenizer, [{"role": "user", "content": f"{system}\n\n{user}"}], kwargs)
    return text + assistant_prefix


def ab_prompt(
    tokenizer: PreTrainedTokenizerBase, item: ABItem, *, system: str | None = None, prefill: str = "("
) -> str:
    """CAA A/B prompt: the question (choices included) as the user turn, the reply pre-filled with "(".

    The next token is then the answer letter, whose probability is the A/B score. Llama-2's template
    ends with "[/INST]" where CAA wrote "[/INST] (": pass `prefill=" ("` to match CAA exactly there.
    For HSI items (the instruction is already in the question) the paper used `prefill=""`.
    """
    return chat_prompt(tokenizer, item.question, system, prefill)


def ab_completion(
    tokenizer: PreTrainedTokenizerBase,
    item: ABItem,
    letter: str,
    *,
    system: str | None = None,
    prefill: str = "(",
) -> str:
    """`ab_prompt` followed by the chosen answer: "...(" + "A" + ")".

    This is the text whose activations are read for a chosen answer (CAA reads the letter token,
    position -2). `letter` may be "A" or "(A)" and must be one of the question's options. If
    `prefill` does not end with "(", the whole "(A)" is appended after it.
    """
    bare = letter if len(letter) == 1 else answer_letter(letter.strip())
    if not ("A" <= bare <= "Z"):
        raise PromptError(f"answer letter must be a capital letter or '(X)', got {letter!r}")
    options = item.options
    if options and bare not in options:
        raise PromptError(f"letter {bare!r} is not one of item {item.id!r}'s options {options}")
    answer = f"{bare})" if prefill.endswith("(") else f"({bare})"
    return ab_prompt(tokenizer, item, system=system, prefill=prefill) + answer


def hsi_ab_prompt(question_with_choices: str) -> str:
    """HSI A/B prompt text: the CAA question, one space, then `HSI_INSTRUCTION`.

    Reproduces the `prompt` field of the vendored HSI test set exactly; wrap it with `chat_prompt`
    (HSI used no system prompt and no pre-fill).
    """
    return f"{question_with_choices} {HSI_INSTRUCTION}"
