"""The OpenAI-compatible server: batched rows with different interventions equal solo runs, errors
are 4xx in OpenAI's shape and leave the server serving, hooks never outlive a request.

A loopback uvicorn server (127.0.0.1, a free port) runs tiny-llama for the whole module; reference
outputs come from `finesteer.generation.generate` (what `finesteer generate` runs), computed while the
server is idle because an `intervene` block edits every forward of the shared model.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from finesteer.artifacts import save_intervention  # noqa: E402
from finesteer.data.prompts import chat_prompt  # noqa: E402
from finesteer.generation import GenerationConfig, generate  # noqa: E402
from finesteer.hooks import live_hook_sets  # noqa: E402
from finesteer.interventions import (  # noqa: E402
    Edit,
    Intervention,
    Op,
    Scope,
    ablate_head,
    steer_head,
    steer_residual,
)
from finesteer.models import LoadedModel, load_model  # noqa: E402
from finesteer.serve import InterventionRegistry, ServeConfig, create_app  # noqa: E402
from finesteer.sites import Site  # noqa: E402

MODEL = "tiny-llama"
TOKENS = 12
USERS = ("hello there", "what is two plus two?", "a much longer prompt about rivers, hills and the sea", "x")


@dataclass(frozen=True, eq=False)
class Boom(Op):
    """An op that fails inside the forward: a request that crashes mid-run."""

    kind: ClassVar[str] = "boom"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@dataclass(frozen=True, eq=False)
class BoomWhenDecoding(Op):
    """Passes at prefill, fails at the first decoding step (one position per row)."""

    kind: ClassVar[str] = "boom_decoding"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            raise RuntimeError("boom while decoding")
        return x


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model(MODEL)


@pytest.fixture(scope="module")
def interventions(lm: LoadedModel) -> dict[str, Intervention]:
    gen = torch.Generator().manual_seed(7)
    d, h = lm.info.head_dim, lm.info.hidden_size
    return {
        "up": steer_head(1, 2, torch.randn(d, generator=gen) * 4),
        "down": steer_head(1, 2, torch.randn(d, generator=gen) * -4, scope="all"),
        "abl": ablate_head(0, 1) + ablate_head(2, 3),
        "resid": steer_residual(1, torch.randn(h, generator=gen) * 2, scope="last"),
    }


@pytest.fixture(scope="module")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, lm: LoadedModel, interventions: dict[str, Intervention]
) -> Path:
    """Artifact folders: one per intervention, plus two made for other models."""
    root = tmp_path_factory.mktemp("artifacts")
    for name, iv in interventions.items():
        save_intervention(root / name, iv, lm)
    other = load_model("tiny-qwen2")
    save_intervention(root / "qwen", steer_head(0, 0, torch.ones(other.info.head_dim)), other)
    save_intervention(
        root / "reweighted",
        interventions["up"],
        model_name=MODEL,
        model_fingerprint="f" * 64,
        model_info=lm.info,
    )
    return root


@pytest.fixture(scope="module")
def registry(
    lm: LoadedModel, interventions: dict[str, Intervention], artifacts: Path
) -> InterventionRegistry:
    reg = InterventionRegistry(lm, allow_dirs=[artifacts])
    for name in interventions:
        reg.load(name, artifacts / name)
    reg.add("boom", Intervention((Edit(Site(1, "z", 0), Boom(), Scope("all")),)))
    reg.add("boom-late", Intervention((Edit(Site(2, "z", 1), BoomWhenDecoding(), Scope("all")),)))
    return reg


@pytest.fixture(scope="module")
def server(lm: LoadedModel, registry: InterventionRegistry) -> Iterator[str]:
    app = create_app(lm, registry, ServeConfig(MODEL, max_batch=16))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "the loopback server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def solo(lm: LoadedModel, interventions: dict[str, Intervention]) -> dict[tuple[str, str | None], str]:
    """Greedy outputs of each (user message, intervention) run alone, as `finesteer generate` runs it."""
    config = GenerationConfig(max_new_tokens=TOKENS)
    refs = {}
    for user in USERS:
        prompt = chat_prompt(lm.tokenizer, user)
        for name in (None, *interventions):
            iv = interventions[name] if name else None
            refs[user, name] = generate(lm, [prompt], config, intervention=iv)[0]
    return refs


def chat(url: str, user: str, intervention: str | None = None, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": TOKENS,
        "temperature": 0,
        **extra,
    }
    if intervention:
        body["intervention"] = intervention
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_outputs_differ_by_intervention(solo: dict[tuple[str, str | None], str]) -> None:
    """Sanity: the interventions change the tiny model's greedy output, so mix-ups would show."""
    for user in USERS:
        assert len({solo[user, name] for name in (None, "up", "down", "abl", "resid")}) >= 3


