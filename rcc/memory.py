"""A compressed context: the decoder's KV cache over the slots, reusable for
any number of questions, and its single-file format (safetensors + metadata).

Format ``rcc-memory/3`` (written now): the safetensors metadata holds the fields of
:meth:`CompressedContext.metadata`, the storage ``dtype``, ``tensors_sha256`` (names,
dtypes, shapes and bytes of every tensor) and ``metadata_sha256`` (every other
metadata field, so a changed field is caught without reading the tensors). Besides
the KV tensors a file may hold ``slots``, the decoder's inputs at the slots (G and
every A_i), which is what lets a memory be read after another one
(:meth:`rcc.RCCModel.combine`); ``segments`` lists the token counts of the texts
compressed one after another (each cut into its own windows: an append keeps the
cut), ``parents`` the content hashes of the memories it was made from.
Files of format ``rcc-memory/2`` (no slots, one segment) still load, and so do
those of ``rcc-memory/1``: their tensor checksum and their tensor shapes against
``layers`` / ``num_slots`` are checked, their other fields are not covered.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import DynamicCache

from rcc.errors import RCCError
from rcc.files import atomic_save_file

FORMAT = "rcc-memory/3"
FORMAT_V2 = "rcc-memory/2"
FORMAT_V1 = "rcc-memory/1"
FORMATS = (FORMAT, FORMAT_V2, FORMAT_V1)
#: the tensor of a memory's slot inputs (format 3): ``[batch, num_slots, layers + 1, H_D]``
SLOTS = "slots"
#: storage dtypes of a memory file's KV tensors, by name (``save(dtype=...)``, ``--storage-dtype``)
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float64": torch.float64}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_INT_FIELDS = ("num_tokens", "num_slots", "window", "ratio", "layers")
RECOMPRESS = "recreate it with `rcc compress`"


def token_hash(ids: torch.Tensor) -> str:
    """sha256 of a context's token ids ``[batch, n]`` (before padding)."""
    data = ids.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def tensors_hash(tensors: dict[str, torch.Tensor], shapes: bool = True) -> str:
    """sha256 over every tensor's name, (format 2:) dtype and shape, and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        if shapes:
            h.update(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def metadata_hash(meta: dict[str, str]) -> str:
    """sha256 of every metadata field but ``metadata_sha256`` itself (canonical JSON)."""
    rest = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def save_signed(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str], what: str) -> Path:
    """Write ``tensors`` to one safetensors file at ``path``, atomically, with ``meta``
    signed: ``tensors_sha256`` (:func:`tensors_hash`) and ``metadata_sha256``
    (:func:`metadata_hash`) added, so a reader detects any change. Memory files and
    the vLLM path's slot files both use it.

    Raises:
        RCCError: one line naming the ``what`` that could not be written.
    """
    meta = dict(meta, tensors_sha256=tensors_hash(tensors))
    meta["metadata_sha256"] = metadata_hash(meta)
    try:
        atomic_save_file(tensors, path, meta)
    except OSError as err:
        raise RCCError(f"{path}: cannot write the {what} ({err.strerror or err})") from None
    return path


def storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype a memory file can store (None stays None).

    Raises:
        RCCError: for any other dtype.
    """
    if dtype is None or dtype in STORAGE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype]
    raise RCCError(f"storage dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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
            after pre-filling the slots (docs/method.md section 4). A loaded memory keeps the
            file's storage dtype; :meth:`cache` casts to the model's dtype.
        num_tokens: context tokens before padding to whole windows.
        num_slots: slot positions P (= windows * window / ratio).
        window, ratio: the model's W and r when it was made.
        model_id: fingerprint of the model that made it (see ``RCCModel.fingerprint``).
        content_hash: sha256 of the context token ids (of a memory made from others:
            of their content hashes).
        slots: ``[batch, num_slots, L_D + 1, H_D]`` or None: what the decoder read at
            each slot, ``slots[:, :, 0]`` = G(level 0) (the input embedding) and
            ``slots[:, :, i + 1]`` = A_i (added after decoder layer i). The KV cache
            follows from them; they let the memory be pre-filled after another one
            (:meth:`rcc.RCCModel.combine`). None: the memory can only be read first.
        segments: token counts of the texts compressed one after another, each cut
            into its own windows (``rcc compress --append-to`` keeps the cut); they
            sum to ``num_tokens``. Empty means one text of ``num_tokens``.
        parents: content hashes of the memories this one was made from, in order
            (the memory an append extended; the memories combined).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    num_tokens: int
    num_slots: int
    window: int
    ratio: int
    model_id: str
    content_hash: str
    slots: torch.Tensor | None = None
    segments: tuple[int, ...] = ()
    parents: tuple[str, ...] = ()

    @property
    def pieces(self) -> tuple[int, ...]:
        """The token counts of its texts (:attr:`segments`, or the one text)."""
        return tuple(self.segments) or (self.num_tokens,)

    def slot_inputs(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder's inputs at slots ``start:end``: ``(embeds [batch, j, H_D],
        additions: L_D x [batch, j, H_D])``, as :meth:`rcc.RCCModel.iter_slots` yields them.

        Raises:
            RCCError: when the memory holds no slot inputs.
        """
        if self.slots is None:
            raise RCCError("this memory holds no slot inputs (it was compressed with --no-slots, or by an older "
                           f"rcc-llm), so it can only be read first; {RECOMPRESS} to read it after another")
        part = self.slots[:, start:end]
        return part[:, :, 0], list(part[:, :, 1:].unbind(2))

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

    def nbytes(self, dtype: str | torch.dtype | None = None) -> int:
        """Bytes of the KV tensors and slot inputs, as held now or (``dtype``) as stored in that dtype."""
        size = storage_dtype(dtype)
        total = 0
        for t in self._tensors().values():
            total += t.numel() * (t.element_size() if size is None else size.itemsize)
        return total

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of its file, by name."""
        out = {}
        for i, (k, v) in enumerate(self.kv):
            out[f"layers.{i}.keys"], out[f"layers.{i}.values"] = k, v
        if self.slots is not None:
            out[SLOTS] = self.slots
        return out

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
            "segments": json.dumps(list(self.pieces)),
            "parents": json.dumps(list(self.parents)),
        }

    def save(self, path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """Write to one safetensors file, atomically (a temp file renamed into place).

        Args:
            path: the file to write (e.g. ``doc.rcc``).
            dtype: storage dtype of the KV tensors (``"bfloat16"`` or ``"float16"`` halve
                a float32 memory's file); None keeps the tensors' own dtype, bit-exact.
        Raises:
            RCCError: on an unknown dtype, values that overflow float16, or a failed write.
        """
        path = Path(path)
        target = storage_dtype(dtype) or self.kv[0][0].dtype
        tensors = {}
        for name, t in self._tensors().items():
            stored = t.detach().to("cpu", target).contiguous()
            if stored.dtype != t.dtype and not torch.isfinite(stored).all() and torch.isfinite(t).all():
                raise RCCError(f"the memory's values overflow {dtype_name(target)}; store it as "
                               "bfloat16 or float32 instead")
            tensors[name] = stored
        return save_signed(tensors, path, self.metadata() | {"dtype": dtype_name(target)}, "memory file")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: str | torch.dtype | None = None) -> "CompressedContext":
        """Read a file written by :meth:`save`.

        Args:
            device: where the KV tensors go.
            dtype: cast them to this dtype; None keeps the storage dtype (the model
                casts to its own when it uses the memory, see :meth:`cache`).
        Raises:
            RCCError: when the file is missing, truncated, corrupt, not a memory file,
                or its metadata does not fit its tensors.
        """
        meta = read_memory_metadata(path)
        fields = memory_fields(meta, path)
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as err:
            raise RCCError(f"{path}: cannot read the memory file ({err}); {RECOMPRESS}") from None
        if tensors_hash(tensors, shapes=meta["format"] != FORMAT_V1) != meta.get("tensors_sha256"):
            raise RCCError(f"{path}: memory file is corrupt (checksum mismatch); {RECOMPRESS}")
        check_finite(tensors, path)
        cast = storage_dtype(dtype)
        kv = [(tensors[f"layers.{i}.keys"].to(device, cast), tensors[f"layers.{i}.values"].to(device, cast))
              for i in range(fields["layers"])]
        slots = tensors[SLOTS].to(device, cast) if SLOTS in tensors else None
        segments, parents = memory_pieces(meta, fields, path)
        return cls(kv=kv, num_tokens=fields["num_tokens"], num_slots=fields["num_slots"], window=fields["window"],
                   ratio=fields["ratio"], model_id=meta["model_id"], content_hash=meta["content_hash"], slots=slots,
                   segments=tuple(segments), parents=tuple(parents))


