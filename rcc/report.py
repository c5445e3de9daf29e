"""What results and options are written in: token lengths such as ``4k``,
aligned text tables, the versions a result file records, and a process's
peak memory, and figures (matplotlib). Imports only :mod:`rcc.errors` and
:mod:`rcc.files` (and :mod:`rcc._version`)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

from rcc.errors import RCCError

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(text: str | int) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500 tokens (1k = 1024).

    Raises:
        RCCError: when not a positive number with an optional k/m suffix.
    """
    if isinstance(text, int):
        value = text
    else:
        m = _LENGTH.match(str(text))
        if not m:
            raise RCCError(f"bad length {text!r}: give a number of tokens with an optional k or m suffix, e.g. 4k, 32k, 1m")
        value = int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()])
    if value <= 0:
        raise RCCError(f"bad length {text!r}: must be at least one token")
    return value


def parse_lengths(text: str | list) -> list[int]:
    """A comma-separated list of lengths, e.g. ``"4k,32k,128k,1m"``, in the given order.

    Raises:
        RCCError: on an empty list or a bad item.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [parse_length(x) for x in items if str(x).strip()]
    if not out:
        raise RCCError("no lengths given; e.g. --lengths 4k,32k")
    return out


def names_list(text: str | list) -> list[str]:
    """``"float32, bfloat16"`` -> ``["float32", "bfloat16"]``: a comma-separated option's items, stripped,
    empty ones dropped (a list is taken as it is)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [str(x).strip() for x in items if str(x).strip()]


def versions() -> dict:
    """The versions a result file records."""
    import torch
    import transformers

    from rcc._version import __version__

    return {"rcc-llm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _cell(value) -> str:
    if isinstance(value, float):
        a = abs(value)
        return f"{value:.0f}" if a >= 100 else f"{value:.1f}" if a >= 10 else f"{value:.2f}" if a >= 1 or a == 0 \
            else f"{value:.3f}"
    return str(value)


def render_table(header: list[str], rows: list[list]) -> str:
    """A plain aligned text table (first column left-aligned, others right-aligned)."""
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed).

    Raises:
        RCCError: when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise RCCError("plots need matplotlib: pip install 'rcc-llm[eval]' (or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tokens_label(n: int) -> str:
    """4096 -> "4k", 1048576 -> "1m", 1500 -> "1500"."""
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG, atomically; returns the path."""
    from rcc.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path
