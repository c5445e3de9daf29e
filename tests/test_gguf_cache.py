"""The dequantised-backbone cache (rcc/gguf_cache.py): built once, then read back
bit-exactly; a corrupt, truncated or foreign folder is rebuilt with one warning;
an unwritable or full cache falls back to the slow path with one warning.

The fast tests stand a tiny random Llama and a real (tiny) tokenizer in for the
GGUF's contents; the slow test runs the real embedded SmolLM2 GGUF."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from rcc import gguf_cache
from tests.conftest import REPO, tiny_backbone, tiny_tokenizer

TEXT = "The keeper of the lamp wrote 41973 in the log."


@pytest.fixture(scope="module")
def parts():
    return tiny_backbone("llama", vocab=300, tie_word_embeddings=True), tiny_tokenizer()


@pytest.fixture
def gguf(tmp_path):
    """Stands in for the GGUF file: the cache keys on its bytes only."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF stand-in " * 100)
    return path


class Builder:
    """The slow path: counts its calls."""

    def __init__(self, parts):
        self.parts, self.calls = parts, 0

    def __call__(self):
        self.calls += 1
        return self.parts


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def folder_of(gguf, root):
    return gguf_cache.cache_folder(gguf, torch.float32, root)


def test_built_once_then_read_back_bit_exactly(parts, gguf, tmp_path, caplog):
    build, root = Builder(parts), tmp_path / "cache"
    first = gguf_cache.load_cached(gguf, torch.float32, build, root)
    assert build.calls == 1 and first[0] is parts[0]  # the first load returns what it built
    folder = folder_of(gguf, root)
    manifest = json.loads((folder / gguf_cache.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == gguf_cache.file_sha256(gguf) and manifest["dtype"] == "float32"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".part")]  # no temporary folder left
    with caplog.at_level(logging.WARNING):
        model, tok = gguf_cache.load_cached(gguf, torch.float32, build, root)
    assert build.calls == 1 and not caplog.records  # read from the cache, silently
    assert model is not parts[0]
    assert_same(model, parts[0])
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:  # tied weights under the embedding's name:
        stored = set(fh.keys())  # stored as the head, the embedding is initialised at every load, then tied
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    assert tok(TEXT).input_ids == parts[1](TEXT).input_ids
    ids = torch.tensor([tok(TEXT).input_ids])
    assert torch.equal(model(ids).logits, parts[0](ids).logits)


def test_each_dtype_and_gguf_has_its_own_folder(parts, gguf, tmp_path):
    root = tmp_path / "cache"
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another GGUF " * 100)
    names = {gguf_cache.cache_folder(g, dt, root).name for g in (gguf, other) for dt in (torch.float32, torch.bfloat16)}
    assert len(names) == 4
    build = Builder((parts[0].to(torch.bfloat16), parts[1]))
    model, _ = gguf_cache.load_cached(gguf, torch.bfloat16, build, root)
    model, _ = gguf_cache.load_cached(gguf, torch.bfloat16, build, root)
    assert build.calls == 1 and model.dtype == torch.bfloat16
    parts[0].float()


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def foreign_gguf(folder):
    m = json.loads((folder / gguf_cache.MANIFEST).read_text())
    m["gguf_sha256"] = "0" * 64
    (folder / gguf_cache.MANIFEST).write_text(json.dumps(m))