def test_concurrent_mixed_interventions_equal_solo_runs(
    server: str, solo: dict[tuple[str, str | None], str], lm: LoadedModel
) -> None:
    cases = [(user, name) for user in USERS for name in (None, "up", "down", "abl", "resid")]
    random.Random(0).shuffle(cases)
    steps_before = _health(server)["decode_steps"]
    with ThreadPoolExecutor(len(cases)) as pool:
        outputs = list(pool.map(lambda case: content(chat(server, case[0], case[1])), cases))
    for case, text in zip(cases, outputs, strict=True):
        assert text == solo[case], case
    # shared batches: far fewer decoding steps than requests × tokens
    assert _health(server)["decode_steps"] - steps_before < len(cases) * TOKENS / 2
    assert _health(server)["peak_batch"] > 1
    assert live_hook_sets(lm.model) == []


def test_model_name_suffix_and_composition(
    server: str, lm: LoadedModel, interventions: dict[str, Intervention]
) -> None:
    user = USERS[1]
    by_field = content(chat(server, user, ["up", {"name": "abl"}]))
    body = {
        "model": f"{MODEL}:up+abl",
        "messages": [{"role": "user", "content": user}],
        "max_tokens": TOKENS,
        "temperature": 0,
    }
    by_name = content(httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60))
    scaled = content(chat(server, user, "up", scale=2.5))
    ref = generate(
        lm,
        [chat_prompt(lm.tokenizer, user)],
        GenerationConfig(max_new_tokens=TOKENS),
        intervention=interventions["up"] + interventions["abl"],
    )[0]
    ref_scaled = generate(
        lm,
        [chat_prompt(lm.tokenizer, user)],
        GenerationConfig(max_new_tokens=TOKENS),
        intervention=interventions["up"].scaled(2.5),
    )[0]
    assert by_field == by_name == ref
    assert scaled == ref_scaled


def test_same_as_the_generate_cli(server: str, artifacts: Path) -> None:
    from finesteer.cli import app

    result = CliRunner().invoke(
        app,
        ["generate", MODEL, USERS[0], "-i", str(artifacts / "up"), "--max-new-tokens", str(TOKENS), "--json"],
    )
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout.strip().splitlines()[-1])["output"]
    assert content(chat(server, USERS[0], "up")) == expected


def _sse_text(response: httpx.Response, key: str) -> tuple[str, str | None]:
    text, finish = "", None
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[6:])["choices"][0]
        piece = choice["delta"].get("content") if key == "delta" else choice["text"]
        text += piece or ""
        finish = choice["finish_reason"] or finish
    return text, finish


def test_streaming_equals_non_streaming(server: str) -> None:
    for name in (None, "up"):
        plain = chat(server, USERS[2], name, max_tokens=20)
        streamed = chat(server, USERS[2], name, max_tokens=20, stream=True)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert _sse_text(streamed, "delta") == (content(plain), plain.json()["choices"][0]["finish_reason"])
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 16,
        "temperature": 0,
        "intervention": "abl",
    }
    plain = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    streamed = httpx.post(f"{server}/v1/completions", json={**body, "stream": True}, timeout=60)
    assert plain.status_code == streamed.status_code == 200
    assert _sse_text(streamed, "text")[0] == plain.json()["choices"][0]["text"]


