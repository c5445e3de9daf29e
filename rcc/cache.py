"""Where rcc-llm keeps what it can rebuild: ``$RCC_CACHE_DIR``, else
``$XDG_CACHE_HOME/rcc``, else ``~/.cache/rcc`` (the XDG base directory rule).

Below: the dequantised embedded backbone (:mod:`rcc.backbones`), the CPU's
dtype measurement (:mod:`rcc.precision`) and the server's default store
(:mod:`rcc.serve.config`). Everything here can be deleted at any time; it is
rebuilt on the next use."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get("RCC_CACHE_DIR"):
        return Path(os.environ["RCC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rcc"
