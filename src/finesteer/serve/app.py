"""The OpenAI-compatible FastAPI app: chat/completions (streaming or not), models, interventions.

Handlers only validate and translate: a request is resolved to (prompt ids, intervention, sampling)
before anything runs, so every bad request is answered with a 4xx in OpenAI's error shape without
touching the model, and the engine thread does all model work. Results come back through an asyncio
queue fed from the engine thread with `call_soon_threadsafe`; a client that goes away cancels its
row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finesteer.errors import FinesteerError
from finesteer.models.context import context_length
from finesteer.models.loading import LoadedModel
from finesteer.serve.engine import Delta, Done, Engine, Event, Failed, Job
from finesteer.serve.errors import ServeError, error_body
from finesteer.serve.prompts import chat_text, encode, token_budget
from finesteer.serve.registry import InterventionRegistry
from finesteer.serve.resolve import Resolved, resolve
from finesteer.serve.sampling import SamplingParams
from finesteer.serve.schemas import ChatRequest, CompletionFields, CompletionRequest, LoadRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Operator settings. `context` defaults to the model's max_position_embeddings."""

    model_id: str
    api_key: str | None = None
    max_batch: int = 16
    max_scale: float = 100.0
    default_max_tokens: int = 256
    context: int | None = None
    batch_wait_s: float = 0.002


def model_context(lm: LoadedModel) -> int:
    return context_length(lm) or 2048


