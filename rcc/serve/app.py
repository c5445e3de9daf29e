"""The HTTP routes: validate, hand the work to the :class:`~.engine.Engine`, serialise.

Every error is ``{"error": {"message", "type", "code"}}`` (the OpenAI shape, so
OpenAI clients show the message) with a message that says what to do; limits are
checked before any work and name the number, the limit and the option that sets it.
Requests pass :class:`~.guard.Guard` first (host, origin, key, body size) and the
connection layer (:mod:`.connections`: deadlines, connection cap) before that.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from rcc.errors import RCCError
from rcc.generation import check_max_new_tokens, generation_options
from rcc.prompts import default_mode
from rcc.serve.engine import Engine, Question, ServeError, Sink
from rcc.serve.guard import BodyTooLarge, Guard, error_body

PAGE = Path(__file__).with_name("page.html")
#: the page and the API page: scripts, styles and connections from this server only, never framed
PAGE_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
DOCS_ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript", "favicon.png": "image/png"}
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rcc serve API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"><link rel="icon" href="/docs/favicon.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script><script src="/docs/init.js"></script></body></html>
"""
DOCS_INIT = """window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  validatorUrl: null, presets: [SwaggerUIBundle.presets.apis]});
"""
Number = StrictFloat | StrictInt  # JSON numbers; true/false and strings are refused


def _error(status: int, message: str, kind: str | None = None) -> Response:
    return Response(error_body(status, message, kind), status_code=status, media_type="application/json")


def swagger_ui_folder() -> Path | None:
    """The Swagger UI 5 files that the ``fastapi-offline`` package ships (the serve extra;
    only its files are used), or None without it. (``swagger-ui-bundle`` ships Swagger UI
    4, which cannot read the OpenAPI 3.1 schema FastAPI writes.)"""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec("fastapi_offline") is None:
        return None
    folder = Path(str(importlib.resources.files("fastapi_offline") / "static"))
    return folder if all((folder / name).is_file() for name in DOCS_ASSETS) else None


class Generation(BaseModel):
    """Generation options shared by ``/ask`` and ``/v1/chat/completions`` (ranges:
    :func:`rcc.generation.check_sampling`, the CLI's and both engines' rules)."""

    max_tokens: StrictInt | None = Field(None, description="answer token budget (default 128)")
    temperature: Number | None = Field(None, description="0 (greedy) or 0.001 to 2")
    top_p: Number | None = Field(None, description="in (0, 1]")
    top_k: StrictInt | None = Field(None, description="0 (off) or more")
    repetition_penalty: Number | None = Field(None, description="0.01 to 10 (1 is none)")
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False


class AskBody(Generation):
    model_config = ConfigDict(extra="forbid")
    question: StrictStr = Field(min_length=1)
    mode: Literal["manual", "reconstruct"] | None = None


class AskManyBody(AskBody):
    context_ids: list[StrictStr] = Field(min_length=1, description="the contexts to read, in order, as one")


class ContentPart(BaseModel):
    """One part of a chat message's content list (OpenAI's shape); only text parts are read."""

    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None


class ChatBody(Generation):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use
    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    context_id: StrictStr | None = Field(None, description="extension: the compressed context to answer from")
    context_ids: list[StrictStr] | None = Field(None, description="extension: several contexts read in order as one "
                                                                 "(instead of context_id)")
    mode: Literal["manual", "reconstruct"] | None = None
    max_completion_tokens: StrictInt | None = None
    n: StrictInt = Field(1, ge=1, le=1)
    presence_penalty: Number | None = Field(None, description="OpenAI's; only 0 (use repetition_penalty)")
    frequency_penalty: Number | None = Field(None, description="OpenAI's; only 0 (use repetition_penalty)")


class ContextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    name: StrictStr | None = None


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app over a started engine, inside its :class:`~.guard.Guard` (and
    CORS when ``cors_origins`` are configured): one router per area (the pages, the
    service routes, contexts, questions) and one error shape for every error."""
    cfg = engine.cfg
    app = FastAPI(title="rcc serve", version="1", docs_url=None, redoc_url=None)
    app.state.engine = engine
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["authorization", "content-type"])
    app.add_middleware(Guard, cfg=cfg, metrics=engine.metrics)  # added last: the outermost

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    for kind, handler in ((ServeError, _serve_error), (RCCError, _rcc_error), (RequestValidationError, _validation),
                          (StarletteHTTPException, _http)):
        app.add_exception_handler(kind, handler)
    for router in (pages_router(), service_router(engine), contexts_router(engine), questions_router(engine)):
        app.include_router(router)
    return app


# ------------------------------------------------------------ errors
async def _serve_error(request, err: ServeError):
    return _error(err.status, str(err))

async def _rcc_error(request, err: RCCError):
    return _error(422, str(err))

async def _validation(request, err: RequestValidationError):
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return _error(422, "bad request: " + "; ".join(parts[:8]) + "; see GET /docs for the fields")

async def _http(request, err: StarletteHTTPException):
    if err.status_code == 404:
        return _error(404, f"no route {request.method} {request.url.path}; see GET /docs for the API")
    return _error(err.status_code, str(err.detail))


# ------------------------------------------------------------ routers
def pages_router() -> APIRouter:
    """``/``: the web page; ``/docs``: the API page (offline Swagger UI)."""
    router = APIRouter()
    swagger = swagger_ui_folder()

    @router.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": PAGE_CSP})

    @router.get("/docs", include_in_schema=False)
    async def docs():
        if swagger is None:
            raise ServeError(404, "the API page needs the fastapi-offline package (pip install "
                                  "'rcc-llm[serve]'); the schema itself is at GET /openapi.json")
        return HTMLResponse(DOCS_PAGE, headers={"Content-Security-Policy": DOCS_CSP})

    @router.get("/docs/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        """The API page's files, from the fastapi-offline package (nothing from the network)."""
        if name == "init.js":
            return Response(DOCS_INIT, media_type="text/javascript")
        if swagger is None or name not in DOCS_ASSETS:
            raise ServeError(404, f"no file {name} for the API page; see GET /docs")
        return Response((swagger / name).read_bytes(), media_type=DOCS_ASSETS[name],
                        headers={"Cache-Control": "max-age=86400"})

    return router


def service_router(engine: Engine) -> APIRouter:
    """``/health``, ``/metrics`` (Prometheus) and ``/v1/models``."""
    router = APIRouter()
    cfg = engine.cfg
    model_name = served_name(cfg)

    @router.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "model_id": engine.model_id,
                "queue_depth": engine.queue_depth(), "auth": bool(cfg.api_key)}

    @router.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.gauges()), media_type="text/plain; version=0.0.4")

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "rcc",
                                            "created": 0, "window": engine.model.config.window,
                                            "ratio": engine.model.config.ratio}]}

    return router


def contexts_router(engine: Engine) -> APIRouter:
    """``/v1/contexts``: add (compress), list, show and delete documents."""
    router = APIRouter()
    cfg = engine.cfg

    @router.post("/v1/contexts", status_code=202)
    async def add_context(request: Request):
        text, name = await _read_document(request, cfg)
        row, created = await run_in_threadpool(engine.add_context, text, name)
        return JSONResponse(_view(row), status_code=202 if created else 200)

    @router.post("/v1/contexts/{cid}/append", status_code=202)
    async def append_context(cid: str, request: Request):
        """Append text to a ready context: a new context whose ``parent`` is ``cid`` (only the
        new text's windows are encoded; the parent is not changed). Body as ``POST /v1/contexts``."""
        text, name = await _read_document(request, cfg)
        row, created = await run_in_threadpool(engine.append_context, cid, text, name)
        return JSONResponse(_view(row), status_code=202 if created else 200)

    @router.get("/v1/contexts")
    async def list_contexts():
        return {"object": "list", "data": [_view(r) for r in engine.store.list()]}

    @router.get("/v1/contexts/{cid}")
    async def get_context(cid: str):
        row = engine.store.get(cid)
        if row is None:
            raise ServeError(404, f"no context {cid}; list them with GET /v1/contexts")
        return _view(row)

    @router.delete("/v1/contexts/{cid}")
    async def delete_context(cid: str):
        await run_in_threadpool(engine.delete_context, cid)
        return {"id": cid, "object": "context", "deleted": True}

    return router