def check_finite(tensors: dict[str, torch.Tensor], path) -> None:
    """Raises RCCError naming the first tensor that holds NaN or Inf (a memory made by a
    model that overflowed, or written so: its checksum cannot tell)."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RCCError(f"{path}: tensor {name!r} holds NaN or Inf values; {RECOMPRESS}")


def memory_fields(meta: dict[str, str], path) -> dict[str, int]:
    """The integer fields of a memory's metadata, checked against each other.

    Raises:
        RCCError: naming the first missing or inconsistent field.
    """
    out = {}
    for key in _INT_FIELDS:
        value = meta.get(key)
        if value is None:
            raise RCCError(f"{path}: memory file lacks the field {key!r}; {RECOMPRESS}")
        if not re.fullmatch(r"[0-9]{1,18}", value) or int(value) < 1:
            raise RCCError(f"{path}: memory field {key!r} is {value!r}, not a positive integer; {RECOMPRESS}")
        out[key] = int(value)
    for key in ("model_id", "content_hash"):
        if not meta.get(key):
            raise RCCError(f"{path}: memory file lacks the field {key!r}; {RECOMPRESS}")
    window, ratio, slots, tokens = out["window"], out["ratio"], out["num_slots"], out["num_tokens"]
    per_window = window // ratio
    windows = slots // per_window if window % ratio == 0 else 0
    # every window holds at least one context token and at most `window` of them
    if not windows or slots % per_window or not math.ceil(tokens / window) <= windows <= tokens:
        raise RCCError(f"{path}: memory fields disagree (num_tokens {tokens}, num_slots {slots}, window {window}, "
                       f"ratio {ratio}); {RECOMPRESS}")
    return out


def memory_pieces(meta: dict[str, str], fields: dict[str, int], path) -> tuple[list[int], list[str]]:
    """``(segments, parents)`` of a memory's metadata (format 3; older files: one segment of
    ``num_tokens``, no parents), checked against its other fields (``fields``: :func:`memory_fields`).

    Raises:
        RCCError: naming the field that is missing or does not fit.
    """
    if meta.get("format") != FORMAT:
        return [fields["num_tokens"]], []
    tokens, window = fields["num_tokens"], fields["window"]
    windows = fields["num_slots"] // (window // fields["ratio"])
    segments, parents = _json_list(meta, "segments", path), _json_list(meta, "parents", path)
    if not segments or not all(type(x) is int and x >= 1 for x in segments) or sum(segments) != tokens \
            or sum(math.ceil(x / window) for x in segments) != windows:
        raise RCCError(f"{path}: memory field 'segments' {meta['segments'][:80]!r} does not fit num_tokens "
                       f"{tokens} in {windows} windows; {RECOMPRESS}")
    if not all(isinstance(x, str) and re.fullmatch(r"[0-9a-f]{8,64}", x) for x in parents):
        raise RCCError(f"{path}: memory field 'parents' {meta['parents'][:80]!r} is not a list of content "
                       f"hashes; {RECOMPRESS}")
    return segments, parents


def _json_list(meta: dict[str, str], key: str, path) -> list:
    value = meta.get(key)
    if value is None:
        raise RCCError(f"{path}: memory file lacks the field {key!r}; {RECOMPRESS}")
    try:
        out = json.loads(value)
    except (ValueError, RecursionError):
        out = None
    if not isinstance(out, list):
        raise RCCError(f"{path}: memory field {key!r} is {value[:80]!r}, not a JSON list; {RECOMPRESS}")
    return out


#: the largest safetensors header read (a memory's is a few KiB: two entries per layer and
#: the metadata); a header size above it is a lie or not a memory file, refused unread
MAX_HEADER_BYTES = 1 << 20


def read_header(path: Path) -> tuple[dict[str, str], dict[str, dict], int]:
    """``(metadata, tensor entries, file size its header describes)`` of a safetensors file.

    Raises:
        ValueError: for a header that is cut short, too large, not JSON or not safetensors'.
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("file too short")
        size = int.from_bytes(head, "little")
        if size <= 0 or size > MAX_HEADER_BYTES:
            raise ValueError(f"bad header size {size}")
        raw = fh.read(size)
        if len(raw) < size:
            raise ValueError("header cut short")
    try:
        header = json.loads(raw)
    except RecursionError:
        raise ValueError("header nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("bad metadata")
    for name, e in header.items():
        offsets = e.get("data_offsets") if isinstance(e, dict) else None
        shape = e.get("shape") if isinstance(e, dict) else None
        if (not isinstance(offsets, list) or not isinstance(e.get("dtype"), str) or len(offsets) != 2
                or not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in offsets + shape)):
            raise ValueError(f"bad entry for tensor {name!r}")
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    return meta, header, 8 + size + end


