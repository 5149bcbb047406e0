"""Request bodies of the OpenAI endpoints plus finesteer's extra fields (`intervention`, `scale`).

Unknown fields are ignored, as OpenAI-compatible servers usually do, so clients that send extra
options still work; fields that change the answer but are not supported (n > 1, logprobs) are
refused by the handlers rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; content parts of type "text" are joined (images are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class CompletionFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    intervention: Any = Field(default=None, description="name, or list of names / {name, scale}")
    scale: Any = Field(default=None, description="multiplier of every named intervention's strength")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatRequest(CompletionFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(CompletionFields):
    prompt: str | list[str]
    echo: bool = False


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
