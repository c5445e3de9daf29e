"""A compressed context: the decoder's KV cache over the slots, reusable for
any number of questions, and its single-file format (safetensors + metadata)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from .errors import RCCError

FORMAT = "rcc-memory/1"


def token_hash(ids: torch.Tensor) -> str:
    """sha256 of a context's token ids ``[batch, n]`` (before padding)."""
    data = ids.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def _tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def kv_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) of a cache, each ``[batch, kv_heads, slots, head_dim]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@dataclass
class CompressedContext:
    """A context compressed by an :class:`~rcc.RCCModel`.

    Attributes:
        kv: per decoder layer ``(keys, values)``, each
            ``[batch, kv_heads, num_slots, head_dim]``: the decoder's KV cache
            after pre-filling the slots (spec section 4).
        num_tokens: context tokens before padding to whole windows.
        num_slots: slot positions P (= windows * window / ratio).
        window, ratio: the model's W and r when it was made.
        model_id: fingerprint of the model that made it (see ``RCCModel.fingerprint``).
        content_hash: sha256 of the context token ids.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    num_tokens: int
    num_slots: int
    window: int
    ratio: int
    model_id: str
    content_hash: str

    @property
    def batch_size(self) -> int:
        return self.kv[0][0].shape[0]

    def cache(self, batch_size: int | None = None, device=None, dtype=None) -> DynamicCache:
        """A fresh KV cache holding the slots, for one generation call.

        Generation appends to the cache it is given, so every call gets its own
        (the stored tensors are never modified). With ``batch_size`` a
        single-context memory is repeated for a batch of questions.

        Raises:
            RCCError: when the batch sizes cannot be matched.
        """
        kv = self.kv
        if batch_size is not None and batch_size != self.batch_size:
            if self.batch_size != 1:
                raise RCCError(
                    f"this memory holds {self.batch_size} contexts but {batch_size} prompts were "
                    "given; give one prompt per context, or compress a single context"
                )
            kv = [(k.expand(batch_size, *k.shape[1:]), v.expand(batch_size, *v.shape[1:])) for k, v in kv]
        return cache_from([(k.to(device, dtype, copy=True), v.to(device, dtype, copy=True)) for k, v in kv])

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "num_tokens": str(self.num_tokens),
            "num_slots": str(self.num_slots),
            "window": str(self.window),
            "ratio": str(self.ratio),
            "model_id": self.model_id,
            "content_hash": self.content_hash,
            "layers": str(len(self.kv)),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write to one safetensors file, atomically (a temp file renamed into place)."""
        path = Path(path)
        tensors = {}
        for i, (k, v) in enumerate(self.kv):
            tensors[f"layers.{i}.keys"] = k.detach().cpu().contiguous()
            tensors[f"layers.{i}.values"] = v.detach().cpu().contiguous()
        meta = self.metadata()
        meta["tensors_sha256"] = _tensors_hash(tensors)
        atomic_save_file(tensors, path, meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "CompressedContext":
        """Read a file written by :meth:`save`.

        Raises:
            RCCError: when the file is missing, truncated, corrupt or not a memory file.
        """
        meta = read_memory_metadata(path)
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as err:
            raise RCCError(f"{path}: cannot read the memory file ({err}); recreate it with `rcc compress`") from None
        if _tensors_hash(tensors) != meta.get("tensors_sha256"):
            raise RCCError(f"{path}: memory file is corrupt (checksum mismatch); recreate it with `rcc compress`")
        n = int(meta["layers"])
        try:
            kv = [(tensors[f"layers.{i}.keys"].to(device), tensors[f"layers.{i}.values"].to(device)) for i in range(n)]
        except KeyError as err:
            raise RCCError(f"{path}: memory file lacks tensor {err}; recreate it with `rcc compress`") from None
        return cls(
            kv=kv,
            num_tokens=int(meta["num_tokens"]),
            num_slots=int(meta["num_slots"]),
            window=int(meta["window"]),
            ratio=int(meta["ratio"]),
            model_id=meta["model_id"],
            content_hash=meta["content_hash"],
        )


def read_memory_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a memory file, without loading its tensors.

    Raises:
        RCCError: when the file is missing or is not a memory file.
    """
    path = Path(path)
    if not path.is_file():
        raise RCCError(f"{path}: no such memory file; create one with `rcc compress`")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file too short")
            size = int.from_bytes(head, "little")
            if size <= 0 or size > 100_000_000:
                raise ValueError("bad header size")
            header = json.loads(fh.read(size))
        meta = header.get("__metadata__") or {}
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise RCCError(f"{path}: not an RCC memory file ({err}); create one with `rcc compress`") from None
    if meta.get("format") != FORMAT:
        raise RCCError(f"{path}: not an RCC memory file (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def _umask_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp makes owner-only files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """Yield a temp path in ``path``'s folder; on success it is renamed onto ``path``
    (with the umask's mode), on failure removed: a crash or a full disk never
    leaves a partial file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, atomically."""
    with _atomic(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file, atomically."""
    with _atomic(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