def questions_router(engine: Engine) -> APIRouter:
    """``/v1/contexts/{id}/ask`` and the OpenAI-compatible ``/v1/chat/completions``."""
    router = APIRouter()
    cfg = engine.cfg
    model_name = served_name(cfg)

    @router.post("/v1/contexts/{cid}/ask")
    async def ask(cid: str, body: AskBody, request: Request):
        return await answer((cid,), body, request)

    @router.post("/v1/ask")
    async def ask_many(body: AskManyBody, request: Request):
        """One question over several contexts, read in the order given as one memory."""
        return await answer(tuple(body.context_ids), body, request)

    async def answer(cids: tuple[str, ...], body: AskBody, request: Request):
        cid = "+".join(cids)
        q = await make_question(engine, cids, body.question, body.mode, body)
        await run_in_threadpool(engine.submit, q)
        if not q.stream:
            result = await _result(q, request)
            return {"id": cid, "object": "answer", **({"context_ids": list(cids)} if len(cids) > 1 else {}), **result}

        async def events():
            async for event in _events(q.sink):
                if event[0] == "delta":
                    yield _sse({"delta": event[1]})
                elif event[0] == "done":
                    yield _sse({"done": True, "id": cid, **event[1]})
                else:
                    yield _sse({"error": {"message": event[2], "code": event[1]}})

        return _Stream(events(), q)

    @router.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        if len(body.messages) > cfg.max_messages:
            raise ServeError(413, f"{len(body.messages)} messages, over this server's limit of {cfg.max_messages} "
                                  "(--max-messages); send the question with less history")
        if body.model not in (None, model_name, str(cfg.model)):
            raise ServeError(404, f"model {body.model!r} is not served here; use {model_name!r} (GET /v1/models)")
        if bool(body.context_id) == bool(body.context_ids):
            raise ServeError(422, "name the compressed context in the extension field context_id (OpenAI Python "
                                  "client: extra_body={'context_id': ID}), or several in context_ids; POST the "
                                  "document to /v1/contexts for an id")
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise ServeError(422, "no user message; the last user message is the question")
        content = users[-1].content
        if isinstance(content, list):
            texts = []
            for i, part in enumerate(content):
                if part.type != "text":
                    raise ServeError(422, f"messages: content part {i} is of type {part.type!r}; this server reads "
                                          "text parts only")
                if part.text is None:
                    raise ServeError(422, f"messages: content part {i} (type 'text') has no 'text' string")
                texts.append(part.text)
            content = "".join(texts)
        cids = (body.context_id,) if body.context_id else tuple(body.context_ids)
        q = await make_question(engine, cids, content or "", body.mode, body)
        await run_in_threadpool(engine.submit, q)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not q.stream:
            r = await _result(q, request)
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

        return _Stream(events(), q)

    return router


def served_name(cfg) -> str:
    """The model's name in the API: its folder's name (or the spec as given)."""
    return Path(str(cfg.model)).name or str(cfg.model)


def request_options(body: Generation, cfg) -> tuple:
    """The request's checked generation options, as the engine batches them.

    Raises:
        ServeError: 413 past a stop-string limit; RCCError (422) for a value out of range.
    """
    for field in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, field, None)
        if value is not None and not (math.isfinite(value) and -2 <= value <= 2):
            raise ServeError(422, f"{field} {value!r}: must be in [-2, 2]")
        if value:
            raise ServeError(422, f"{field} is not supported by this server (only 0); use repetition_penalty")
    opts = generation_options(None, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              repetition_penalty=body.repetition_penalty, name=str)
    del opts["max_new_tokens"]  # the question's budget, checked on its own
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > cfg.max_stop_strings:
        raise ServeError(413, f"{len(stops)} stop strings, over this server's limit of {cfg.max_stop_strings} "
                              "(--max-stop-strings)")
    for stop in stops:
        if not stop:
            raise ServeError(422, "stop: a stop string must not be empty")
        if len(stop) > cfg.max_stop_chars:
            raise ServeError(413, f"a stop string of {len(stop)} characters, over this server's limit of "
                                  f"{cfg.max_stop_chars} (--max-stop-chars)")
        _check_unicode("stop", stop)
    if stops:
        opts["stop"] = stops
    return tuple(sorted(opts.items()))


async def make_question(engine: Engine, cids: tuple[str, ...], text: str, mode: str | None,
                        body: Generation) -> Question:
    """The checked :class:`~.engine.Question` of a request (contexts, budget, options, text, length).

    Raises:
        ServeError: 413 past a limit, 422 for a bad value.
    """
    cfg = engine.cfg
    if len(cids) > cfg.max_contexts_per_question:
        raise ServeError(413, f"{len(cids)} contexts, over this server's limit of {cfg.max_contexts_per_question} "
                              "per question (--max-contexts-per-question)")
    budget = body.max_tokens if body.max_tokens is not None else getattr(body, "max_completion_tokens", None)
    budget = 128 if budget is None else budget
    check_max_new_tokens(budget, name=lambda _: "max_tokens")
    if budget > cfg.max_new_tokens:
        raise ServeError(422, f"max_tokens {budget} is over this server's limit of {cfg.max_new_tokens}; "
                              "ask for fewer")
    opts = request_options(body, cfg)
    if not text.strip():
        raise ServeError(422, "the question is empty; ask something")
    _check_unicode("the question", text)
    n = await run_in_threadpool(lambda: len(engine.tok(text, add_special_tokens=False).input_ids))
    if n > cfg.max_question_tokens:
        raise ServeError(413, f"the question has {n} tokens, over this server's limit of "
                              f"{cfg.max_question_tokens} (--max-question-tokens); shorten it, or put the long "
                              "part in the document")
    return Question(contexts=tuple(cids), text=text, mode=mode or default_mode(engine.model), max_new_tokens=budget,
                    options=opts, sink=Sink(asyncio.get_running_loop()), stream=body.stream)


