"""The slots as vLLM's decoder reads them, and their file (format ``rcc-slots/1``).

A :class:`~rcc.CompressedContext` holds the decoder's KV cache over the slots; vLLM
keeps its own paged KV cache and computes it itself, so what it needs is one step
earlier: per slot, the input embedding G(level 0) and every layer's addition A_i
(docs/method.md section 1). :class:`SlotMemory` holds those, ``[P, L_D + 1, H_D]``, made once
per context by rcc-llm's encoder (:func:`compress_slots`) and sent with each
question as the multimodal item (:meth:`SlotMemory.payload`); vLLM's prefix cache,
keyed on the item's uuid (:meth:`SlotMemory.uuid`), keeps the slots' KV between
questions, so questions 2..N do not run the slots through the decoder again.

Size: (L_D + 1) H_D values per slot against 2 L_D kv_heads head_dim for the KV
cache (SmolLM2-135M: 17,856 against 11,520, 1.55x).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rcc import adapters
from rcc.errors import RCCError
from rcc.memory import (RECOMPRESS, SAFETENSORS_DTYPES, STORAGE_DTYPES, memory_fields, metadata_hash, read_header, save_signed, tensors_hash,
                      check_finite, dtype_name, storage_dtype, token_hash)

FORMAT = "rcc-slots/1"
#: the payload's field names (the multimodal item's keys)
SLOTS_FIELD, MODEL_FIELD = "rcc_slots", "rcc_model_id"
_AGAIN = "compress the context again with this model"


def model_id_tensor(model_id: str) -> torch.Tensor:
    """A model fingerprint as the uint8 tensor the payload carries: ``[len(model_id)]``."""
    return torch.tensor(list(model_id.encode("ascii")), dtype=torch.uint8)


def model_id_of(t: torch.Tensor) -> str:
    """The fingerprint a payload's ``rcc_model_id`` tensor names ('?' if unreadable)."""
    try:
        return bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("ascii")
    except (UnicodeDecodeError, RuntimeError, ValueError):
        return "?"