def read_memory_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a memory file, checked without loading its tensors: the
    format, the file's size against its header, the metadata checksum (format 2),
    the fields against each other and against the tensors' names, shapes and dtype.
    ``dtype`` is the tensors' storage dtype (for format 1 files read from the header).

    Raises:
        RCCError: when the file is missing, incomplete, not a memory file, or a field is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise RCCError(f"{path}: no such memory file; create one with `rcc compress`")
    try:
        meta, entries, expected = read_header(path)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise RCCError(f"{path}: not an RCC memory file ({err}); create one with `rcc compress`") from None
    if meta.get("format") not in FORMATS:
        raise RCCError(f"{path}: not an RCC memory file (format {meta.get('format')!r}, expected {FORMAT!r})")
    actual = path.stat().st_size
    if actual != expected:
        what = "incomplete (an interrupted write or copy?)" if actual < expected else "longer than its header says"
        raise RCCError(f"{path}: memory file is {what}: {actual} bytes, its header describes {expected}; "
                       f"{RECOMPRESS}")
    if meta["format"] != FORMAT_V1 and meta.get("metadata_sha256") != metadata_hash(meta):
        raise RCCError(f"{path}: memory file is corrupt (its metadata does not match its checksum); {RECOMPRESS}")
    fields = memory_fields(meta, path)
    names = {f"layers.{i}.{part}" for i in range(fields["layers"]) for part in ("keys", "values")}
    if meta["format"] == FORMAT and SLOTS in entries:
        names.add(SLOTS)
    if set(entries) != names:
        odd = sorted(set(entries) ^ names, key=lambda n: (len(n), n))[0]
        why = "lacks the tensor" if odd in names else "has an unexpected tensor"
        raise RCCError(f"{path}: memory file {why} {odd!r} (layers {fields['layers']}); {RECOMPRESS}")
    dtypes = {e["dtype"] for e in entries.values()}
    batches = {tuple(e["shape"])[:1] for e in entries.values()}
    if SLOTS in entries:
        shape = entries[SLOTS]["shape"]
        if len(shape) != 4 or shape[1:3] != [fields["num_slots"], fields["layers"] + 1] or 0 in shape:
            raise RCCError(f"{path}: memory tensor 'slots' has shape {tuple(shape)}, expected [batch, "
                           f"{fields['num_slots']} (num_slots), {fields['layers'] + 1} (layers + 1), hidden]; "
                           f"{RECOMPRESS}")
    for name, e in sorted(entries.items()):
        if name == SLOTS:
            continue
        shape = e["shape"]
        if len(shape) != 4 or shape[2] != fields["num_slots"] or 0 in shape:
            raise RCCError(f"{path}: memory tensor {name!r} has shape {tuple(shape)}, expected [batch, kv_heads, "
                           f"{fields['num_slots']} (num_slots), head_dim]; {RECOMPRESS}")
    stored = SAFETENSORS_DTYPES.get(next(iter(dtypes))) if len(dtypes) == 1 else None
    if len(batches) != 1 or stored is None or meta.setdefault("dtype", stored) != stored:
        raise RCCError(f"{path}: memory tensors disagree with each other or with the dtype field "
                       f"({', '.join(sorted(dtypes))} vs {meta.get('dtype')!r}); {RECOMPRESS}")
    memory_pieces(meta, fields, path)
    return meta
