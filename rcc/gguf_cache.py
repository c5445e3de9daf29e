"""The embedded GGUF backbone, dequantised once into the cache and loaded with
safetensors (memory-mapped) afterwards.

Reading the GGUF costs most of a short ``rcc ask``: transformers parses the
file three times (config, tokenizer, weights) and dequantises every tensor,
about 30 s on a 2-core CPU, for the same result every time. So the first
load writes what it produced into a folder of the cache,
``<cache>/backbones/<gguf name>-<gguf sha256[:16]>-<dtype>/`` (``config.json``,
``model.safetensors``, the tokenizer files, ``rcc-cache.json``), and later
loads read that folder (about a second).

Trust: ``rcc-cache.json`` names the GGUF's sha256 and the dtype the folder was
made for, and every file's size and sha256. Each load checks all of them
before reading the weights; a truncated, corrupt or foreign folder is removed
and rebuilt from the GGUF with one warning. A cache that cannot be written
(read-only, full) costs one warning and the GGUF path, never a failure.
Folders appear atomically (built under a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from rcc.files import umask_mode

log = logging.getLogger(__name__)

FORMAT = "rcc-backbone-cache/2"  # 2: tied weights under the embedding's name
MANIFEST = "rcc-cache.json"
_HASHED: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: each file is hashed once per process


class CacheMiss(Exception):
    """A cache folder that is absent, or present and not to be trusted (the message says why)."""


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def known_sha256(path: Path) -> str:
    """:func:`file_sha256`, computed once per process for an unchanged file (same size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def cache_folder(gguf: Path, dtype: torch.dtype, root: Path | None = None) -> Path:
    """Where the dequantised ``gguf`` in ``dtype`` lives (whether or not it is there yet).

    The name holds the GGUF's sha256, the dtype and the transformers version that
    dequantised it (environments with other versions, such as the vLLM one, each
    keep their own folder instead of rebuilding each other's)."""
    from transformers import __version__ as tf_version

    from rcc.files import cache_root

    name = f"{gguf.stem}-{known_sha256(gguf)[:16]}-{str(dtype).removeprefix('torch.')}-tf{tf_version}"
    return (root or cache_root()) / "backbones" / name


def check_folder(folder: Path, gguf_sha: str, dtype: torch.dtype) -> None:
    """Check a cache folder against its manifest, the GGUF it should come from and the dtype.

    Raises:
        CacheMiss: when the folder is missing, or anything in it differs from what it should be.
    """
    path = folder / MANIFEST
    if not path.is_file():
        if folder.exists():
            raise CacheMiss(f"no {MANIFEST}")
        raise CacheMiss("not built yet")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheMiss(f"unreadable {MANIFEST} ({type(err).__name__})") from None
    want = {"format": FORMAT, "gguf_sha256": gguf_sha, "dtype": str(dtype).removeprefix("torch.")}
    for key, value in want.items():
        if manifest.get(key) != value:
            raise CacheMiss(f"made for {key} {manifest.get(key)!r}, not {value!r}")
    if "model.safetensors" not in files or "config.json" not in files:
        raise CacheMiss(f"{MANIFEST} lists no weights or config")
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    if present != set(files):
        raise CacheMiss(f"files {sorted(present ^ set(files))} differ from the manifest")
    for name, entry in files.items():  # sizes first: a truncated file is caught without hashing
        size = (folder / name).stat().st_size
        if size != entry.get("bytes"):
            raise CacheMiss(f"{name} has {size} bytes, the manifest says {entry.get('bytes')} (truncated?)")
    for name, entry in files.items():
        if known_sha256(folder / name) != entry.get("sha256"):
            raise CacheMiss(f"{name} does not match its checksum (corrupt)")


def read_folder(folder: Path, dtype: torch.dtype):
    """The model and tokenizer saved in a checked cache folder (weights memory-mapped by safetensors).

    Raises:
        CacheMiss: when transformers cannot read them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CacheMiss(f"transformers cannot read it ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return model.eval(), tok


def first_names(state: dict) -> dict:
    """``state`` with each tensor once, under the first name that holds its storage
    (a tied output head goes; the embedding it shares stays), made contiguous."""
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous()
    return out


def write_folder(folder: Path, model, tok, gguf_sha: str, dtype: torch.dtype) -> None:
    """Save ``model`` and ``tok`` as the cache folder ``folder``, atomically: built in a
    temporary folder beside it, then renamed (a concurrent builder's folder is kept).

    Raises:
        OSError: when the cache cannot be written (the temporary folder is removed).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}-", suffix=".part", dir=folder.parent))
    try:
        from safetensors.torch import save_file

        # transformers refuses save_pretrained on a GGUF-loaded model, whose config still
        # names the GGUF as its quantisation; these weights are plain (dequantised), so they
        # are written as a plain checkpoint, tied weights once under their first name (the
        # input embedding, as save_pretrained does: stored under the output head's name, the
        # embedding counts as missing and is initialised at every load, 0.2 s of 28M normals)
        save_file(first_names(model.state_dict()), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "gguf_sha256": gguf_sha, "dtype": str(dtype).removeprefix("torch."),
                    "files": files}
        from transformers import __version__ as tf_version

        manifest["transformers"] = tf_version
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        mode = umask_mode()  # as a plain mkdir / open would make them (mkdtemp makes owner-only)
        for p in tmp.iterdir():
            p.chmod(mode)
        tmp.chmod(mode | ((mode & 0o444) >> 2))  # a folder: x wherever r
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / MANIFEST).is_file():  # not a concurrent builder's finished folder
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_cached(gguf: Path, dtype: torch.dtype, build: Callable[[], tuple], root: Path | None = None):
    """``(model, tokenizer)`` of ``gguf`` in ``dtype``: from its cache folder when that checks out,
    else ``build()`` (the GGUF path), whose result is then written to the cache for next time.

    A folder that fails its checks is removed and rebuilt, with one warning; a cache that cannot
    be written gives one warning and the built model (the next load pays the GGUF path again).
    """
    try:
        folder = cache_folder(gguf, dtype, root)
        sha = known_sha256(gguf)
    except OSError as err:  # e.g. no home folder to put the cache in
        log.warning("no backbone cache (%s); loading the GGUF (set RCC_CACHE_DIR to a writable folder)", err)
        return build()
    try:
        check_folder(folder, sha, dtype)
        return read_folder(folder, dtype)
    except CacheMiss as why:
        if folder.exists():
            log.warning("the cached backbone %s is not usable (%s); rebuilding it from the GGUF", folder, why)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            log.info("dequantising %s into %s (once)", gguf.name, folder)
    model, tok = build()
    try:
        write_folder(folder, model, tok, sha, dtype)
    except Exception as err:  # noqa: BLE001  an optimisation: whatever stops the write (a read-only or full
        # disk: OSError, or safetensors' own error type), the model is loaded
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        log.warning("cannot write the backbone cache in %s (%s); loading the GGUF each time "
                    "(set RCC_CACHE_DIR to a writable folder)", folder.parent, why)
    return model, tok
