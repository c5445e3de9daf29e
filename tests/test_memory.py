"""The memory file format: checksummed metadata checked against the tensors, the
size its header promises, storage dtypes, stale temp files, writable outputs."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rcc import CompressedContext, RCCError
from rcc.files import check_writable
from rcc.memory import FORMAT_V1, metadata_hash, read_memory_metadata, tensors_hash
from tests.conftest import REPO, tiny_rcc


def ids(n, batch=1, seed=0, vocab=300):
    return torch.randint(1, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_rcc("llama", window=32, ratio=4)


@pytest.fixture(scope="module")
def memory(model):
    return model.compress(ids(70, batch=2))  # 3 windows -> 24 slots, two contexts


def rewrite(src, dst, change, rehash=False):
    """Copy a memory file with its metadata changed (``rehash``: as a writer with a
    bug would, with a checksum that matches the changed metadata)."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change(header["__metadata__"])
    if rehash:
        header["__metadata__"]["metadata_sha256"] = metadata_hash(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    return dst


def refused(path, *words):
    """Both readers refuse ``path`` with an RCCError naming ``words``."""
    for read in (read_memory_metadata, CompressedContext.load):
        with pytest.raises(RCCError) as err:
            read(path)
        for w in words:
            assert w in str(err.value), str(err.value)
        assert "\n" not in str(err.value)


def test_round_trip_is_bit_exact_and_metadata_names_the_storage(memory, tmp_path):
    path = memory.save(tmp_path / "m.rcc")
    again = CompressedContext.load(path)
    assert (again.num_slots, again.num_tokens, again.batch_size) == (24, 70, 2)
    assert all(torch.equal(a, b) for pair, back in zip(memory.kv, again.kv) for a, b in zip(pair, back))
    meta = read_memory_metadata(path)
    assert meta["format"] == "rcc-memory/3" and meta["dtype"] == "float32"
    assert torch.equal(again.slots, memory.slots) and again.segments == (70,)


def test_changed_metadata_is_caught_by_its_checksum(memory, tmp_path):
    """Defect 4: a changed num_slots (or any field) was accepted silently."""
    path = memory.save(tmp_path / "m.rcc")
    for key, value in [("num_slots", "16"), ("num_tokens", "71"), ("model_id", "x"), ("content_hash", "y"),
                       ("dtype", "bfloat16"), ("window", "64")]:
        bad = rewrite(path, tmp_path / f"{key}.rcc", lambda m, k=key, v=value: m.__setitem__(k, v))
        refused(bad, "metadata does not match its checksum")


@pytest.mark.parametrize("key", ["num_tokens", "num_slots", "window", "ratio", "layers", "model_id", "content_hash"])
@pytest.mark.parametrize("value", [None, "", "0", "-3", "x", "1e3", "99999999999999999999", "7"])
def test_every_bad_field_is_one_line_error_even_with_a_matching_checksum(memory, tmp_path, key, value):
    """Defect 4: a wrong or missing `layers` / `num_tokens` gave ValueError / KeyError tracebacks."""
    path = memory.save(tmp_path / "m.rcc")
    meta = read_memory_metadata(path)
    if value == meta[key]:
        return

    def change(m):
        if value is None:
            del m[key]
        else:
            m[key] = value

    bad = rewrite(path, tmp_path / "bad.rcc", change, rehash=True)
    if key in ("model_id", "content_hash") and value not in (None, ""):
        assert CompressedContext.load(bad).model_id  # plausible values: only the checksum can tell
        return
    # (num_tokens 7 was plausible too, before format 3: its segments [70] now disagree)
    refused(bad, "bad.rcc")


def test_fields_are_checked_against_the_tensors(memory, tmp_path):
    path = memory.save(tmp_path / "m.rcc")
    cases = {"num_slots": ("32", "shape"), "layers": ("3", "lacks the tensor 'layers.2.keys'"),
             "num_tokens": ("200", "disagree"), "ratio": ("5", "disagree")}
    for key, (value, words) in cases.items():
        bad = rewrite(path, tmp_path / f"{key}.rcc", lambda m, k=key, v=value: m.__setitem__(k, v), rehash=True)
        refused(bad, words)
    short = rewrite(path, tmp_path / "short.rcc", lambda m: m.__setitem__("num_slots", "16"), rehash=True)
    refused(short, "disagree")  # 2 windows cannot hold 70 tokens
    one = rewrite(path, tmp_path / "one.rcc", lambda m: m.__setitem__("layers", "1"), rehash=True)
    refused(one, "unexpected tensor 'layers.1.keys'")


def test_format_1_files_still_load_and_their_shapes_are_checked(memory, tmp_path):
    """Files written before the metadata checksum load; a changed num_slots is still refused."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (k, v) in enumerate(memory.kv):
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = k.contiguous(), v.contiguous()
    meta = {**memory.metadata(), "format": FORMAT_V1, "tensors_sha256": tensors_hash(tensors, shapes=False)}
    save_file(tensors, str(tmp_path / "v1.rcc"), metadata=meta)
    old = CompressedContext.load(tmp_path / "v1.rcc")
    assert old.num_slots == 24 and torch.equal(old.kv[1][1], memory.kv[1][1])
    assert read_memory_metadata(tmp_path / "v1.rcc")["dtype"] == "float32"
    bad = rewrite(tmp_path / "v1.rcc", tmp_path / "v1-bad.rcc", lambda m: m.__setitem__("num_slots", "32"))
    refused(bad, "shape", "num_slots")


def test_truncated_or_padded_files_are_refused_by_the_header_size(memory, tmp_path):
    """Defect 5: `rcc info` printed a truncated file's metadata as if it were whole."""
    data = memory.save(tmp_path / "m.rcc").read_bytes()
    (tmp_path / "cut.rcc").write_bytes(data[:-1])
    refused(tmp_path / "cut.rcc", "incomplete", f"{len(data) - 1} bytes", str(len(data)))
    (tmp_path / "half.rcc").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "half.rcc", "incomplete")
    (tmp_path / "long.rcc").write_bytes(data + b"\0" * 8)
    refused(tmp_path / "long.rcc", "longer than its header")


