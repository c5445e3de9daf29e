"""The two instruction modes (docs/method.md section 2) and answer parsing."""

import pytest
import torch

from rcc import RCCError
from rcc.prompts import ASSISTANT, CHATML, END, HEADER
from tests.conftest import tiny_rcc, tiny_tokenizer


def test_prompt_formats():
    assert CHATML.build("CTX", "Q?", "reconstruct") == ("CTX\n\nQ?", HEADER)
    assert CHATML.build("CTX", "Q?", "manual") == ("CTX", HEADER + "Q?" + ASSISTANT)
    assert HEADER == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    with pytest.raises(RCCError, match="unknown mode"):
        CHATML.build("c", "q", "other")


def test_split_answer():
    text = "Who kept it?" + ASSISTANT + "Agnes Morrow" + END + "junk"
    assert CHATML.split_answer(text, "reconstruct", "<|endoftext|>") == ("Who kept it?", "Agnes Morrow")
    assert CHATML.split_answer("Agnes<|endoftext|>x", "manual", "<|endoftext|>") == (None, "Agnes")
    assert CHATML.split_answer("half a question", "reconstruct", None) == ("half a question", "")
    # stop strings end the answer before their first one, and are not part of it
    assert CHATML.split_answer("42. Then 7. More" + END, "manual", None, ("Then", ".")) == (None, "42")
    assert CHATML.split_answer("Q?" + ASSISTANT + "a STOP b", "reconstruct", None, ("STOP",)) == ("Q?", "a")


def test_one_style_owns_the_answer_rules():
    """finished, visible_answer and split_answer read the same markers: an answer is
    closed exactly when the final split no longer grows."""
    closed = "Q?" + ASSISTANT + "the answer" + END + "junk"
    assert not CHATML.finished("Q?" + END + "\n", "reconstruct")  # the question's own end marker
    assert CHATML.finished(closed, "reconstruct") and not CHATML.finished("Q?" + ASSISTANT + "the ans", "reconstruct")
    assert CHATML.finished("x STOP", "manual", stops=("STOP",)) and not CHATML.finished("x STO", "manual", stops=("STOP",))
    assert CHATML.finished("x<eos>", "manual", "<eos>")
    for n in range(len(closed) + 1):
        part = closed[:n]
        shown, final = CHATML.visible_answer(part, "reconstruct", None), CHATML.split_answer(closed, "reconstruct", None)[1]
        assert final.startswith(shown), (part, shown)  # never shows what the final answer takes back


def test_answer_length_and_stop_token_on_a_real_tokenizer():
    from rcc.data import load_tokenizer

    tok = load_tokenizer("embedded:smollm2")
    ids = tok("Q?" + ASSISTANT + "42" + END + " more words", add_special_tokens=False).input_ids
    n = CHATML.answer_length(tok, ids, "reconstruct")
    assert n is not None and tok.decode(ids[:n]).endswith(END) and not CHATML.finished(tok.decode(ids[: n - 1]), "reconstruct")
    assert CHATML.answer_length(tok, ids[: n - 1], "reconstruct") is None
    assert tok.eos_token == END and CHATML.stop_token_id(tok, "reconstruct") is None
    assert CHATML.stop_token_id(tok, "manual") == tok.eos_token_id


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
    to_compress, prompt = CHATML.build(text, "When?", mode)
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


def test_the_python_api_checks_sampling_as_the_cli_and_the_server_do(model):
    """model.generate and rcc.ask refuse what the CLI and the server refuse (issue 24, case 6),
    with the Python argument's name; a valid temperature still samples."""
    from rcc import RCCError
    from rcc.ask import ask

    mem = model.compress(model.tokenizer("The lamp was lit in 1874.", return_tensors="pt").input_ids)
    prompt = torch.tensor([[5, 6, 7]])
    for bad, match in ((dict(temperature=1e-300, do_sample=True), "temperature"),
                       (dict(temperature=float("inf"), do_sample=True), "temperature"),
                       (dict(top_p=0.0, do_sample=True), "top_p"), (dict(top_k=2.5, do_sample=True), "top_k"),
                       (dict(repetition_penalty=float("nan")), "repetition_penalty"),
                       (dict(max_new_tokens=True), "max_new_tokens")):
        with pytest.raises(RCCError, match=match):
            model.generate(mem, prompt, **bad)
        with pytest.raises(RCCError, match=match):
            ask(model, mem, "When?", **bad)
    assert model.generate(mem, prompt, max_new_tokens=3, do_sample=True, temperature=0.7).shape[1] <= 3


def test_ask_leaves_the_stop_string_out_of_the_answer(model):
    """As the server and the OpenAI API: generation stops at a stop string, which the answer does not show."""
    from rcc.ask import ask

    mem = model.compress(model.tokenizer("The lamp was lit in 1874.", return_tensors="pt").input_ids)
    full = ask(model, mem, "When?", max_new_tokens=24, eos_token_id=None)
    words = [w for w in full.answer.split() if w.isascii() and w.isalnum()]
    if len(words) < 2:
        pytest.skip("the random model's answer has no second clean word to stop at")
    stop = words[1]
    cut = ask(model, mem, "When?", max_new_tokens=24, eos_token_id=None, stop_strings=[stop])
    assert stop not in cut.answer and full.answer.startswith(cut.answer)
    assert stop in model.tokenizer.decode(cut.token_ids)  # generation did reach it
