"""Rubric judge over any OpenAI-compatible ``/chat/completions`` endpoint (stdlib HTTP): endpoint
resolution from arguments and environment variables, retries with exponential back-off.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from finesteer.errors import FinesteerError
from finesteer.evaluate.judges.prompts import HARMFULNESS
from finesteer.evaluate.judges.rubric import ChatMessages, Rubric, RubricJudge

__all__ = ["EndpointConfig", "JudgeConfigError", "JudgeRequestError", "LLMJudge", "resolve_endpoint"]


class JudgeConfigError(FinesteerError, ValueError):
    """The judge endpoint / model is not configured."""


class JudgeRequestError(FinesteerError, RuntimeError):
    """The judge endpoint could not be reached or answered with an error."""


ENV_BASE_URL = ("FINESTEER_JUDGE_BASE_URL", "OPENAI_BASE_URL")
ENV_MODEL = ("FINESTEER_JUDGE_MODEL",)
ENV_API_KEY = ("FINESTEER_JUDGE_API_KEY", "OPENAI_API_KEY")
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class EndpointConfig:
    """Resolved judge endpoint. ``api_key`` may be None (local servers often need none)."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The chat-completions URL: ``{base_url}/chat/completions`` unless already given."""
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _first_env(names: Sequence[str], env: Mapping[str, str]) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def resolve_endpoint(
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> EndpointConfig:
    """Resolve the judge endpoint from arguments, then environment variables.

    base URL: ``base_url`` > ``FINESTEER_JUDGE_BASE_URL`` > ``OPENAI_BASE_URL``; model: ``model`` >
    ``FINESTEER_JUDGE_MODEL``; key: ``api_key`` > ``FINESTEER_JUDGE_API_KEY`` > ``OPENAI_API_KEY``
    (optional). There is deliberately no default base URL: responses are sent only where configured.
    """
    env = os.environ if env is None else env
    url = base_url or _first_env(ENV_BASE_URL, env)
    if not url:
        raise JudgeConfigError(
            "no judge endpoint configured: pass base_url=... or set FINESTEER_JUDGE_BASE_URL "
            "(fallback OPENAI_BASE_URL), e.g. https://api.openai.com/v1 or http://localhost:8000/v1"
        )
    if not url.startswith(("http://", "https://")):
        raise JudgeConfigError(f"judge base URL must start with http:// or https://, got {url!r}")
    name = model or _first_env(ENV_MODEL, env)
    if not name:
        raise JudgeConfigError("no judge model configured: pass model=... or set FINESTEER_JUDGE_MODEL")
    key = api_key or _first_env(ENV_API_KEY, env)
    return EndpointConfig(base_url=url, model=name, api_key=key)


def _message_text(choice: Any) -> str:
    """Text of one chat-completion choice; "" when absent (counts as unparsable, not as 0)."""
    if not isinstance(choice, Mapping):
        return ""
    message = choice.get("message")
    content = message.get("content") if isinstance(message, Mapping) else choice.get("text")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


class LLMJudge(RubricJudge):
    """Rubric judge backed by any OpenAI-compatible ``/chat/completions`` endpoint (stdlib HTTP).

    ``n_samples`` replies are drawn per pair (sent as the ``n`` parameter when ``send_n``; servers that
    ignore it are topped up with further requests) and their parsed scores averaged. ``temperature``
    defaults to 0 for one sample and 1 for several (HSI: n=5, T=1; CAA: n=1, T=0, max_tokens=10).
    HTTP 408/409/425/429/5xx, timeouts and connection errors are retried ``max_retries`` times with
    exponential backoff (honouring ``Retry-After``); other errors raise :class:`JudgeRequestError`.
    """

    def __init__(
        self,
        rubric: Rubric = HARMFULNESS,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        n_samples: int = 1,
        temperature: float | None = None,
        max_tokens: int | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_parse_retries: int = 2,
        max_concurrency: int = 1,
        send_n: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(rubric, n_samples=n_samples, max_parse_retries=max_parse_retries)
        self.config = resolve_endpoint(base_url, model, api_key, env=env)
        if timeout_s <= 0:
            raise JudgeConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise JudgeConfigError("max_retries, backoff_s and max_backoff_s must be >= 0")
        if max_concurrency < 1:
            raise JudgeConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.temperature = (0.0 if n_samples == 1 else 1.0) if temperature is None else float(temperature)
        self.max_tokens = max_tokens
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_concurrency = max_concurrency
        self.send_n = send_n
        self.extra_body: Mapping[str, Any] = MappingProxyType(dict(extra_body or {}))

    def __repr__(self) -> str:
        return (
            f"LLMJudge(rubric={self.rubric.name!r}, model={self.config.model!r}, url={self.config.url!r}, "
            f"n_samples={self.n_samples}, temperature={self.temperature})"
        )

    def _complete(self, messages: Sequence[ChatMessages], counts: Sequence[int]) -> list[list[str]]:
        jobs = list(zip(messages, counts, strict=True))
        if self.max_concurrency == 1 or len(jobs) <= 1:
            return [self._complete_one(m, c) for m, c in jobs]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self._complete_one(*job), jobs))

    def _complete_one(self, messages: ChatMessages, count: int) -> list[str]:
        system, user = messages
        texts: list[str] = []
        for _ in range(count):  # bounded: every successful request yields at least one choice
            need = count - len(texts)
            if need <= 0:
                break
            body: dict[str, Any] = {
                "model": self.config.model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "temperature": self.temperature,
            }
            if self.send_n and need > 1:
                body["n"] = need
            if self.max_tokens is not None:
                body["max_tokens"] = self.max_tokens
            body.update(self.extra_body)
            data = self._post(body)
            choices = data.get("choices") if isinstance(data, Mapping) else None
            if not isinstance(choices, list) or not choices:
                raise JudgeRequestError(
                    f"judge endpoint {self.config.url} returned no choices: {str(data)[:300]}"
                )
            texts.extend(_message_text(c) for c in choices[:need])
        return texts

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(self.max_backoff_s, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to exponential backoff
        base = min(self.max_backoff_s, self.backoff_s * (2.0**attempt))
        return base * (1.0 + 0.1 * random.random())

    def _post(self, body: Mapping[str, Any]) -> Any:
        url = self.config.url
        payload = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
            retry_after: str | None = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:500].decode("utf-8", "replace")
                err.close()
                if err.code not in _RETRY_STATUS:
                    hint = (
                        " (check FINESTEER_JUDGE_API_KEY / OPENAI_API_KEY)" if err.code in (401, 403) else ""
                    )
                    raise JudgeRequestError(
                        f"judge endpoint {url} returned HTTP {err.code}{hint}: {detail}"
                    ) from err
                last_error = f"HTTP {err.code}: {detail}"
                retry_after = err.headers.get("Retry-After") if err.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                last_error = f"{type(err).__name__}: {err}"
            else:
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise JudgeRequestError(
                        f"judge endpoint {url} returned invalid JSON: {raw[:300]!r}"
                    ) from err
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise JudgeRequestError(
            f"judge endpoint {url} failed after {self.max_retries + 1} attempt(s); last error: {last_error}"
        )