class _Stream(StreamingResponse):
    """Server-sent events of one question; the question is cancelled when the response
    ends, so a client that goes away stops its generation at the next token (Starlette
    ends a streaming response when its client disconnects)."""

    def __init__(self, content, q: Question):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.question = q

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.question.cancel()  # a no-op once answered


def _check_unicode(what: str, text: str) -> None:
    """Raises ServeError 422 for text that is not valid Unicode (JSON's lone surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ServeError(422, f"{what} is not valid Unicode (a lone surrogate at character {err.start}); send "
                              "UTF-8 text") from None


def _view(row: dict) -> dict:
    return {"id": row["id"], "object": "context", "name": row["name"], "status": row["status"],
            "progress": {"windows_done": row["windows_done"], "windows_total": row["windows_total"]},
            "tokens": row["tokens"], "slots": row["slots"], "bytes": row["bytes"], "error": row["error"],
            "parent": row["parent"], "created": row["created"]}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _events(sink: Sink):
    while True:
        event = await sink.queue.get()
        yield event
        if event[0] != "delta":
            return


async def _result(q: Question, request: Request) -> dict:
    """The answer of a question not streamed; the question is cancelled if its client
    disconnects first (so its row stops at the next token).

    Raises:
        ServeError: the engine's error for the question.
    """

    async def first_event():
        return await q.sink.queue.get()

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    event_task, gone_task = asyncio.ensure_future(first_event()), asyncio.ensure_future(disconnected())
    try:
        while True:
            done, _ = await asyncio.wait({event_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
            if event_task not in done:
                q.cancel()
                raise ServeError(499, "the client closed the connection before the answer")
            event = event_task.result()
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                raise ServeError(event[1], event[2])
            event_task = asyncio.ensure_future(first_event())  # a delta of a streamed question: not here
    finally:
        event_task.cancel()
        gone_task.cancel()


async def _read_document(request: Request, cfg) -> tuple[str, str | None]:
    """The document of ``POST /v1/contexts``: a multipart upload (field ``file``, or
    ``text``), JSON ``{"text", "name"}``, or (with an API key) the raw body as UTF-8 text.
    Its size is bounded before this (the guard's ``document_bytes``).

    Raises:
        ServeError: 422 malformed or not UTF-8, 413 a name over ``max_name_chars``.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    name = None
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_part_size=cfg.document_bytes(), max_files=4, max_fields=16)
        except BodyTooLarge:
            raise
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
        if kind == "application/json":
            try:
                body = ContextBody.model_validate_json(data)
            except ValueError as err:
                raise ServeError(422, f"bad JSON body ({str(err).splitlines()[0]}); send {{\"text\": \"...\", "
                                      "\"name\": \"...\"}") from None
            data, name = None, body.name
            text = body.text
    if data is not None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ServeError(422, f"the document is not UTF-8 text (bad byte at offset {err.start}); convert it to "
                                  "UTF-8 first") from None
    if name is not None:
        name = str(name)
        if len(name) > cfg.max_name_chars:
            raise ServeError(413, f"the document's name has {len(name)} characters, over this server's limit of "
                                  f"{cfg.max_name_chars} (--max-name-chars)")
        _check_unicode("the document's name", name)
    _check_unicode("the document", text)
    return text, (name or None)


def serve(cfg) -> None:
    """Lock the store, load the model, recover the store, and serve until interrupted."""
    import uvicorn

    from rcc.serve.connections import protocol_class

    if cfg.engine == "vllm":
        from rcc.serve.vllm_engine import load_vllm_engine as load_engine
    else:
        from rcc.serve.engine import load_engine

    engine = load_engine(cfg).start()
    app = create_app(engine)
    if cfg.insecure and not cfg.api_key:
        print(f"rcc: warning: serving on {cfg.host} without --api-key-file (--insecure): anyone who can reach it "
              "can use it", file=sys.stderr)
    print(f"rcc: serving {cfg.model} on http://{cfg.host}:{cfg.port} (store {cfg.store})", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5,
                            http=protocol_class(cfg), timeout_keep_alive=cfg.keep_alive_timeout,
                            h11_max_incomplete_event_size=cfg.max_header_bytes, lifespan="off",
                            backlog=max(2048, cfg.max_connections))
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
        engine.store.close()
