"""Server settings: one validated dataclass, one default per fact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bundled import DEFAULT_MODEL
from ..cache import cache_root
from ..errors import RCCError

ENGINES = ("transformers", "vllm")


def default_store() -> str:
    """``serve`` in the cache folder (:func:`rcc.cache.cache_root`: ``~/.cache/rcc/serve``)."""
    return str(cache_root() / "serve")


@dataclass
class ServeConfig:
    """What ``rcc serve`` runs with.

    Attributes:
        model: ``--model`` spec (default: the bundled model, so it runs offline).
        host, port: where to listen (localhost by default).
        store: folder of memory files and the SQLite index.
        api_key: when set, every API request needs ``Authorization: Bearer KEY``.
        max_context_tokens: longest document accepted (413 beyond).
        max_concurrent: questions waiting or running at once (429 beyond).
        max_batch: questions on one context answered in one generate call.
        max_new_tokens: the largest ``max_tokens`` a request may ask for.
        cache_mib: memory budget of the loaded-memory LRU.
        window_batch_size: windows encoded per compression step (questions are
            served between steps, so a long compression does not starve them).
        device, dtype: as the CLI's (``auto``: CUDA + bfloat16 when present).
        engine: ``transformers`` (this process runs the decoder) or ``vllm`` (the decoder
            runs in vLLM, rcc/vllm/engine.py; needs ``bash scripts/vllm_env.sh``).
        max_model_len: vLLM's longest sequence, slots + prompt + answer (default: the
            decoder's ``max_position_embeddings``); longer contexts get 413.
    """

    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    store: str = ""
    api_key: str | None = None
    max_context_tokens: int = 131072
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
        for name in ("max_context_tokens", "max_concurrent", "max_batch", "max_new_tokens", "cache_mib",
                     "window_batch_size"):
            if int(getattr(self, name)) <= 0:
                raise RCCError(f"--{name.replace('_', '-')} must be positive; got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise RCCError(f"--port must be in 0..65535; got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise RCCError("the API key file is empty; write a key into it or drop --api-key-file")


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