def test_stop_strings_cut_the_text(server: str, solo: dict[tuple[str, str | None], str]) -> None:
    ref = solo[USERS[0], "up"]
    stop = ref[3:5]
    cut = ref[: ref.index(stop)]
    for stream in (False, True):
        response = chat(server, USERS[0], "up", stop=[stop], stream=stream)
        text, finish = (
            _sse_text(response, "delta")
            if stream
            else (content(response), response.json()["choices"][0]["finish_reason"])
        )
        assert (text, finish) == (cut, "stop")


def test_seeded_sampling_is_the_same_alone_and_batched(server: str) -> None:
    def sample() -> str:
        return content(chat(server, USERS[1], "up", temperature=0.9, top_p=0.95, seed=1234))

    alone = sample()
    with ThreadPoolExecutor(8) as pool:
        others = [
            pool.submit(chat, server, user, "down", temperature=1.0, seed=i)
            for i, user in enumerate(USERS * 2)
        ]
        batched = pool.submit(sample).result()
        [f.result() for f in others]
    assert batched == alone


def test_openai_client(server: str, solo: dict[tuple[str, str | None], str]) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    ids = {m.id for m in client.models.list()}
    assert {MODEL, f"{MODEL}:up"} <= ids
    messages = [{"role": "user", "content": USERS[0]}]
    reply = client.chat.completions.create(
        model=f"{MODEL}:up", messages=messages, max_tokens=TOKENS, temperature=0
    )
    assert reply.choices[0].message.content == solo[USERS[0], "up"]
    extra = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0, extra_body={"intervention": "abl"}
    )
    assert extra.choices[0].message.content == solo[USERS[0], "abl"]
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == solo[USERS[0], None]
    with pytest.raises(openai.BadRequestError, match="unknown intervention"):
        client.chat.completions.create(model=f"{MODEL}:nope", messages=messages, max_tokens=2)


def _health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health").json()


def _raw(url: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)


BAD_REQUESTS: list[tuple[str, str, bytes | dict[str, Any], int, str | None]] = [
    (
        "unknown intervention",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "intervention": "nope"},
        400,
        "unknown_intervention",
    ),
    (
        "unknown suffix",
        "/v1/chat/completions",
        {"model": f"{MODEL}:nope", "messages": [{"role": "user", "content": "hi"}]},
        400,
        "unknown_intervention",
    ),
    (
        "NaN scale",
        "/v1/chat/completions",
        b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "intervention": "up",'
        b' "scale": NaN}',
        400,
        "invalid_scale",
    ),
    (
        "huge scale",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "intervention": "up", "scale": 1e9},
        400,
        "invalid_scale",
    ),
    (
        "scale of an ablation",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "intervention": "abl", "scale": 2},
        400,
        "invalid_scale",
    ),
    ("over-long prompt", "/v1/completions", {"prompt": "y" * 5000}, 400, "context_length_exceeded"),
    (
        "too many tokens",
        "/v1/completions",
        {"prompt": "y", "max_tokens": 10_000},
        400,
        "context_length_exceeded",
    ),
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny-llama", "messages": [', 400, "invalid_json"),
    ("missing messages", "/v1/chat/completions", {}, 400, None),
    ("bad temperature", "/v1/completions", {"prompt": "y", "temperature": -1}, 400, None),
    ("n > 1", "/v1/completions", {"prompt": "y", "n": 2}, 400, None),
    ("unknown model", "/v1/completions", {"model": "gpt-4o", "prompt": "y"}, 404, "model_not_found"),
    (
        "artifact for another model",
        "/v1/interventions",
        {"name": "q", "path": "{artifacts}/qwen"},
        400,
        "model_mismatch",
    ),
    (
        "artifact for other weights",
        "/v1/interventions",
        {"name": "r", "path": "{artifacts}/reweighted"},
        400,
        "model_mismatch",
    ),
    (
        "path outside the allowed dir",
        "/v1/interventions",
        {"name": "t", "path": "/tmp"},
        403,
        "path_not_allowed",
    ),
    ("bad name", "/v1/interventions", {"name": "a:b", "path": "{artifacts}/up"}, 400, "invalid_name"),
]


