"""The evaluation tests' shared model: a tiny random Llama-shaped RCC model (window 64,
ratio 8, 512 positions) with the tiny test tokenizer."""

import pytest

from tests.conftest import tiny_rcc, tiny_tokenizer

POSITIONS = 512


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_rcc("llama", window=64, ratio=8, max_position_embeddings=POSITIONS)
    m.tokenizer = tok
    return m
