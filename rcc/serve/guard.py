"""What every request passes before a route sees it (an ASGI middleware, outermost):

- ``Host`` must name this server (DNS rebinding: a page on ``evil.example`` that
  re-points its name to 127.0.0.1 would otherwise read the API from the browser);
- writes (POST, DELETE) from another origin (``Origin``, ``Sec-Fetch-Site``) are
  refused unless the origin is in ``--cors-origins``; without an API key a POST must
  also be JSON or multipart (a plain-text body is what a cross-site form can send);
- the API key, when the server has one (constant-time compare);
- the body's size: 413 from ``Content-Length`` before a byte is read, or as soon as
  a chunked body passes the limit;
- an exception no route handled: 500 with an id, logged with its traceback.

It also adds headers that keep browsers from sniffing or framing responses, and
counts every request for ``/metrics``.
"""

from __future__ import annotations

import json
import secrets
import time
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.requests import ClientDisconnect

from rcc.serve.config import is_loopback
from rcc.serve.engine import internal_error

OPEN_PATHS = ("/", "/health", "/openapi.json")  # no key needed: the page and the schema ask for it
OPEN_PREFIXES = ("/docs",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DOCUMENT_ROUTE = "/v1/contexts"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
KINDS = {401: "authentication_error", 431: "request_too_large", 403: "permission_error", 404: "not_found_error", 408: "timeout_error",
         409: "conflict_error", 413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
         499: "client_closed_request"}


def error_body(status: int, message: str, kind: str | None = None) -> bytes:
    """The API's error JSON: ``{"error": {"message", "type", "code"}}`` (the OpenAI shape)."""
    kind = kind or KINDS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


class BodyTooLarge(HTTPException):
    """A body grew past its limit while it was read: a 413 (an HTTPException, so that
    FastAPI's body parsing passes it on instead of calling it a parse error)."""

    def __init__(self, message: str):
        super().__init__(413, message)


def host_name(host: str) -> str:
    """``[::1]:8000`` -> ``::1``; ``Example.com.:80`` -> ``example.com``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_address(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """The ASGI middleware described in this module's docstring.

    Args:
        app: the FastAPI app (or the CORS middleware around it).
        cfg: the :class:`~rcc.serve.ServeConfig`.
        metrics: the engine's :class:`~rcc.serve.metrics.Metrics`.
    """

    def __init__(self, app, cfg, metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics

    def host_allowed(self, host: str | None) -> bool:
        if not host:  # HTTP/1.0 without Host: not a browser
            return True
        name, cfg = host_name(host), self.cfg
        allowed = cfg.allowed_hosts
        return ("*" in allowed or is_loopback(name) or name == host_name(cfg.host) or name in allowed
                or any(a.startswith(".") and name.endswith(a) for a in allowed)
                or (cfg.host in WILDCARD_HOSTS and _is_address(name)))

    def refusal(self, method: str, path: str, headers: dict[str, str], head_bytes: int = 0) -> tuple[int, str] | None:
        """``(status, message)`` for a request refused before any route runs, or None."""
        cfg = self.cfg
        if head_bytes > cfg.max_header_bytes:  # h11 bounds only a head still incomplete
            return 431, (f"the request line and headers are {head_bytes} bytes, over this server's limit of "
                         f"{cfg.max_header_bytes} (--max-header-bytes)")
        host = headers.get("host")
        if not self.host_allowed(host):
            return 403, (f"Host {host!r} is not this server's name; use http://127.0.0.1:{cfg.port}/, or start the "
                         f"server with --allowed-hosts {host_name(host)} if that name is meant to reach it")
        if method not in SAFE_METHODS:
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site", "")
            listed = origin is not None and origin.rstrip("/") in cfg.cors_origins
            if origin is not None and not listed and (origin == "null" or urlsplit(origin).netloc.lower()
                                                      != (host or "").lower()):
                return 403, (f"cross-origin {method} from {origin} refused; pages of other origins may not write "
                             "to this server (allow one with --cors-origins ORIGIN)")
            if site in ("cross-site", "same-site") and not listed:
                return 403, (f"{method} from a {site} page refused; pages of other origins may not write to this "
                             "server (allow one with --cors-origins ORIGIN)")
        is_open = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        if cfg.api_key and not is_open and method != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), cfg.api_key.encode()):
                return 401, ("missing or wrong API key; send the header 'Authorization: Bearer KEY' with the key "
                             "from the server's --api-key-file")
        if method == "POST" and not cfg.api_key:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in ("application/json", "multipart/form-data"):
                return 415, (f"a POST to this server must be application/json or multipart/form-data, not "
                             f"{kind or 'untyped'} (a server without --api-key-file takes no other body, so that "
                             "web pages cannot post to it as forms)")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.body_limit(method, path):
            return 413, self.too_large(int(length), method, path)
        return None

    def body_limit(self, method: str, path: str) -> int:
        if method == "POST" and path == DOCUMENT_ROUTE:
            return self.cfg.document_bytes()
        return self.cfg.max_body_bytes

    def too_large(self, n: int, method: str, path: str) -> str:
        if method == "POST" and path == DOCUMENT_ROUTE:
            return (f"the document is {n} bytes, over this server's limit of {self.cfg.document_bytes()} bytes "
                    f"(--max-document-bytes; --max-context-tokens {self.cfg.max_context_tokens}); split it")
        return (f"the request body is {n} bytes, over this server's limit of {self.cfg.max_body_bytes} "
                "(--max-body-bytes)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t = time.perf_counter()
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        state = {"status": None}

        async def send_headed(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        async def reply(status: int, message: str, close: bool = False) -> None:
            body = error_body(status, message)
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if close:
                head.append((b"connection", b"close"))
            await send_headed({"type": "http.response.start", "status": status, "headers": head})
            await send_headed({"type": "http.response.body", "body": body})

        limit, seen = self.body_limit(method, path), 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(self.too_large(seen, method, path) + " (counted as it arrived)")
            return message

        head_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        refused = self.refusal(method, path, headers, head_bytes)
        try:
            if refused is not None:
                # a body refused unread (413) is still drained, so the client can finish sending and
                # read the answer; its deadline (--body-timeout) or the keep-alive timeout closes it
                await reply(*refused)
                return
            try:
                await self.app(scope, receive_limited, send_headed)
            except BodyTooLarge as err:
                if state["status"] is None:
                    await reply(413, err.detail)
            except ClientDisconnect:
                state["status"] = state["status"] or 499
            except Exception:
                message = internal_error(f"{method} {path}")
                if state["status"] is None:
                    await reply(500, message, close=True)
        finally:
            route = "refused" if refused else getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request(method, route, state["status"] or 499, time.perf_counter() - t)