@pytest.mark.parametrize(
    ("what", "path", "body", "status", "code"), BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_request_is_4xx_and_the_server_keeps_serving(
    server: str,
    artifacts: Path,
    solo: dict[tuple[str, str | None], str],
    lm: LoadedModel,
    what: str,
    path: str,
    body: bytes | dict[str, Any],
    status: int,
    code: str | None,
) -> None:
    if isinstance(body, dict):
        body = {"model": MODEL, **body} if path != "/v1/interventions" else body
        raw = json.dumps(body).replace("{artifacts}", str(artifacts)).encode()
    else:
        raw = body
    response = _raw(server, path, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    assert live_hook_sets(lm.model) == []
    assert content(chat(server, USERS[3], "up")) == solo[USERS[3], "up"]


def test_failed_request_leaves_no_hooks(
    server: str, lm: LoadedModel, solo: dict[tuple[str, str | None], str]
) -> None:
    response = chat(server, USERS[0], "boom")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert live_hook_sets(lm.model) == []
    # a failing row in a group of joining rows fails alone
    with ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(chat, server, user, name)
            for user, name in [
                (USERS[0], "up"),
                (USERS[1], "boom"),
                (USERS[2], None),
                (USERS[3], "abl"),
                (USERS[1], "resid"),
            ]
        ]
        results = [f.result() for f in futures]
    assert results[1].status_code == 500
    for response, (user, name) in zip(
        [r for i, r in enumerate(results) if i != 1],
        [(USERS[0], "up"), (USERS[2], None), (USERS[3], "abl"), (USERS[1], "resid")],
        strict=True,
    ):
        assert content(response) == solo[user, name]
    assert live_hook_sets(lm.model) == []


def test_a_row_failing_mid_decoding_fails_alone(
    lm: LoadedModel, registry: InterventionRegistry, solo: dict[tuple[str, str | None], str]
) -> None:
    """All rows share the step that fails (queued before the engine starts): only the culprit fails."""
    from finesteer.serve.engine import Done, Engine, Failed, Job
    from finesteer.serve.sampling import SamplingParams

    cases = [
        (USERS[0], "up"),
        (USERS[1], "boom-late"),
        (USERS[2], None),
        (USERS[3], "abl"),
        (USERS[2], "down"),
    ]
    events: dict[int, Any] = {}
    engine = Engine(lm, max_batch=8)
    for i, (user, name) in enumerate(cases):
        ids = lm.tokenizer(chat_prompt(lm.tokenizer, user), add_special_tokens=False)["input_ids"]
        iv = registry.get(name).intervention if name else None
        engine.submit(Job(ids, SamplingParams(TOKENS, 0.0), lambda e, i=i: events.setdefault(i, e), iv))
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while len(events) < len(cases) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert engine.peak_rows == len(cases)
    assert isinstance(events[1], Failed) and "boom while decoding" in str(events[1].error)
    for i, case in enumerate(cases):
        if i != 1:
            assert isinstance(events[i], Done) and events[i].text == solo[case], case
    assert live_hook_sets(lm.model) == []


def test_load_use_unload_through_the_api(
    server: str, artifacts: Path, solo: dict[tuple[str, str | None], str]
) -> None:
    loaded = httpx.post(f"{server}/v1/interventions", json={"name": "up2", "path": str(artifacts / "up")})
    assert loaded.status_code == 201, loaded.text
    listed = httpx.get(f"{server}/v1/interventions").json()["data"]
    assert "up2" in {entry["name"] for entry in listed}
    assert content(chat(server, USERS[0], "up2")) == solo[USERS[0], "up"]
    assert httpx.delete(f"{server}/v1/interventions/up2").status_code == 200
    assert chat(server, USERS[0], "up2").status_code == 400
    assert httpx.delete(f"{server}/v1/interventions/up2").status_code == 404


def test_api_key_is_enforced(lm: LoadedModel, registry: InterventionRegistry) -> None:
    app = create_app(lm, registry, ServeConfig(MODEL, api_key="s3cret"))
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    with TestClient(app) as client:
        assert client.post("/v1/completions", json=body).status_code == 401
        wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200


def test_import_finesteer_does_not_import_fastapi() -> None:
    import subprocess
    import sys

    code = "import sys, finesteer, finesteer.cli; print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_64_clients_x_8_requests(
    server: str, lm: LoadedModel, interventions: dict[str, Intervention]
) -> None:
    """Bounded loopback load: 512 requests with mixed interventions, each equal to its solo run."""
    tokens = 4
    config = GenerationConfig(max_new_tokens=tokens)
    names: list[str | None] = [None, *interventions]
    refs = {
        (user, name): generate(
            lm, [chat_prompt(lm.tokenizer, user)], config, intervention=interventions[name] if name else None
        )[0]
        for user in USERS
        for name in names
    }
    deadline = time.monotonic() + 120

    def client(i: int) -> list[bool]:
        rng = random.Random(i)
        ok = []
        with httpx.Client(base_url=server, timeout=60) as http:
            for _ in range(8):
                user, name = rng.choice(USERS), rng.choice(names)
                if time.monotonic() > deadline:
                    ok.append(False)
                    continue
                body = {
                    "model": MODEL if name is None else f"{MODEL}:{name}",
                    "max_tokens": tokens,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": user}],
                }
                response = http.post("/v1/chat/completions", json=body)
                ok.append(
                    response.status_code == 200
                    and response.json()["choices"][0]["message"]["content"] == refs[user, name]
                )
        return ok

    started = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        results = [ok for batch in pool.map(client, range(64)) for ok in batch]
    assert len(results) == 512
    assert all(results), f"{results.count(False)} of 512 requests failed or differed"
    assert time.monotonic() - started < 120
    assert live_hook_sets(lm.model) == []


