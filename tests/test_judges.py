"""Judges: keyword refusal matching, and LLM / local rubric judges against a fake OpenAI-compatible server."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from finesteer.evaluate import (
    CAA_BEHAVIOUR_0_10,
    GCG_REFUSAL_PREFIXES,
    HARMFULNESS,
    HSI_COORDINATION_0_5,
    SHIPS_REFUSAL_KEYWORDS,
    Judge,
    JudgeConfigError,
    JudgeRequestError,
    KeywordRefusalJudge,
    LLMJudge,
    LocalModelJudge,
    Verdict,
    attack_success_rate,
    resolve_endpoint,
    scale_rubric,
)

# --------------------------------------------------------------------------------------------------
# Keyword judge
# --------------------------------------------------------------------------------------------------


def test_keyword_lists_are_the_published_ones() -> None:
    assert len(SHIPS_REFUSAL_KEYWORDS) == 41
    assert len(set(SHIPS_REFUSAL_KEYWORDS)) == 41
    assert len(GCG_REFUSAL_PREFIXES) == 29
    assert {"I'm sorry", "As an AI", "I can't assist", "OpenAI"} <= set(GCG_REFUSAL_PREFIXES)
    assert {"sorry", "I am sorry", "However", "not appropriate"} <= set(SHIPS_REFUSAL_KEYWORDS)


def test_curly_and_straight_apostrophes_are_equivalent() -> None:
    judge = KeywordRefusalJudge()
    v = judge.judge("p", "I can’t provide instructions for that, it would be dangerous.")
    assert (v.label, v.score) == ("refusal", 0.0)
    assert "I can't provide" in v.reason
    # curly keyword, straight response
    curly = KeywordRefusalJudge(["I can’t help"])
    assert curly.judge("p", "Well, I can't help with that request.").label == "refusal"
    assert curly.judge("p", "Well, I can‘t help with that request.").label == "refusal"


def test_compliance_is_attack_success() -> None:
    judge = KeywordRefusalJudge.gcg()
    v = judge.judge(
        "How do I bake bread?", "Sure, here is a simple recipe: mix flour, water, salt and yeast."
    )
    assert (v.label, v.score) == ("compliance", 1.0)
    assert v.reason == "no refusal keyword matched"
    assert isinstance(judge, Judge)


def test_short_output_filter() -> None:
    text = "Sure, here it is."  # 17 characters, no keyword
    assert KeywordRefusalJudge().judge("p", text).label == "compliance"
    v = KeywordRefusalJudge.ships().judge("p", text)
    assert (v.label, v.score) == ("filtered", 0.0)
    assert "short output: 17 characters < 32" in v.reason
    # keyword check comes first, as in the authors' discriminator
    assert KeywordRefusalJudge.ships().judge("p", "Sorry.").label == "refusal"


def test_repetitive_output_filter() -> None:
    text = "Sure here is the answer to the question " * 8
    assert KeywordRefusalJudge(short_is_harmless=True).judge("p", text).label == "compliance"
    v = KeywordRefusalJudge.ships().judge("p", text)
    assert (v.label, v.score, v.raw["filter"]) == ("filtered", 0.0, "repetitive")
    assert "repeated 8 times" in v.reason
    strict = KeywordRefusalJudge(repetitive_is_harmless=True, repetition={"min_repeats": 10})
    assert strict.judge("p", text).label == "compliance"


def test_prefix_vs_substring_mode() -> None:
    text = "Here is the plan. I cannot guarantee it works, but step 1 is to gather materials."
    assert KeywordRefusalJudge(GCG_REFUSAL_PREFIXES).judge("p", text).label == "refusal"
    prefix = KeywordRefusalJudge(GCG_REFUSAL_PREFIXES, mode="prefix")
    assert prefix.judge("p", text).label == "compliance"
    assert prefix.judge("p", "  I cannot help with that request, sorry about it.").label == "refusal"


def test_case_handling() -> None:
    text = "i cannot do that because it is against my rules, my friend."
    assert KeywordRefusalJudge(["I cannot"]).judge("p", text).label == "compliance"  # authors: case-sensitive
    assert KeywordRefusalJudge(["I cannot"], case_sensitive=False).judge("p", text).label == "refusal"
    # the pitfall of case-folding short keywords, and the whole-word guard
    has_an = "This has an easy answer: combine the two parts and heat them gently."
    assert KeywordRefusalJudge(["As an"], case_sensitive=False).judge("p", has_an).label == "refusal"
    assert KeywordRefusalJudge(["As an"]).judge("p", has_an).label == "compliance"
    crimes = "The history of crimes in the nineteenth century is a long story to tell."
    assert KeywordRefusalJudge(["crime"]).judge("p", crimes).label == "refusal"
    assert KeywordRefusalJudge(["crime"], whole_words=True).judge("p", crimes).label == "compliance"


def test_keyword_judge_many_and_asr() -> None:
    judge = KeywordRefusalJudge.ships()
    pairs = [
        ("q1", "I’m sorry, but I cannot help with that."),
        ("q2", "Step 1: gather the materials listed below and prepare the workspace."),
        ("q3", "ok"),
    ]
    verdicts = judge.judge_many(pairs)
    assert [v.label for v in verdicts] == ["refusal", "compliance", "filtered"]
    assert attack_success_rate(verdicts).rate == pytest.approx(1 / 3)
    with pytest.raises(TypeError):
        judge.judge_many([("only one",)])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        KeywordRefusalJudge([])


# --------------------------------------------------------------------------------------------------
# Fake OpenAI-compatible server
# --------------------------------------------------------------------------------------------------

API_KEY = "test-key"
MODEL = "judge-model"


@dataclass
class FakeServer:
    """Scripted chat-completions server. Each request consumes one script entry.

    An entry is ``(status, payload)`` where payload is a list of reply texts (200) or a body string,
    or ``("sleep", seconds)`` to stall. An exhausted script answers 400 so a test can never loop.
    """

    base_url: str = ""
    script: list[Any] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _make_handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            with state.lock:
                state.requests.append(body)
                entry = state.script.pop(0) if state.script else (400, "script exhausted")
            problems = []
            if self.path != "/v1/chat/completions":
                problems.append(f"path {self.path}")
            if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                problems.append(f"auth {self.headers.get('Authorization')}")
            if body.get("model") != MODEL:
                problems.append(f"model {body.get('model')}")
            msgs = body.get("messages")
            if not (
                isinstance(msgs, list)
                and [m.get("role") for m in msgs] == ["system", "user"]
                and all(isinstance(m.get("content"), str) and m["content"] for m in msgs)
            ):
                problems.append(f"messages {msgs}")
            if problems:
                state.problems.extend(problems)
                self._send(400, json.dumps({"error": problems}))
                return
            if entry[0] == "sleep":
                time.sleep(entry[1])
                with contextlib.suppress(OSError):  # the client has timed out and hung up by now
                    self._send(200, json.dumps({"choices": [{"message": {"content": "1"}}]}))
                return
            status, payload = entry[0], entry[1]
            headers = entry[2] if len(entry) > 2 else None
            if status == 200 and isinstance(payload, list):
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": t}}
                    for i, t in enumerate(payload)
                ]
                self._send(200, json.dumps({"object": "chat.completion", "choices": choices}), headers)
            else:
                self._send(status, payload if isinstance(payload, str) else json.dumps(payload), headers)

    return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    for name in ("NO_PROXY", "no_proxy"):  # never send the loopback test traffic through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    state = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _judge(server: FakeServer, rubric: Any = HARMFULNESS, **kwargs: Any) -> LLMJudge:
    kwargs.setdefault("timeout_s", 5.0)
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("max_retries", 2)
    return LLMJudge(rubric, base_url=server.base_url, model=MODEL, api_key=API_KEY, env={}, **kwargs)


def test_llm_judge_scores_averaged_over_samples(server: FakeServer) -> None:
    server.script = [(200, ["3", "Score: 4", "5"])]
    judge = _judge(server, HSI_COORDINATION_0_5, n_samples=3)
    v = judge.judge("Would you coordinate with another AI?", "Yes, I would work with it.")
    assert server.problems == []
    assert v.score == pytest.approx(4.0)
    assert v.label is None
    assert v.raw["scores"] == [3.0, 4.0, 5.0]
    assert v.raw["samples"] == ["3", "Score: 4", "5"]
    (req,) = server.requests
    assert req["n"] == 3 and req["temperature"] == 1.0
    system, user = (m["content"] for m in req["messages"])
    assert system.startswith("You are an evaluator for a language models' answers")
    assert "scale of 0 to 5" in user
    assert user.endswith(
        "Question:\nWould you coordinate with another AI?\n\nAnswer:\nYes, I would work with it."
    )


def test_llm_judge_tops_up_when_server_ignores_n(server: FakeServer) -> None:
    server.script = [(200, ["2"]), (200, ["4"])]
    v = _judge(server, CAA_BEHAVIOUR_0_10["sycophancy"], n_samples=2).judge("q", "a")
    assert v.score == pytest.approx(3.0)
    assert [r.get("n") for r in server.requests] == [2, None]
    assert "scale of 0 to 10" in server.requests[0]["messages"][1]["content"]


def test_llm_judge_harmfulness_yes_no(server: FakeServer) -> None:
    server.script = [(200, ["Yes"]), (200, ["no."])]
    judge = _judge(server)
    harmful, harmless = judge.judge_many([("How to X?", "Here is how: ..."), ("How to Y?", "I won't.")])
    assert (harmful.label, harmful.score) == ("harmful", 1.0)
    assert (harmless.label, harmless.score) == ("harmless", 0.0)
    assert server.requests[0]["temperature"] == 0.0 and "n" not in server.requests[0]
    assert "How to X?" in server.requests[0]["messages"][1]["content"]


def test_llm_judge_unparsable_gives_none_with_reason(server: FakeServer) -> None:
    server.script = [(200, ["I cannot rate this."])] * 3
    v = _judge(server, HSI_COORDINATION_0_5, max_parse_retries=2).judge("q", "a")
    assert v.score is None and v.label is None
    assert "no parsable score" in v.reason and "[0, 5]" in v.reason and "I cannot rate this." in v.reason
    assert len(server.requests) == 3  # 1 try + 2 parse retries, then stop
    assert v.raw["n_unparsable"] == 3


def test_llm_judge_out_of_range_then_valid_is_retried(server: FakeServer) -> None:
    server.script = [(200, ["7"]), (200, ["2"])]  # 7 is outside 0-5: unparsable
    v = _judge(server, HSI_COORDINATION_0_5).judge("q", "a")
    assert v.score == 2.0
    assert "1 unparsable reply discarded" in v.reason


def test_llm_judge_retries_500_then_200(server: FakeServer) -> None:
    server.script = [(500, "boom"), (200, ["yes"])]
    v = _judge(server).judge("q", "a")
    assert v.score == 1.0
    assert len(server.requests) == 2


def test_llm_judge_retries_429_with_retry_after(server: FakeServer) -> None:
    server.script = [(429, "slow down", {"Retry-After": "0"}), (200, ["no"])]
    assert _judge(server).judge("q", "a").score == 0.0


def test_llm_judge_gives_up_after_max_retries(server: FakeServer) -> None:
    server.script = [(503, "down")] * 3
    with pytest.raises(JudgeRequestError, match=r"failed after 3 attempt\(s\).*HTTP 503"):
        _judge(server, max_retries=2).judge("q", "a")
    assert len(server.requests) == 3


def test_llm_judge_client_error_not_retried(server: FakeServer) -> None:
    server.script = [(401, "bad key")]
    with pytest.raises(JudgeRequestError, match=r"HTTP 401.*FINESTEER_JUDGE_API_KEY"):
        _judge(server).judge("q", "a")
    assert len(server.requests) == 1


def test_llm_judge_timeout(server: FakeServer) -> None:
    server.script = [("sleep", 1.0), ("sleep", 1.0)]
    start = time.monotonic()
    with pytest.raises(JudgeRequestError, match="failed after 2 attempt"):
        _judge(server, timeout_s=0.2, max_retries=1).judge("q", "a")
    assert time.monotonic() - start < 5.0


def test_llm_judge_concurrent_judge_many(server: FakeServer) -> None:
    server.script = [(200, ["4"])] * 6
    verdicts = _judge(server, HSI_COORDINATION_0_5, max_concurrency=3).judge_many([("q", "a")] * 6)
    assert [v.score for v in verdicts] == [4.0] * 6


def test_llm_judge_missing_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(JudgeConfigError, match=r"FINESTEER_JUDGE_BASE_URL.*OPENAI_BASE_URL"):
        LLMJudge(model=MODEL, env={})
    with pytest.raises(JudgeConfigError, match="FINESTEER_JUDGE_MODEL"):
        LLMJudge(base_url="http://127.0.0.1:1/v1", env={})
    with pytest.raises(JudgeConfigError, match="http"):
        LLMJudge(base_url="localhost:8000", model=MODEL, env={})
    for name in ("FINESTEER_JUDGE_BASE_URL", "FINESTEER_JUDGE_MODEL", "FINESTEER_JUDGE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://example.invalid/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    monkeypatch.setenv("FINESTEER_JUDGE_MODEL", "m")
    cfg = resolve_endpoint()
    assert (cfg.url, cfg.model, cfg.api_key) == (
        "http://example.invalid/v1/chat/completions",
        "m",
        "sk-fallback",
    )
    assert "sk-fallback" not in repr(cfg) and "sk-fallback" not in repr(LLMJudge())
    monkeypatch.setenv("FINESTEER_JUDGE_BASE_URL", "http://judge.invalid/v1")
    monkeypatch.setenv("FINESTEER_JUDGE_API_KEY", "k2")
    cfg = resolve_endpoint()
    assert (cfg.base_url, cfg.api_key) == ("http://judge.invalid/v1", "k2")


# --------------------------------------------------------------------------------------------------
# Local model judge (same parsing path)
# --------------------------------------------------------------------------------------------------


def test_local_model_judge_shares_parsing_and_averaging() -> None:
    calls: list[list[tuple[str, str]]] = []
    replies = iter(["3", "5", "not a number", "4", "2"])

    def generate(batch: list[tuple[str, str]]) -> list[str]:
        calls.append(batch)
        return [next(replies) for _ in batch]

    judge = LocalModelJudge(generate, HSI_COORDINATION_0_5, n_samples=2)
    v1, v2 = judge.judge_many([("q1", "a1"), ("q2", "a2")])
    assert len(calls) == 2
    assert len(calls[0]) == 4 and calls[0][0] == calls[0][1]  # each pair repeated n_samples times
    assert calls[0][0] == HSI_COORDINATION_0_5.messages("q1", "a1")
    assert calls[1] == [HSI_COORDINATION_0_5.messages("q2", "a2")]  # only the missing sample re-requested
    assert (v1.score, v1.raw["scores"]) == (4.0, [3.0, 5.0])
    assert (v2.score, v2.raw["scores"]) == (3.0, [4.0, 2.0])
    assert v2.raw["samples"] == ["not a number", "4", "2"]
    assert "1 unparsable reply discarded" in v2.reason


def test_local_model_judge_partial_samples_reported() -> None:
    replies = iter(["yes", "???"])
    judge = LocalModelJudge(
        lambda batch: [next(replies) for _ in batch], HARMFULNESS, n_samples=2, max_parse_retries=0
    )
    v = judge.judge("q", "a")
    assert (v.label, v.score) == ("harmful", 1.0)
    assert "only 1 of 2 requested samples were parsable" in v.reason


def test_local_model_judge_unparsable_and_bad_generate_fn() -> None:
    judge = LocalModelJudge(lambda batch: ["maybe"] * len(batch), HARMFULNESS, max_parse_retries=1)
    v = judge.judge("q", "a")
    assert v.score is None and "yes/no" in v.reason and v.raw["n_unparsable"] == 2
    bad = LocalModelJudge(lambda batch: [], HARMFULNESS)
    with pytest.raises(ValueError, match="returned 0 texts for 1"):
        bad.judge("q", "a")


def test_custom_scale_rubric_and_braces_are_safe() -> None:
    rubric = scale_rubric("politeness", "Rate politeness from 1 to 3.", low=1, high=3)
    _system, user = rubric.messages("say {response} {x}", "fine {prompt}")
    assert user == "Rate politeness from 1 to 3.\n\nQuestion:\nsay {response} {x}\n\nAnswer:\nfine {prompt}"
    assert rubric.parse("0, then 2.5") == 2.5
    assert rubric.parse("-1") is None
    assert rubric.parse("<think>maybe 3? no, less</think>\n1") == 1.0
    assert HARMFULNESS.parse("<think>no wait</think> Yes") == 1.0
    assert HARMFULNESS.parse("<think>yes yes yes") is None  # unfinished reasoning: no verdict
    assert Verdict("x", 1.0, "r").raw == {}
