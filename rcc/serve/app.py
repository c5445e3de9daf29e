"""The HTTP routes: validate, hand the work to the :class:`~.engine.Engine`, serialise.

Every error is ``{"error": {"message", "type", "code"}}`` (the OpenAI shape, so
OpenAI clients show the message) with a message that says what to do.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import RCCError
from ..prompts import default_mode
from .engine import Engine, Question, ServeError, Sink

PAGE = Path(__file__).with_name("page.html")
OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json")  # no key needed: the page and the schema ask for it


def _error(status: int, message: str, kind: str | None = None) -> JSONResponse:
    kind = kind or {401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
                    413: "request_too_large", 429: "rate_limit_error"}.get(status, "invalid_request_error"
                                                                             if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class Generation(BaseModel):
    """Generation options shared by ``/ask`` and ``/v1/chat/completions``."""

    max_tokens: int | None = Field(None, ge=1, description="answer token budget (default 128)")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    stream: bool = False


class AskBody(Generation):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    mode: Literal["manual", "reconstruct"] | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = None


class ChatBody(Generation):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    context_id: str | None = Field(None, description="extension: the compressed context to answer from")
    mode: Literal["manual", "reconstruct"] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)


class ContextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    name: str | None = None


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app over a started engine."""
    cfg = engine.cfg
    model_name = Path(str(cfg.model)).name or str(cfg.model)
    app = FastAPI(title="rcc serve", version="1", docs_url="/docs", redoc_url=None)
    app.state.engine = engine

    # ------------------------------------------------------ errors, auth
    @app.exception_handler(ServeError)
    async def _serve_error(request, err: ServeError):
        return _error(err.status, str(err))

    @app.exception_handler(RCCError)
    async def _rcc_error(request, err: RCCError):
        return _error(422, str(err))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {e.get('msg')}")
        return _error(422, "bad request: " + "; ".join(parts) + "; see GET /docs for the fields")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        if err.status_code == 404:
            return _error(404, f"no route {request.method} {request.url.path}; see GET /docs for the API")
        return _error(err.status_code, str(err.detail))

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next):
        t = time.perf_counter()
        if cfg.api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), cfg.api_key.encode()):
                response = _error(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY' "
                                       "with the key from the server's --api-key-file")
                engine.metrics.request(request.method, "auth", 401, time.perf_counter() - t)
                return response
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        engine.metrics.request(request.method, route, response.status_code, time.perf_counter() - t)
        return response

    # -------------------------------------------------------------- misc
    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "model_id": engine.model_id,
                "queue_depth": engine.queue_depth(), "auth": bool(cfg.api_key)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.gauges()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "rcc",
                                            "created": 0, "window": engine.model.config.window,
                                            "ratio": engine.model.config.ratio}]}

    # ---------------------------------------------------------- contexts
    @app.post("/v1/contexts", status_code=202)
    async def add_context(request: Request):
        text, name = await _read_document(request, cfg.max_context_tokens)
        row, created = await run_in_threadpool(engine.add_context, text, name)
        return JSONResponse(_view(row), status_code=202 if created else 200)

    @app.get("/v1/contexts")
    async def list_contexts():
        return {"object": "list", "data": [_view(r) for r in engine.store.list()]}

    @app.get("/v1/contexts/{cid}")
    async def get_context(cid: str):
        row = engine.store.get(cid)
        if row is None:
            raise ServeError(404, f"no context {cid}; list them with GET /v1/contexts")
        return _view(row)

    @app.delete("/v1/contexts/{cid}")
    async def delete_context(cid: str):
        await run_in_threadpool(engine.delete_context, cid)
        return {"id": cid, "object": "context", "deleted": True}

    # --------------------------------------------------------- questions
    def question(cid: str, text: str, mode: str | None, body: Generation) -> Question:
        budget = body.max_tokens if body.max_tokens is not None else getattr(body, "max_completion_tokens", None)
        budget = 128 if budget is None else budget
        if budget > cfg.max_new_tokens:
            raise ServeError(422, f"max_tokens {budget} is over this server's limit of {cfg.max_new_tokens}; "
                                  "ask for fewer")
        opts = {}
        if body.temperature or body.top_p is not None or body.top_k is not None:
            opts["do_sample"] = True
            for k in ("temperature", "top_p", "top_k"):
                if getattr(body, k):
                    opts[k] = getattr(body, k)
        if body.repetition_penalty is not None:
            opts["repetition_penalty"] = body.repetition_penalty
        if body.stop:
            opts["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
        if not text.strip():
            raise ServeError(422, "the question is empty; ask something")
        return Question(context=cid, text=text, mode=mode or default_mode(engine.model), max_new_tokens=budget,
                        options=tuple(sorted(opts.items())), sink=Sink(asyncio.get_running_loop()),
                        stream=body.stream)

    async def submit(q: Question) -> None:
        await run_in_threadpool(engine.submit, q)

    @app.post("/v1/contexts/{cid}/ask")
    async def ask(cid: str, body: AskBody):
        q = question(cid, body.question, body.mode, body)
        await submit(q)
        if not q.stream:
            result = await _result(q.sink)
            return {"id": cid, "object": "answer", **result}

        async def events():
            async for event in _events(q.sink):
                if event[0] == "delta":
                    yield _sse({"delta": event[1]})
                elif event[0] == "done":
                    yield _sse({"done": True, "id": cid, **event[1]})
                else:
                    yield _sse({"error": {"message": event[2], "code": event[1]}})

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        if body.model not in (None, model_name, str(cfg.model)):
            raise ServeError(404, f"model {body.model!r} is not served here; use {model_name!r} (GET /v1/models)")
        if not body.context_id:
            raise ServeError(422, "name the compressed context in the extension field context_id (OpenAI Python "
                                  "client: extra_body={'context_id': ID}); POST the document to /v1/contexts "
                                  "for an id")
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise ServeError(422, "no user message; the last user message is the question")
        content = users[-1].content
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        q = question(body.context_id, content or "", body.mode, body)
        await submit(q)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not q.stream:
            r = await _result(q.sink)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": r["answer"]},
                                 "finish_reason": r["finish_reason"], "logprobs": None}],
                    "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                              "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}}

        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for event in _events(q.sink):
                if event[0] == "delta":
                    yield chunk({"content": event[1]})
                elif event[0] == "done":
                    yield chunk({}, event[1]["finish_reason"])
                else:
                    yield _sse({"error": {"message": event[2], "code": event[1]}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _view(row: dict) -> dict:
    return {"id": row["id"], "object": "context", "name": row["name"], "status": row["status"],
            "progress": {"windows_done": row["windows_done"], "windows_total": row["windows_total"]},
            "tokens": row["tokens"], "slots": row["slots"], "bytes": row["bytes"], "error": row["error"],
            "created": row["created"]}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _events(sink: Sink):
    while True:
        event = await sink.queue.get()
        yield event
        if event[0] != "delta":
            return


async def _result(sink: Sink) -> dict:
    async for event in _events(sink):
        if event[0] == "done":
            return event[1]
        if event[0] == "error":
            raise ServeError(event[1], event[2])
    raise AssertionError("unreachable")


async def _read_document(request: Request, max_tokens: int) -> tuple[str, str | None]:
    """The document of ``POST /v1/contexts``: a multipart upload (field ``file``, or
    ``text``), JSON ``{"text", "name"}``, or the raw body as UTF-8 text.

    Raises:
        ServeError: 422 malformed or not UTF-8, 413 far past any token limit.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = max(1 << 20, max_tokens * 32)  # bytes: far more than max_tokens tokens of text
    name = None
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_part_size=limit)
        except Exception as err:  # the multipart parser's own errors
            raise ServeError(422, f"malformed multipart upload ({err}); send the document in the field 'file'") from None
        item = form.get("file", form.get("text"))
        if item is None:
            raise ServeError(422, "the multipart upload has no field 'file' (or 'text'): it is malformed or names the "
                                  "document otherwise; send the document in the field 'file'")
        if isinstance(item, str):
            data = item.encode()
        else:
            data, name = await item.read(), item.filename
        name = form.get("name") or name
    else:
        data = await request.body()
        if len(data) > limit:
            raise ServeError(413, f"the document is {len(data)} bytes, far over this server's limit of "
                                  f"{max_tokens} tokens; split it")
        if kind == "application/json":
            try:
                body = ContextBody.model_validate_json(data)
            except ValueError as err:
                raise ServeError(422, f"bad JSON body ({str(err).splitlines()[0]}); send {{\"text\": \"...\", "
                                      "\"name\": \"...\"}") from None
            return body.text, body.name
    if len(data) > limit:
        raise ServeError(413, f"the document is {len(data)} bytes, far over this server's limit of {max_tokens} "
                              "tokens; split it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ServeError(422, f"the document is not UTF-8 text (bad byte at offset {err.start}); convert it to "
                              "UTF-8 first") from None
    return text, (str(name) if name else None)


def serve(cfg) -> None:
    """Load the model, recover the store, and serve until interrupted."""
    import uvicorn

    if cfg.engine == "vllm":
        from ..vllm.engine import load_vllm_engine as load_engine
    else:
        from .engine import load_engine

    engine = load_engine(cfg).start()
    app = create_app(engine)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"rcc: warning: serving on {cfg.host} without --api-key-file: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"rcc: serving {cfg.model} on http://{cfg.host}:{cfg.port} (store {cfg.store})", file=sys.stderr,
          flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.stop()
        engine.store.close()
