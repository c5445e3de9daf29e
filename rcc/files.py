"""Files: reading a user's text, writing atomically (text, JSON, safetensors),
and the cache folder rcc-llm keeps what it can rebuild in. Below everything
else in the package: it imports only :mod:`rcc.errors`.

The cache folder is ``$RCC_CACHE_DIR``, else ``$XDG_CACHE_HOME/rcc``, else
``~/.cache/rcc`` (the XDG base directory rule). It holds the dequantised
embedded backbone (:mod:`rcc.gguf_cache`), the CPU's dtype measurement
(:mod:`rcc.precision`) and the server's default store (:mod:`rcc.serve.config`);
everything in it can be deleted at any time and is rebuilt on the next use."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rcc.errors import RCCError


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


def cache_root() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get("RCC_CACHE_DIR"):
        return Path(os.environ["RCC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rcc"
