"""The two instruction modes (spec section 2) and answer parsing."""

import pytest
import torch

from rcc import RCCError
from rcc.prompts import ASSISTANT, END, HEADER, build, split_answer
from tests.conftest import tiny_rcc, tiny_tokenizer


def test_prompt_formats():
    assert build("CTX", "Q?", "reconstruct") == ("CTX\n\nQ?", HEADER)
    assert build("CTX", "Q?", "manual") == ("CTX", HEADER + "Q?" + ASSISTANT)
    assert HEADER == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    with pytest.raises(RCCError, match="unknown mode"):
        build("c", "q", "other")


def test_split_answer():
    text = "Who kept it?" + ASSISTANT + "Agnes Morrow" + END + "junk"
    assert split_answer(text, "reconstruct", "<|endoftext|>") == ("Who kept it?", "Agnes Morrow")
    assert split_answer("Agnes<|endoftext|>x", "manual", "<|endoftext|>") == (None, "Agnes")
    assert split_answer("half a question", "reconstruct", None) == ("half a question", "")


@pytest.fixture(scope="module")
def model():
    m = tiny_rcc("llama", window=64, ratio=8)
    m.tokenizer = tiny_tokenizer()
    return m


@pytest.mark.parametrize("mode", ["reconstruct", "manual"])
def test_ask_compresses_what_the_mode_says(model, mode):
    tok = model.tokenizer
    text = "The lamp was lit in 1874 by Agnes Morrow."
    ans = model.ask(text, "When?", mode=mode, max_new_tokens=6)
    to_compress, prompt = build(text, "When?", mode)
    mem = model.compress(tok(to_compress, add_special_tokens=False, return_tensors="pt").input_ids)
    ids = model.generate(mem, tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids, max_new_tokens=6)
    assert ans.token_ids == ids[0].tolist()[: len(ans.token_ids)]
    assert (ans.reconstructed_question is None) == (mode == "manual")


def test_stop_strings_use_the_tokenizer(model):
    tok = model.tokenizer
    mem = model.compress(tok("The lamp was lit in 1874.", return_tensors="pt").input_ids)
    prompt = tok("When?", return_tensors="pt").input_ids
    full = model.generate(mem, prompt, max_new_tokens=40, eos_token_id=None)
    pieces = [tok.decode([t]) for t in full[0].tolist()]
    clean = [j for j, p in enumerate(pieces) if j >= 1 and p.strip().isascii() and p.strip().isalnum()]
    if not clean:
        pytest.skip("the random model generated no clean ASCII token")
    j = clean[0]
    stop = pieces[j].strip()
    cut = model.generate(mem, prompt, max_new_tokens=40, eos_token_id=None, stop_strings=[stop])
    assert cut.shape[1] <= j + 1 and stop in tok.decode(cut[0])
    assert torch.equal(cut[0], full[0, : cut.shape[1]])
