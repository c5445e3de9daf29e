"""Shared test helpers: tiny random backbones, a tiny real tokenizer, the fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `--dtype auto` on a CPU depends on the processor (rcc/precision.py); the tests' numbers must
# not, so they compute in float32 everywhere. test_precision.py tests the choice itself, and
# the README command's test runs it with the machine's own choice too.
os.environ.setdefault("RCC_CPU_DTYPE", "float32")

REPO = Path(__file__).resolve().parents[1]
# the original implementation's outputs on a tiny GPT-NeoX (tests/fixtures/reference_tiny_neox/README.md)
FIXTURE = REPO / "tests" / "fixtures" / "reference_tiny_neox"

TINY = {
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     rotary_pct=0.25, max_position_embeddings=4096),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=4096),
    "qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=4096),
    "mistral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=4096, sliding_window=4096),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def tiny_backbone(model_type: str = "llama", vocab: int = 300, seed: int = 0, dtype=torch.float32, **over):
    """A tiny random causal LM (2 layers, width 64) built from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**TINY[model_type], **over}
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, eos_token_id=0, bos_token_id=0, pad_token_id=0, **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def tiny_rcc(model_type: str = "llama", window: int = 64, ratio: int = 8, seed: int = 0, random_glue=True, **kw):
    """A tiny RCC model; ``random_glue`` gives G/A_i random (non-zero) weights so
    that tests see the injection's effect."""
    from rcc import RCCModel

    enc = tiny_backbone(model_type, seed=seed, **kw)
    dec = tiny_backbone(model_type, seed=seed + 1, **kw)
    model = RCCModel.from_backbones(enc, dec, window=window, ratio=ratio)
    if random_glue:
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for p in [model.G.weight, *[a.weight for a in model.A]]:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 300):
    """A real byte-level BPE tokenizer trained on a small text, with the chat
    markers as special tokens (id 0 = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (REPO / "examples" / "lighthouse.txt").read_text() * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def saved_tiny_rcc(folder) -> str:
    """A tiny random RCC model (llama, window 64, ratio 8) with the tiny tokenizer, saved in
    our format to ``folder``; returns the folder (the CLI's and the server's tests load it)."""
    model = tiny_rcc("llama", window=64, ratio=8)
    model.tokenizer = tiny_tokenizer()
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and reproducibly, on one thread (the CI box is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fast_tests_on_one_thread(request):
    """Tests not marked slow use tiny models: one thread each (on this 2-core box
    the fast lane took 86 s of CPU with two threads, 32 s with one). Slow tests
    run real backbones and keep every thread."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The vendored reference fixture; it is part of the repository, so a missing
    file is a failure, not a skip (the exactness tests must run on every clone)."""
    missing = [n for n in ("cases.json", "config.json", "model.safetensors") if not (FIXTURE / n).is_file()]
    assert not missing, f"reference fixture incomplete at {FIXTURE}: {missing} missing"
    return FIXTURE


@pytest.fixture(scope="session")
def reference_model(fixture_dir):
    from rcc import RCCModel

    return RCCModel.from_original(str(fixture_dir / "model.safetensors"), base_model=str(fixture_dir / "config.json"),
                                  dtype=torch.float64)


TINY_VOCAB = 64  # vocabulary of the tiny random backbones the training tests build


def write_tokens(folder: Path) -> str:
    """A prepared token folder: 64 training and 8 evaluation documents of 80 random ids below TINY_VOCAB."""
    import numpy as np

    from rcc.data import write_token_folder

    rng = np.random.default_rng(0)
    write_token_folder(folder, {"train": [rng.integers(1, TINY_VOCAB, 80) for _ in range(64)],
                                "eval": [rng.integers(1, TINY_VOCAB, 80) for _ in range(8)]}, TINY_VOCAB)
    return str(folder)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """:func:`write_tokens` in a temporary folder (the training tests' data)."""
    return write_tokens(tmp_path_factory.mktemp("tokens"))