def foreign_dtype(folder):
    m = json.loads((folder / gguf_cache.MANIFEST).read_text())
    m["dtype"] = "bfloat16"
    (folder / gguf_cache.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("damage, why", [
    (lambda f: corrupt(f / "model.safetensors"), "checksum"),
    (lambda f: truncate(f / "model.safetensors"), "truncated"),
    (lambda f: corrupt(f / "tokenizer.json"), "checksum"),
    (lambda f: (f / gguf_cache.MANIFEST).write_text("{not json"), "unreadable"),
    (lambda f: (f / gguf_cache.MANIFEST).unlink(), "no rcc-cache.json"),
    (foreign_gguf, "gguf_sha256"),
    (foreign_dtype, "dtype"),
    (lambda f: (f / "stray.bin").write_bytes(b"x"), "differ"),
    (lambda f: (f / "config.json").unlink(), "differ"),
], ids=["corrupt-weights", "truncated-weights", "corrupt-tokenizer", "bad-manifest", "no-manifest", "other-gguf",
        "other-dtype", "extra-file", "missing-file"])
def test_a_damaged_folder_is_rebuilt_with_one_warning(parts, gguf, tmp_path, caplog, damage, why):
    build, root = Builder(parts), tmp_path / "cache"
    gguf_cache.load_cached(gguf, torch.float32, build, root)
    folder = folder_of(gguf, root)
    damage(folder)
    with caplog.at_level(logging.WARNING):
        model, _ = gguf_cache.load_cached(gguf, torch.float32, build, root)
    assert build.calls == 2  # never trusted: the slow path ran again
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0] and why in warnings[0], warnings
    gguf_cache.check_folder(folder, gguf_cache.file_sha256(gguf), torch.float32)  # rebuilt whole
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again, _ = gguf_cache.load_cached(gguf, torch.float32, build, root)
    assert build.calls == 2 and not caplog.records
    assert_same(again, parts[0])


def test_an_unwritable_cache_falls_back_with_one_warning(parts, gguf, tmp_path, caplog):
    """Tests run as root here, so a mode-0555 folder would still be writable: the
    cache root lies under a file instead, which no user can write into."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    build = Builder(parts)
    for _ in range(2):
        with caplog.at_level(logging.WARNING):
            model, _ = gguf_cache.load_cached(gguf, torch.float32, build, blocker / "cache")
        assert model is parts[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert build.calls == 2 and len(warnings) == 2 and all("cannot write the backbone cache" in w for w in warnings)


FULL_DISK = """
import resource, signal, sys, torch
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.conftest import tiny_backbone, tiny_tokenizer
from rcc import gguf_cache
parts = tiny_backbone("llama", vocab=300), tiny_tokenizer()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
model, tok = gguf_cache.load_cached(Path({gguf!r}), torch.float32, lambda: parts, Path({root!r}))
print("OK", model is parts[0])
"""


def test_a_full_cache_falls_back_and_leaves_nothing_behind(gguf, tmp_path):
    root = tmp_path / "cache"
    code = FULL_DISK.format(repo=str(REPO), gguf=str(gguf), root=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK True"
    lines = [ln for ln in out.stderr.splitlines() if "backbone cache" in ln]
    assert len(lines) == 1 and "cannot write the backbone cache" in lines[0], out.stderr
    assert not list((root / "backbones").iterdir())  # no half-written folder


def test_a_concurrent_builder_keeps_the_first_folder(parts, gguf, tmp_path):
    root = tmp_path / "cache"
    folder = folder_of(gguf, root)
    sha = gguf_cache.file_sha256(gguf)
    gguf_cache.write_folder(folder, *parts, sha, torch.float32)
    before = (folder / gguf_cache.MANIFEST).stat().st_mtime_ns
    gguf_cache.write_folder(folder, *parts, sha, torch.float32)  # lost the race: its copy is dropped
    assert (folder / gguf_cache.MANIFEST).stat().st_mtime_ns == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


@pytest.mark.slow
def test_the_embedded_backbone_from_the_cache_equals_the_gguf(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF: the cached folder gives the same weights, bit for bit,
    and the same tokenizer as dequantising the GGUF (bfloat16: half the file to hash)."""
    from rcc import backbones

    gguf = backbones.embedded_smollm2_file()
    monkeypatch.setenv("RCC_CACHE_DIR", str(tmp_path))
    direct_model, direct_tok = gguf_cache.load_cached(gguf, torch.bfloat16, lambda: _gguf(gguf, torch.bfloat16))
    cached_model, cached_tok = gguf_cache.load_cached(gguf, torch.bfloat16, lambda: pytest.fail("rebuilt"))
    assert_same(cached_model, direct_model)
    text = "<|im_start|>user\nWhat is the pass key? 68215<|im_end|>\n"
    assert cached_tok(text).input_ids == direct_tok(text).input_ids
    assert cached_tok.eos_token == direct_tok.eos_token and cached_tok.chat_template == direct_tok.chat_template
    assert cached_model.config.to_dict().get("quantization_config") is None


def _gguf(path, dtype):
    """Dequantise the GGUF with transformers, as :mod:`rcc.backbones` does without a cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval(), tok
