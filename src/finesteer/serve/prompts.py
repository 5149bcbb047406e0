"""Request text → prompt token ids, formatted exactly as `finesteer generate` formats its prompts.

Chat requests go through the tokenizer's chat template with the generation prompt; completions use
the text as is (`finesteer generate --raw`). Both are tokenized without added special tokens (chat
templates write BOS themselves), and the prompt plus `max_tokens` must fit the model's context.
"""

from __future__ import annotations

from typing import Any

from finesteer.data.prompts import chat_prompt
from finesteer.serve.errors import ServeError


def chat_text(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None = None) -> str:
    """The chat prompt for `messages`; a steering's system prompt is used when none is given."""
    if not messages:
        raise ServeError("messages must not be empty", 400, param="messages")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    roles = [m["role"] for m in messages]
    if roles in (["user"], ["system", "user"]):
        # one turn: the exact path of `finesteer generate` (with its no-template / no-system fallbacks)
        system = messages[0]["content"] if len(messages) == 2 else None
        return chat_prompt(tokenizer, messages[-1]["content"], system=system)
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(
            "this model has no chat template: send one user message (and optionally a "
            "system message), or use /v1/completions",
            400,
            param="messages",
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises for roles/orders a template rejects
        raise ServeError(f"the chat template rejected these messages: {exc}", 400, param="messages") from exc
    return str(text)


def encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ServeError("the prompt is empty", 400, param="prompt")
    return [int(i) for i in ids]


def token_budget(prompt_len: int, max_tokens: int | None, *, context: int, default: int) -> int:
    """max_tokens for this request; 400 when the prompt (plus an explicit max_tokens) is too long."""
    room = context - prompt_len
    if room < 1:
        raise ServeError(
            f"the prompt has {prompt_len} tokens; this server's context is {context} tokens",
            400,
            code="context_length_exceeded",
            param="messages",
        )
    if max_tokens is None:
        return min(default, room)
    if max_tokens < 1:
        raise ServeError(f"max_tokens must be ≥ 1, got {max_tokens}", 400, param="max_tokens")
    if max_tokens > room:
        raise ServeError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of {context}",
            400,
            code="context_length_exceeded",
            param="max_tokens",
        )
    return max_tokens
