"""Shared by the vLLM tests (run in .venv-vllm: bash scripts/vllm_env.sh): a tiny RCC
model vLLM's CPU attention accepts (head_dim 32; the other tests' tiny models have 16)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for tiny models


def tiny_vllm_rcc(model_type: str = "llama", seed: int = 0):
    """A tiny random RCC model (window 64, ratio 8, 2 layers, width 64, 2 heads of 32) with a tokenizer."""
    from tests.conftest import tiny_rcc, tiny_tokenizer

    kw = {} if model_type == "gpt_neox" else {"num_key_value_heads": 1}
    model = tiny_rcc(model_type, window=64, ratio=8, seed=seed, num_attention_heads=2, **kw)
    model.tokenizer = tiny_tokenizer()
    return model