class _Channel:
    """Engine thread → request coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        # RuntimeError: the loop is gone (server shutting down), nobody is listening
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(lm: LoadedModel, registry: InterventionRegistry, config: ServeConfig) -> FastAPI:
    """The app; its lifespan starts and stops the engine thread."""
    engine = Engine(lm, max_batch=config.max_batch, batch_wait_s=config.batch_wait_s)
    context = config.context or model_context(lm)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="finesteer serve", lifespan=lifespan)
    app.state.engine, app.state.registry, app.state.lm = engine, registry, lm

    # --- errors and auth ---------------------------------------------------------------------------

    def error(message: str, status: int, code: str | None = None, param: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, status, code=code, param=param), status_code=status)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error(exc.message, exc.status, exc.code, exc.param)

    @app.exception_handler(FinesteerError)
    async def _finesteer_error(request: Request, exc: FinesteerError) -> JSONResponse:
        return error(str(exc), 400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return error(
                f"the body is not valid JSON{': ' + str(detail) if detail else ''}", 400, code="invalid_json"
            )
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(
            f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'bad body')}",
            400,
            param=where or None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(str(exc.detail), exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if config.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                response = error(
                    "invalid or missing API key (send 'Authorization: Bearer KEY')",
                    401,
                    code="invalid_api_key",
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await call_next(request)

    # --- request → job -----------------------------------------------------------------------------

    def prepare(
        req: CompletionFields, messages: list[dict[str, str]] | None, prompt: str | None
    ) -> tuple[Job, Resolved]:
        if req.n != 1:
            raise ServeError("only n=1 is supported", 400, param="n")
        if req.logprobs:
            raise ServeError("logprobs are not supported", 400, param="logprobs")
        resolved = resolve(
            registry,
            model=req.model,
            served=config.model_id,
            field=req.intervention,
            scale=req.scale,
            max_scale=config.max_scale,
        )
        if messages is not None:
            text = chat_text(lm.tokenizer, messages, resolved.system_prompt)
        else:
            assert prompt is not None
            text = prompt
        ids = encode(lm.tokenizer, text)
        limit = req.max_completion_tokens if isinstance(req, ChatRequest) else None
        budget = token_budget(
            len(ids), limit or req.max_tokens, context=context, default=config.default_max_tokens
        )
        params = SamplingParams(
            max_tokens=budget,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stops(),
            seed=req.seed,
            min_tokens=req.min_tokens,
        )
        return Job(ids, params, lambda event: None, resolved.intervention, stream=req.stream), resolved

    async def run(job: Job, channel: _Channel) -> Done:
        job.emit = channel.emit
        engine.submit(job)
        try:
            while True:
                event = await channel.queue.get()
                if isinstance(event, Done):
                    return event
                if isinstance(event, Failed):
                    raise ServeError(f"generation failed: {event.error}", 500, code="generation_failed")
        finally:
            job.cancel()  # no-op once done; drops the row if the client went away

    def stream(job: Job, channel: _Channel, chunk: Any, include_usage: bool) -> StreamingResponse:
        job.emit = channel.emit
        engine.submit(job)

        async def events() -> AsyncIterator[str]:
            try:
                first = chunk(None, None)
                if first is not None:
                    yield _sse(first)
                while True:
                    event = await channel.queue.get()
                    if isinstance(event, Delta):
                        yield _sse(chunk(event.text, None))
                    elif isinstance(event, Done):
                        yield _sse(chunk("", event.finish_reason))
                        if include_usage:
                            yield _sse({**chunk("", None), "choices": [], "usage": usage(event)})
                        yield _sse("[DONE]")
                        return
                    else:
                        assert isinstance(event, Failed)
                        yield _sse(
                            error_body(f"generation failed: {event.error}", 500, code="generation_failed")
                        )
                        return
            finally:
                job.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def usage(done: Done) -> dict[str, int]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }

    # --- endpoints ---------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as exc:
            raise ServeError(str(exc), 400, param="messages") from exc
        job, resolved = prepare(req, messages, None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": req.model}
        if req.stream:

            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                delta = (
                    {"role": "assistant", "content": ""}
                    if text is None
                    else ({"content": text} if text else {})
                )
                return {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                }

            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(job, _Channel(), chunk, include)
        done = await run(job, _Channel())
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "finish_reason": done.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(done),
            "intervention": list(resolved.names),
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ServeError("send one prompt per request", 400, param="prompt")
        job, resolved = prepare(req, None, prompts[0])
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": req.model}
        echo = prompts[0] if req.echo else ""
        if req.stream:

            def chunk(text: str | None, finish: str | None) -> dict[str, Any] | None:
                if text is None and not echo:
                    return None
                return {
                    **head,
                    "object": "text_completion",
                    "choices": [
                        {
                            "index": 0,
                            "text": echo if text is None else text,
                            "finish_reason": finish,
                            "logprobs": None,
                        }
                    ],
                }

            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(job, _Channel(), chunk, include)
        done = await run(job, _Channel())
        return {
            **head,
            "object": "text_completion",
            "choices": [
                {"index": 0, "text": echo + done.text, "finish_reason": done.finish_reason, "logprobs": None}
            ],
            "usage": usage(done),
            "intervention": list(resolved.names),
        }

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        ids = [config.model_id] + [f"{config.model_id}:{name}" for name in registry.names()]
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": "finesteer"} for i in ids],
        }

    @app.get("/v1/interventions")
    def list_interventions() -> dict[str, Any]:
        return {"object": "list", "data": [entry.describe() for entry in registry.entries()]}

    @app.post("/v1/interventions", status_code=201)
    def load_intervention(req: LoadRequest) -> dict[str, Any]:
        entry = registry.load(req.name, req.path, via_api=True)
        log.info("loaded intervention %s from %s", entry.name, entry.source)
        return entry.describe()

    @app.delete("/v1/interventions")
    def unload_intervention_query(name: str) -> dict[str, Any]:
        return unload_intervention(name)

    @app.delete("/v1/interventions/{name}")
    def unload_intervention(name: str) -> dict[str, Any]:
        registry.remove(name)
        log.info("unloaded intervention %s", name)
        return {"id": name, "object": "intervention", "deleted": True}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": config.model_id,
            "fingerprint": lm.fingerprint,
            "active_requests": engine.active,
            "decode_steps": engine.steps,
            "peak_batch": engine.peak_rows,
            "interventions": registry.names(),
        }

    return app
