"""Server settings: one validated dataclass, one default per fact.

The limits and timeouts here are what keeps one client (careless or hostile) from
stalling or exhausting the server; docs/serving.md ("Running rcc serve safely") says
what each protects against.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from rcc.bundled import DEFAULT_MODEL
from rcc.files import cache_root
from rcc.errors import RCCError

ENGINES = ("transformers", "vllm")
LOOPBACK_NAMES = ("localhost",)


def default_store() -> str:
    """``serve`` in the cache folder (:func:`rcc.files.cache_root`: ``~/.cache/rcc/serve``)."""
    return str(cache_root() / "serve")


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``*.localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    host = host.strip("[]").lower().rstrip(".")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: the integer settings that must be positive, and the timeouts (seconds)
POSITIVE = ("max_context_tokens", "max_contexts_per_question", "max_concurrent", "max_batch", "max_new_tokens", "cache_mib", "window_batch_size",
            "max_question_tokens", "max_stop_strings", "max_stop_chars", "max_messages", "max_name_chars",
            "max_body_bytes", "max_header_bytes", "max_connections")
TIMEOUTS = ("header_timeout", "body_timeout", "keep_alive_timeout")


@dataclass
class ServeConfig:
    """What ``rcc serve`` runs with.

    Attributes:
        model: ``--model`` spec (default: the bundled model, so it runs offline).
        host, port: where to listen (localhost by default).
        store: folder of memory files and the SQLite index (one server at a time: locked).
        api_key: when set, every API request needs ``Authorization: Bearer KEY``.
        insecure: allow a non-loopback ``host`` without ``api_key`` (refused otherwise).
        allowed_hosts: ``Host`` header names accepted besides loopback names and
            addresses, the ``host`` itself and (on a wildcard ``host``) any address;
            ``"*"`` accepts every name (DNS rebinding protection off).
        cors_origins: origins (``https://app.example``) whose pages may call the API;
            none by default (CORS off).
        max_context_tokens: longest document accepted (413 beyond), and the most tokens an
            append or the contexts one question reads together may hold in all.
        max_contexts_per_question: contexts one question may read together (``context_ids``; 413).
        max_document_bytes: largest document upload (413 before it is read); default
            32 bytes per ``max_context_tokens``, at least 1 MiB.
        max_body_bytes: largest body of any other request (questions, chat).
        max_question_tokens: longest question, or last user message (413).
        max_stop_strings, max_stop_chars: how many stop strings a request may give, and
            how long each may be (413).
        max_messages: longest chat message list (413).
        max_name_chars: longest document name (413).
        max_header_bytes: largest request head (request line and headers; 431).
        header_timeout: seconds a client has to send a request's head (408, closed).
        body_timeout: seconds a client has to send a request's body (408, closed).
        keep_alive_timeout: seconds an idle keep-alive connection stays open.
        max_connections: open connections at once; past it new ones get 503 and are closed.
        max_concurrent: questions waiting or running at once (429 beyond).
        max_batch: questions on one context answered in one generate call.
        max_new_tokens: the largest ``max_tokens`` a request may ask for.
        cache_mib: memory budget of the loaded-memory LRU.
        window_batch_size: windows encoded per compression step (questions are
            served between steps, so a long compression does not starve them).
        device, dtype: as the CLI's (``auto``: CUDA + bfloat16 when present).
        engine: ``transformers`` (this process runs the decoder) or ``vllm`` (the decoder
            runs in vLLM, rcc/serve/vllm_engine.py; needs ``bash scripts/vllm_env.sh``).
        max_model_len: vLLM's longest sequence, slots + prompt + answer (default: the
            decoder's ``max_position_embeddings``); longer contexts get 413.
    """

    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    store: str = ""
    api_key: str | None = None
    insecure: bool = False
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_context_tokens: int = 131072
    max_contexts_per_question: int = 16
    max_document_bytes: int | None = None
    max_body_bytes: int = 1 << 20
    max_question_tokens: int = 4096
    max_stop_strings: int = 8
    max_stop_chars: int = 128
    max_messages: int = 128
    max_name_chars: int = 256
    max_header_bytes: int = 16384
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 512
    max_concurrent: int = 64
    max_batch: int = 16
    max_new_tokens: int = 1024
    cache_mib: int = 2048
    window_batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "transformers"
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise RCCError(f"--engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.max_model_len is not None and int(self.max_model_len) <= 0:
            raise RCCError(f"--max-model-len must be positive; got {self.max_model_len}")
        if not self.store:
            self.store = default_store()
        for name in POSITIVE + (("max_document_bytes",) if self.max_document_bytes is not None else ()):
            if int(getattr(self, name)) <= 0:
                raise RCCError(f"--{name.replace('_', '-')} must be positive; got {getattr(self, name)}")
        for name in TIMEOUTS:
            if not 0 < float(getattr(self, name)) <= 3600:
                raise RCCError(f"--{name.replace('_', '-')} must be in (0, 3600] seconds; got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise RCCError(f"--port must be in 0..65535; got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise RCCError("the API key file is empty; write a key into it or drop --api-key-file")
        self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())
        self.cors_origins = tuple(o.strip().rstrip("/") for o in self.cors_origins if o.strip())
        for origin in self.cors_origins:
            if origin == "*" or "://" not in origin:
                raise RCCError(f"--cors-origins {origin!r}: give whole origins such as https://app.example "
                               "(a wildcard would let every web page call this server)")
        if not is_loopback(self.host) and not self.api_key and not self.insecure:
            raise RCCError(f"--host {self.host} without --api-key-file would let anyone who can reach this "
                           "machine use the server; give --api-key-file KEY, or --insecure if you mean it")

    def document_bytes(self) -> int:
        """The largest document upload: ``max_document_bytes``, by default 32 bytes per
        allowed token (far more than any text needs), at least 1 MiB."""
        if self.max_document_bytes is not None:
            return int(self.max_document_bytes)
        return max(1 << 20, 32 * int(self.max_context_tokens))


def read_api_key(path: str) -> str:
    """The key in ``path`` (surrounding whitespace ignored).

    Raises:
        RCCError: when the file is missing or empty.
    """
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise RCCError(f"--api-key-file {path}: cannot read it ({err}); give a UTF-8 file holding the key") from None
    if not key:
        raise RCCError(f"--api-key-file {path}: the file is empty; write the key into it")
    return key
