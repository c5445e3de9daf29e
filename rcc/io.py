"""Small helpers every entry point shares: reading a user's text file and
lengths such as ``4k``, atomic writes (text, JSON, safetensors), aligned text
tables, and the versions a result file records. Below everything else in the
package: it imports only :mod:`rcc.errors` (and :mod:`rcc._version`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import RCCError

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def read_text(path: str) -> str:
    """Read a UTF-8 text file, or standard input for ``-``.

    Raises:
        RCCError: when missing, not UTF-8, or empty.
    """
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise RCCError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RCCError(f"{path}: is a folder, give a text file") from None
    except OSError as err:
        raise RCCError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        name = "standard input" if path == "-" else path
        raise RCCError(f"{name}: not UTF-8 text (bad byte at offset {err.start}); convert it to UTF-8 first") from None
    if not text.strip():
        raise RCCError(f"{'standard input' if path == '-' else path}: the context is empty; give some text to compress")
    return text


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


def umask_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp makes owner-only files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable(path: str | os.PathLike) -> Path:
    """Check, before any long work, that a file can be written at ``path`` the way
    the atomic writers do (a temp file in its folder, created if missing); writes
    nothing but a probe file it removes at once.

    Raises:
        RCCError: when ``path`` is a folder, lies under a file, or its folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise RCCError(f"{path}: is a folder; give a file name, e.g. {path / 'doc.rcc'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise RCCError(f"{path}: cannot write there, {folder} is a file and not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as err:
        raise RCCError(f"{path}: cannot write in the folder {folder} ({err.strerror or err}); "
                       "choose another output") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours
        return True
    return True


def clean_stale_parts(path: Path) -> list[Path]:
    """Remove the temp files that killed writers of ``path`` left beside it:
    ``.NAME.PID-XXXXXXXX.part`` whose process is gone, and ``.NAME.XXXXXXXX.part``
    (the pattern before the PID was recorded). Only this target's own pattern is
    touched; a live writer's part is kept.

    Returns:
        the files removed.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:([0-9]+)-)?[a-z0-9_]{{8}}\.part")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            m = pattern.fullmatch(entry.name)
            if m is None or not entry.is_file(follow_symlinks=False):
                continue
            if m.group(1) is not None and _pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """Yield a temp path in ``path``'s folder; on success it is renamed onto ``path``
    (with the umask's mode), on failure removed: a crash or a full disk never
    leaves a partial file at ``path``, and parts a killed writer left are removed
    by the next write to ``path`` (:func:`clean_stale_parts`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_parts(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_file(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically (temp file + rename)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return path


def versions() -> dict:
    """The versions a result file records."""
    import torch
    import transformers

    from ._version import __version__

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
