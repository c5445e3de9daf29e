"""rcc.ask.ask: the one question path (text or a saved memory, both modes) that
`rcc ask`, `model.ask` and the evaluation share."""

import pytest
import torch

from rcc import CompressedContext, RCCError
from rcc.ask import ask, choose_mode
from rcc.eval.baselines import RCCMethod
from rcc.prompts import CHATML
from tests.conftest import tiny_rcc, tiny_tokenizer

TEXT = "The lamp was lit in 1874 by Agnes Morrow, who kept it for forty years. " * 3


@pytest.fixture(scope="module")
def model():
    m = tiny_rcc("llama", window=64, ratio=8)
    m.tokenizer = tiny_tokenizer()
    return m


def ids(model, text):
    return model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def by_hand(model, memory, prompt, n):
    return model.generate(memory, ids(model, prompt), max_new_tokens=n, eos_token_id=None)[0].tolist()


def test_a_memory_is_asked_in_manual_mode_by_default_and_not_recompressed(model):
    memory = model.compress(ids(model, TEXT))
    calls = []
    a = ask(model, memory, "Who?", max_new_tokens=5, compress=lambda i, p: calls.append(i) or memory)
    assert calls == [] and a.mode == "manual" and a.compressed_tokens == 0 and a.num_slots == memory.num_slots
    assert a.token_ids == by_hand(model, memory, CHATML.build("", "Who?", "manual")[1], 5)[: len(a.token_ids)]
    assert choose_mode(model, memory) == "manual" and choose_mode(model, TEXT) == "reconstruct"
    assert choose_mode(model, memory, "reconstruct") == "reconstruct"


def test_a_memory_in_reconstruct_mode_is_extended_with_the_question(model):
    memory = model.compress(ids(model, TEXT))
    a = ask(model, memory, "Who kept the lamp?", mode="reconstruct", max_new_tokens=5)
    extended = model.compress(ids(model, "\n\nWho kept the lamp?"), prefix=memory)
    assert a.num_slots == extended.num_slots > memory.num_slots
    assert a.compressed_tokens == ids(model, "\n\nWho kept the lamp?").shape[1]
    assert a.token_ids == by_hand(model, extended, CHATML.build("", "?", "reconstruct")[1], 5)[: len(a.token_ids)]
    assert a.reconstructed_question is not None


@pytest.mark.parametrize("mode", ["reconstruct", "manual"])
def test_text_compresses_what_the_mode_says_and_reports_progress(model, mode):
    seen = []
    a = ask(model, TEXT, "When?", mode=mode, max_new_tokens=5, window_batch_size=1,
            progress=lambda done, total: seen.append((done, total)))
    to_compress, prompt = CHATML.build(TEXT, "When?", mode)
    n = ids(model, to_compress).shape[1]
    windows = -(-n // 64)
    assert seen == [(i, windows) for i in range(1, windows + 1)] and windows > 1
    assert a.compressed_tokens == n and a.num_slots == windows * 8 and a.compress_seconds > 0
    memory = model.compress(ids(model, to_compress))
    assert a.token_ids == by_hand(model, memory, prompt, 5)[: len(a.token_ids)]


def test_model_ask_and_the_evaluation_take_the_same_path(model):
    a = ask(model, TEXT, "When?", mode="manual", max_new_tokens=6)
    assert model.ask(TEXT, "When?", mode="manual", max_new_tokens=6).token_ids == a.token_ids
    pred = RCCMethod(model).answer(TEXT, "When?", 6, mode="manual")
    assert pred.token_ids == a.token_ids and pred.info["slots"] == a.num_slots
    assert pred.info["compressed_tokens"] == a.compressed_tokens
    memory = model.compress(ids(model, TEXT))
    assert model.ask(memory, "When?", max_new_tokens=6).token_ids == a.token_ids  # manual: the same memory


def test_bad_inputs(model):
    memory = model.compress(ids(model, TEXT))
    with pytest.raises(RCCError, match="context is empty"):
        ask(model, "  ", "q")
    with pytest.raises(RCCError, match="question is empty"):
        ask(model, memory, " ")
    with pytest.raises(RCCError, match="unknown mode"):
        ask(model, TEXT, "q", mode="other")
    with pytest.raises(RCCError, match="text or a CompressedContext"):
        ask(model, torch.tensor([1, 2]), "q")
    other = CompressedContext(**{**memory.__dict__, "model_id": "0" * 16})
    with pytest.raises(RCCError, match="another model"):
        ask(model, other, "q", mode="reconstruct")
    bare = tiny_rcc("llama", window=64, ratio=8)
    with pytest.raises(RCCError, match="no tokenizer"):
        ask(bare, TEXT, "q")
