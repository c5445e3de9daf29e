"""Fuzz of the memory-file and slot-file readers (issue 24): random byte flips over the whole
file, truncation at every twentieth, lying header sizes, NaN/Inf values under a recomputed
checksum, extra and missing tensors. Every damaged file is refused with a one-line
RCCError, in bounded memory, or (a flip that changes nothing the reader uses) loads
bit-equal to the original: never a wrong answer."""

from __future__ import annotations

import json
import random
import resource
import struct

import pytest
import torch

from rcc.errors import RCCError
from rcc.files import atomic_save_file
from rcc.memory import CompressedContext, metadata_hash, tensors_hash
from rcc.vllm.slot_memory import SlotMemory, compress_slots
from tests.conftest import tiny_rcc

FLIPS = 300


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{kind: (path, original object)}`` for a memory file and a slot file of a tiny model."""
    folder = tmp_path_factory.mktemp("fuzz")
    model = tiny_rcc("llama", window=64, ratio=8)
    ids = torch.randint(3, 200, (1, 150), generator=torch.Generator().manual_seed(0))
    memory, slots = model.compress(ids), compress_slots(model, ids)
    return {"memory": (memory.save(folder / "m.rcc"), memory), "slots": (slots.save(folder / "s.slots"), slots)}


LOADERS = {"memory": CompressedContext.load, "slots": SlotMemory.load}


def same(kind: str, a, b) -> bool:
    if kind == "slots":
        return torch.equal(a.slots, b.slots) and a.metadata() == b.metadata()
    return a.metadata() == b.metadata() and all(torch.equal(x, y) for p, q in zip(a.kv, b.kv, strict=True)
                                                       for x, y in zip(p, q, strict=True))


def refused_or_same(kind: str, path, original) -> str:
    """``"refused"`` or ``"same"``; fails on anything else (a traceback, a different load)."""
    try:
        loaded = LOADERS[kind](path)
    except RCCError as err:
        message = str(err)
        assert "\n" not in message and str(path) in message, message
        return "refused"
    assert same(kind, loaded, original), f"{path} loaded as something else"
    return "same"


def rewrite(path, meta: dict, tensors: dict) -> None:
    """Write ``tensors`` with ``meta``, its checksums recomputed (a file that passes them)."""
    meta = dict(meta)
    meta["tensors_sha256"] = tensors_hash(tensors)
    meta["metadata_sha256"] = metadata_hash(meta)
    atomic_save_file(tensors, path, meta)


def header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


@pytest.mark.parametrize("kind", ["memory", "slots"])
def test_random_flips_and_truncations_are_refused_or_harmless(kind, files, tmp_path):
    path, original = files[kind]
    data = path.read_bytes()
    rng = random.Random(24)
    bad = tmp_path / path.name
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = []
    for _ in range(FLIPS):
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 8))):
            damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(damaged))
        outcomes.append(refused_or_same(kind, bad, original))
    for i in range(20):  # truncated at every twentieth (0 bytes included)
        bad.write_bytes(data[: len(data) * i // 20])
        assert refused_or_same(kind, bad, original) == "refused", i
    assert outcomes.count("refused") > 0.9 * FLIPS, outcomes.count("same")  # nearly every flip is seen
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: bounded memory


@pytest.mark.parametrize("kind", ["memory", "slots"])
def test_lying_headers_bad_values_and_odd_tensors_are_refused(kind, files, tmp_path):
    from safetensors.torch import load_file

    path, original = files[kind]
    data = path.read_bytes()
    n, head = header(data)
    meta = head.pop("__metadata__")
    tensors = load_file(str(path))
    bad = tmp_path / path.name
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def refused(words: str) -> None:
        with pytest.raises(RCCError) as err:
            LOADERS[kind](bad)
        assert "\n" not in str(err.value) and words in str(err.value), str(err.value)

    # the header size lies: huge (never allocated), past the file, inside the header, zero
    for size in (2**63, 2**40, len(data), n - 5, 0):
        bad.write_bytes(struct.pack("<Q", size) + data[8:])
        refused(str(bad))
    # a header that is not JSON, or JSON nested past the parser's depth
    deep = b"[" * 200_000
    bad.write_bytes(struct.pack("<Q", len(deep)) + deep)
    refused(str(bad))
    # NaN / Inf values under checksums recomputed to match
    for value in (float("nan"), float("inf"), float("-inf")):
        name = sorted(tensors)[0]
        poisoned = {k: v.clone() for k, v in tensors.items()}
        poisoned[name].view(-1)[3] = value
        rewrite(bad, meta, poisoned)
        refused("NaN or Inf")
    # an extra tensor, a missing one (checksums recomputed)
    rewrite(bad, meta, {**tensors, "extra": torch.zeros(2)})
    refused("extra" if kind == "slots" else "unexpected tensor")
    if kind == "memory":
        rewrite(bad, meta, {k: v for k, v in tensors.items() if k != "layers.1.values"})
        refused("lacks the tensor")
    # fields that disagree with the tensors (checksums recomputed)
    for field, value in (("num_slots", "9"), ("layers", "7"), ("num_tokens", "0"), ("window", "x"), ("dtype", "float16")):
        rewrite(bad, {**meta, field: value}, tensors)
        refused(str(bad))
    # the original still loads, bit for bit
    assert refused_or_same(kind, path, original) == "same"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024