def test_delete_by_query_parameter(server: str, artifacts: Path) -> None:
    loaded = httpx.post(f"{server}/v1/interventions", json={"name": "tmp", "path": str(artifacts / "abl")})
    assert loaded.status_code == 201, loaded.text
    assert httpx.delete(f"{server}/v1/interventions", params={"name": "tmp"}).status_code == 200
    assert "tmp" not in _health(server)["interventions"]


def test_serve_command(monkeypatch: pytest.MonkeyPatch, artifacts: Path) -> None:
    """The CLI builds the app with the named artifacts and refuses bad specs (uvicorn.run is stubbed)."""
    from finesteer.cli import app

    started: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda server_app, **kw: started.update(app=server_app, **kw))
    ok = CliRunner().invoke(app, ["serve", MODEL, "-i", f"up={artifacts / 'up'}", "--port", "8123"])
    assert ok.exit_code == 0, ok.output
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    assert started["app"].state.registry.names() == ["up"]
    bad_spec = CliRunner().invoke(app, ["serve", MODEL, "-i", "no-folder"])
    assert bad_spec.exit_code == 2 and "NAME=FOLDER" in bad_spec.output
    other = CliRunner().invoke(app, ["serve", MODEL, "-i", f"q={artifacts / 'qwen'}"])
    assert other.exit_code == 2 and "made for" in other.output


def test_prompt_only_steering_folder_brings_its_system_prompt(
    server: str, lm: LoadedModel, registry: InterventionRegistry, tmp_path: Path
) -> None:
    from finesteer.fit.steering import Steering

    Steering("terse", None, system_prompt="Answer in one word.").save(tmp_path / "terse", lm)
    registry.load("terse", tmp_path / "terse")
    try:
        ref = generate(
            lm,
            [chat_prompt(lm.tokenizer, USERS[1], system="Answer in one word.")],
            GenerationConfig(max_new_tokens=TOKENS),
        )[0]
        assert content(chat(server, USERS[1], "terse")) == ref
        assert chat(server, USERS[1], "terse", scale=2).status_code == 400
    finally:
        registry.remove("terse")