@dataclass
class SlotMemory:
    """A context compressed for vLLM.

    Attributes:
        slots: ``[P, L_D + 1, H_D]``; ``slots[:, 0]`` = G(level 0), the slot's input
            embedding; ``slots[:, i + 1]`` = A_i, added to the residual stream after
            decoder layer i (docs/method.md section 1).
        num_tokens, window, ratio, model_id, content_hash: as in :class:`~rcc.CompressedContext`.
    """

    slots: torch.Tensor
    num_tokens: int
    window: int
    ratio: int
    model_id: str
    content_hash: str

    @property
    def num_slots(self) -> int:
        return self.slots.shape[0]

    @property
    def layers(self) -> int:
        return self.slots.shape[1] - 1

    def uuid(self) -> str:
        """The item's identity for vLLM's caches (``multi_modal_uuids``): model and content."""
        return f"rcc-{self.model_id}-{self.content_hash[:32]}"

    def payload(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The multimodal item vLLM's processor takes: ``rcc_slots [1, P, (L_D + 1) H_D]``
        (one item) and ``rcc_model_id`` (the fingerprint, checked against the served model)."""
        flat = self.slots.reshape(1, self.num_slots, -1)
        return {SLOTS_FIELD: flat if dtype is None else flat.to(dtype),
                MODEL_FIELD: model_id_tensor(self.model_id).unsqueeze(0)}

    def chat_part(self) -> dict:
        """The memory as a content part of an OpenAI chat message for plain ``vllm serve``
        (``--enable-mm-embeds``): vLLM's ``image_embeds`` part with the payload's tensors as
        base64 ``.npy`` (numpy's format, which vLLM reads without pickle) and the uuid."""
        import base64
        import io

        import numpy as np

        def b64(t: torch.Tensor) -> str:
            buf = io.BytesIO()
            np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
            return base64.b64encode(buf.getvalue()).decode()

        data = self.payload(torch.float32)
        return {"type": "image_embeds", "uuid": self.uuid(),
                "image_embeds": {SLOTS_FIELD: b64(data[SLOTS_FIELD][0]), MODEL_FIELD: b64(data[MODEL_FIELD][0])}}

    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size()

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "num_tokens": str(self.num_tokens), "num_slots": str(self.num_slots),
                "window": str(self.window), "ratio": str(self.ratio), "model_id": self.model_id,
                "content_hash": self.content_hash, "layers": str(self.layers)}

    def save(self, path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """One safetensors file, written atomically; ``dtype`` as in :meth:`rcc.CompressedContext.save`.

        Raises:
            RCCError: on an unknown dtype or a failed write.
        """
        path = Path(path)
        tensors = {"slots": self.slots.detach().to("cpu", storage_dtype(dtype) or self.slots.dtype).contiguous()}
        return save_signed(tensors, path, self.metadata() | {"dtype": dtype_name(tensors["slots"].dtype)}, "slot file")

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", dtype: str | torch.dtype | None = None) -> "SlotMemory":
        """Read a file written by :meth:`save`.

        Raises:
            RCCError: when the file is missing, cut short, corrupt or not a slot file.
        """
        path = Path(path)
        if not path.is_file():
            raise RCCError(f"{path}: no such slot file; make one with rcc serve --engine vllm (or compress_slots)")
        try:
            meta, entries, expected = read_header(path)
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            if path.stat().st_size != expected:
                raise ValueError(f"{path.stat().st_size} bytes, its header describes {expected}")
            if meta.get("metadata_sha256") != metadata_hash(meta):
                raise ValueError("its metadata does not match its checksum")
            if set(entries) != {"slots"}:  # before any tensor is read
                raise ValueError(f"tensors {sorted(entries)[:4]}, expected only 'slots'")
            if meta.get("dtype") != SAFETENSORS_DTYPES.get(entries["slots"]["dtype"]):
                raise ValueError(f"tensor dtype {entries['slots']['dtype']} disagrees with the dtype field")
            ints = memory_fields(meta, path)
            shape = entries["slots"]["shape"]
            if len(shape) != 3 or shape[:2] != [ints["num_slots"], ints["layers"] + 1] or not shape[2]:
                raise ValueError(f"slots of shape {tuple(shape)} disagree with its fields")
            tensors = load_file(str(path), device="cpu")
            if tensors_hash(tensors) != meta.get("tensors_sha256"):
                raise ValueError("checksum mismatch")
            check_finite(tensors, path)
            slots = tensors["slots"]
        except RCCError as err:  # the shared field and value checks name the file themselves
            raise RCCError(f"not a usable slot file: {err}".replace(f"; {RECOMPRESS}", f"; {_AGAIN}")) from None
        except (ValueError, KeyError, OSError, SafetensorError, UnicodeDecodeError) as err:
            raise RCCError(f"{path}: not a usable slot file ({err}); {_AGAIN}") from None
        cast = storage_dtype(dtype)
        return cls(slots=slots.to(device, cast), num_tokens=ints["num_tokens"], window=ints["window"],
                   ratio=ints["ratio"], model_id=meta["model_id"], content_hash=meta["content_hash"])


def check_slots(model, memory: SlotMemory) -> None:
    """Raises RCCError when ``memory`` was made by another model than ``model`` (an RCCModel)."""
    mine = model.fingerprint()
    if memory.model_id != mine or memory.layers != len(model.A) or memory.slots.shape[2] != model.G.out_features:
        raise RCCError(f"this memory was made by another model (model id {memory.model_id}, {memory.layers} layers, "
                       f"hidden {memory.slots.shape[2]}) than the one loaded (model id {mine}, {len(model.A)} "
                       f"layers, hidden {model.G.out_features}); {_AGAIN}")


@torch.no_grad()
def compress_slots(model, context_ids, window_batch_size: int | None = 8,
                   progress: Callable[[int], None] | None = None, prefix: SlotMemory | None = None) -> SlotMemory:
    """Compress ``context_ids [1, n]`` (or ``[n]``) into a :class:`SlotMemory` with ``model``'s
    encoder, G and A_i, a batch of windows at a time; the decoder does not run.

    Args:
        prefix: a memory to extend (its slots first, then the new windows'), as
            :meth:`rcc.RCCModel.compress` does with ``prefix``: the decoder reads the
            concatenated slots causally, so this equals compressing onto its KV cache.
        progress: called with the number of windows done after each step.
    Raises:
        RCCError: on an empty context, a batch of several contexts, a prefix from
            another model, or more positions than an absolute-position decoder has.
    """
    ids = model._check_context(context_ids)
    if ids.shape[0] != 1:
        raise RCCError(f"compress one context at a time for vLLM; got a batch of {ids.shape[0]}")
    before = 0 if prefix is None else prefix.num_slots
    model.check_positions(before + model.config.slots_for(ids.shape[1]), what="the slots")
    if prefix is not None:
        check_slots(model, prefix)
    parts, done = [] if prefix is None else [prefix.slots.to(model.device, model.dtype)], 0
    with adapters.fast_inference(model.encoder):
        for embeds, additions in model.iter_slots(ids.to(model.device), window_batch_size):
            parts.append(torch.stack([embeds[0], *[a[0] for a in additions]], dim=1))  # [j*k, L_D + 1, H_D]
            done += embeds.shape[1] // model.config.slots_per_window
            if progress is not None:
                progress(done)
    content = token_hash(ids)
    if prefix is not None:
        content = hashlib.sha256((content + "+" + prefix.content_hash).encode()).hexdigest()
    return SlotMemory(slots=torch.cat(parts), num_tokens=ids.shape[1] + (0 if prefix is None else prefix.num_tokens),
                      window=model.config.window, ratio=model.config.ratio, model_id=model.fingerprint(),
                      content_hash=content)


def combine_slots(model, memories: list[SlotMemory]) -> SlotMemory:
    """Several memories read as one, in order: their slots concatenated (vLLM's decoder
    reads them causally, so this is :meth:`rcc.RCCModel.combine` for the vLLM path: one
    pre-fill over all their slots, no text encoded).

    Raises:
        RCCError: for an empty list, a memory from another model, or more slots than
            the decoder's positions.
    """
    from rcc.positions import check_slot_total

    if not memories:
        raise RCCError("combine needs one or more slot memories")
    for m in memories:
        check_slots(model, m)
    check_slot_total(model, sum(m.num_slots for m in memories), [m.num_slots for m in memories])
    if len(memories) == 1:
        return memories[0]
    content = hashlib.sha256("+".join(m.content_hash for m in memories).encode()).hexdigest()
    return SlotMemory(slots=torch.cat([m.slots.to(model.device, model.dtype) for m in memories]),
                      num_tokens=sum(m.num_tokens for m in memories), window=model.config.window,
                      ratio=model.config.ratio, model_id=memories[0].model_id, content_hash=content)


__all__ = ["SlotMemory", "compress_slots", "combine_slots", "check_slots", "STORAGE_DTYPES", "FORMAT"]