def test_storage_dtypes_halve_the_file_and_load_back_into_the_model_dtype(model, tmp_path):
    mem = model.compress(ids(70))
    full = mem.save(tmp_path / "f32.rcc")
    prompt = ids(4, seed=3)
    ref = model.generate(mem, prompt, max_new_tokens=6, eos_token_id=None)
    payload = mem.nbytes()
    per_slot = model.kv_bytes_per_slot() + model.slot_bytes_per_slot()  # the KV cache and the slot inputs
    assert payload == per_slot * mem.num_slots  # the size `rcc compress` announces
    for name, dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        path = mem.save(tmp_path / f"{name}.rcc", dtype=name)
        assert read_memory_metadata(path)["dtype"] == name
        assert full.stat().st_size - path.stat().st_size > 0.45 * payload  # the tensors take half
        assert mem.nbytes(name) == (model.kv_bytes_per_slot(dtype) + model.slot_bytes_per_slot(dtype)) * mem.num_slots
        low = CompressedContext.load(path)
        assert low.kv[0][0].dtype == dtype and mem.kv[0][0].dtype == torch.float32  # the saved one is untouched
        cache = low.cache(1, model.device, model.dtype)
        assert cache.layers[0].keys.dtype == torch.float32
        torch.testing.assert_close(cache.layers[0].keys, mem.kv[0][0], rtol=1e-2, atol=1e-2)
        assert model.generate(low, prompt, max_new_tokens=6, eos_token_id=None).shape == ref.shape
        assert CompressedContext.load(path, dtype=torch.float32).kv[0][0].dtype == torch.float32
    huge = CompressedContext([(k * 1e6, v) for k, v in mem.kv], *[getattr(mem, f) for f in
                             ("num_tokens", "num_slots", "window", "ratio", "model_id", "content_hash")])
    with pytest.raises(RCCError, match="overflow float16"):
        huge.save(tmp_path / "huge.rcc", dtype="float16")
    with pytest.raises(RCCError, match="storage dtype"):
        mem.save(tmp_path / "x.rcc", dtype="int8")
    assert not (tmp_path / "huge.rcc").exists() and not list(tmp_path.glob(".*.part"))


_WRITER = """
import sys, time, torch
from rcc.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    open(tmp, "wb").write(b"x" * 4096)
    print(tmp, flush=True)
    time.sleep(600)
"""


def writer(target):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    return proc, proc.stdout.readline().strip()


@pytest.mark.slow  # a child process killed mid-write (4 s CPU)
def test_a_killed_writers_part_is_removed_by_the_next_save(memory, tmp_path):
    """Defect 6: kill -9 during save left a hidden .NAME.*.part of up to full size, forever."""
    target = tmp_path / "doc.rcc"
    live, live_part = writer(target)  # a save to the same path still running: its part stays
    killed, part = writer(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    try:
        others = [tmp_path / ".doc.rcc.bak.abcdefgh.part", tmp_path / ".doc.rcc2.123-abcdefgh.part",
                  tmp_path / "doc.rcc.99999999-abcdefgh.part"]  # other targets' and not our pattern
        legacy = tmp_path / ".doc.rcc.k2j_x9a1.part"  # written by the version before the PID was recorded
        for p in [*others, legacy]:
            p.write_bytes(b"y")
        assert os.path.exists(part) and os.path.basename(part).startswith(f".doc.rcc.{killed.pid}-")
        memory.save(target)
        assert not os.path.exists(part) and not legacy.exists()
        assert os.path.exists(live_part) and all(p.exists() for p in others)
        assert CompressedContext.load(target).num_slots == 24
    finally:
        live.kill()
        live.wait()


def test_check_writable_refuses_folders_files_and_unwritable_places(tmp_path):
    """Defect 2's check (`rcc compress` runs it before loading anything)."""
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RCCError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(RCCError, match="is a file and not a folder"):
        check_writable(tmp_path / "file.txt" / "sub" / "doc.rcc")
    if os.geteuid() == 0:  # root writes through file modes; /proc refuses new files even to root
        unwritable = "/proc/rcc-test/doc.rcc"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        unwritable = ro / "doc.rcc"
    with pytest.raises(RCCError, match="cannot write in the folder"):
        check_writable(unwritable)
    assert check_writable(tmp_path / "new" / "deeper" / "doc.rcc") == tmp_path / "new" / "deeper" / "doc.rcc"
    assert not (tmp_path / "new").exists() and not list(tmp_path.rglob("*.probe"))
