"""The llamacpp baseline: llama.cpp, in llama-cpp-python's own environment
(.venv-llamacpp, made by scripts/llamacpp_env.sh; not made by install.sh or CI:
its build compiles llama.cpp), on the embedded backbone's GGUF. The tests that
need that environment skip with the reason when it is absent; the one that
checks how a missing llama.cpp is reported always runs."""

import json
import subprocess

import pytest

from rcc.errors import RCCError
from rcc.eval import EvalConfig, llamacpp, run_eval
from tests.conftest import tiny_rcc, tiny_tokenizer


def _environment() -> tuple[str | None, str]:
    python, why = llamacpp.find_python()
    if python is not None:
        res = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True, timeout=120,
                             check=False)
        if res.returncode != 0:  # a venv whose build did not finish
            lines = res.stderr.strip().splitlines()
            return None, f"{python} has no working llama_cpp ({lines[-1] if lines else res.returncode})"
    return python, why


PYTHON, WHY = _environment()
needs_env = pytest.mark.skipif(PYTHON is None, reason=WHY)


def _gguf():
    from rcc.backbones import embedded_smollm2_file

    try:
        return embedded_smollm2_file()
    except RCCError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def child():
    if PYTHON is None:
        pytest.skip(WHY)
    with llamacpp.LlamaCppChild(PYTHON, _gguf(), 256, 2) as c:
        yield c


def test_a_model_llamacpp_cannot_run_is_skipped_with_one_line():
    """A tiny random model has no GGUF (and without .venv-llamacpp there is no
    llama.cpp): the baseline is skipped with its reason; the others run."""
    model = tiny_rcc("llama", window=64, ratio=8)
    model.tokenizer = tiny_tokenizer()
    cfg = EvalConfig(task="passkey", lengths=[256], depths=[0.5], modes=["manual"], baselines=["full", "llamacpp"],
                     prompts=["continuation"], max_new_tokens=4)
    res = run_eval(model, cfg)
    why = res["skipped"]["llamacpp"]
    assert "\n" not in why and ("GGUF" in why or "llama-cpp-python environment" in why)
    assert res["methods"] == ["rcc/continuation", "full/continuation"]
    assert any(n.startswith("llamacpp: skipped:") for n in res["notes"]) and res["llamacpp"] is None


def test_explicit_interpreters_that_do_not_exist_are_refused(tmp_path):
    with pytest.raises(RCCError, match="no such executable"):
        EvalConfig(task="passkey", baselines=["llamacpp"], llamacpp_python=str(tmp_path / "python"))


@needs_env
@pytest.mark.slow  # a second llama.cpp process; seconds on the shared CPU
def test_child_greedy_ids_equal_llamacpps_own_generate(child):
    """The child's greedy decoding (argmax of llama.cpp's logits, token by token)
    gives what llama-cpp-python's own ``Llama.generate`` gives greedily (temp 0)."""
    ids = child.request("tokenize", text="The grass is green. The pass key is 40312. Remember it. "
                                         "What is the pass key? The pass key is")["ids"]
    eos = child.info["eos"]
    out = child.request("generate", ids=ids, max_new_tokens=12, stops=[eos], repeats=2)
    script = (
        "import json, sys, llama_cpp\n"
        "gguf, ids, n, eos = json.loads(sys.argv[1])\n"
        "llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_threads=2, verbose=False)\n"
        "out = []\n"
        "for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0):\n"
        "    if t == eos or len(out) == n:\n"
        "        break\n"
        "    out.append(t)\n"
        "print(json.dumps(out))\n")
    res = subprocess.run([PYTHON, "-c", script, json.dumps([str(_gguf()), ids, 12, eos])], capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    own = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == own and len(own) >= 2
    assert out["prefill_tokens"] == len(ids) and out["repeats_same_tokens"]
    assert out["decode_tok_s"] > 0 and len(out["decode_tok_s_runs"]) == 2


@needs_env
def test_child_refuses_bad_input_with_one_line_and_goes_on(child):
    bad = {
        "not a JSON request": "{oops",
        "a request is a JSON object": "[1, 2]",
        "unknown op 'train'": json.dumps({"op": "train"}),
        "outside this vocabulary": json.dumps({"op": "generate", "ids": [1, 10**7], "max_new_tokens": 2}),
        "list of integer token ids": json.dumps({"op": "generate", "ids": [1, "2"], "max_new_tokens": 2}),
        "ids is empty": json.dumps({"op": "generate", "ids": [], "max_new_tokens": 2}),
        "at least 1": json.dumps({"op": "generate", "ids": [1], "max_new_tokens": 0}),
        "exceed this context's 256 positions": json.dumps({"op": "generate", "ids": [1] * 250, "max_new_tokens": 8}),
        "needs a text string": json.dumps({"op": "tokenize", "text": 3}),
    }
    for expect, line in bad.items():
        child.proc.stdin.write(line + "\n")
        child.proc.stdin.flush()
        answer = child.proc.stdout.readline()
        assert answer.endswith("\n") and answer.count("\n") == 1
        assert expect in json.loads(answer)["error"], (line, answer)
    with pytest.raises(RCCError, match="outside this vocabulary"):
        child.request("generate", ids=[-1], max_new_tokens=1)
    assert len(child.request("generate", ids=[1, 2, 3], max_new_tokens=2)["token_ids"]) == 2  # still serving


@needs_env
def test_child_that_cannot_start_says_why_in_one_line(tmp_path):
    with pytest.raises(RCCError, match="no such GGUF file") as err:
        llamacpp.LlamaCppChild(PYTHON, tmp_path / "none.gguf", 64, 1)
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(RCCError, match="llama.cpp cannot load") as err:
        llamacpp.LlamaCppChild(PYTHON, junk, 64, 1)
    assert "\n" not in str(err.value)


@needs_env
@pytest.mark.slow  # parses the GGUF's tokenizer with transformers (~5 s)
def test_llamacpps_tokenizer_of_the_gguf_agrees_with_ours(child):
    from transformers import AutoTokenizer

    from rcc.bench.memory import context_ids, prompt_ids

    gguf = _gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check = llamacpp.tokenizer_check(child, tok)
    assert check["agrees"], check
    assert check["tokens"] > 100
    filler = tok.decode(context_ids(tok, 200, len(tok))[0].tolist() + prompt_ids(tok, len(tok))[0].tolist())
    assert llamacpp.tokenizer_check(child, tok, filler)["agrees"]
    # the check can fail: a tokenizer that differs in one id is caught at that id
    ids = tok("The pass key is 12345.", add_special_tokens=False)["input_ids"]

    def other(text, add_special_tokens):
        return {"input_ids": ids[:3] + [ids[3] + 1] + ids[4:]}

    off = llamacpp.tokenizer_check(child, other, "The pass key is 12345.")
    assert not off["agrees"] and off["first_difference"]["index"] == 3


@needs_env
@pytest.mark.slow  # loads embedded:smollm2 (GGUF dequantised) and runs llama.cpp on the same samples: 1-2 min
def test_llamacpp_baseline_reads_what_full_reads():
    """On the embedded backbone: the llamacpp runs pre-fill exactly ``full``'s
    laid-out ids (prompts and cut), and answer with llama.cpp's greedy ids."""
    from rcc.loading import load_model

    model = load_model("embedded:smollm2", window=256, ratio=8)
    cfg = EvalConfig(task="passkey", lengths=[400], depths=[0.5], modes=["manual"], baselines=["full", "llamacpp"],
                     max_new_tokens=8)
    res = run_eval(model, cfg)
    assert res["skipped"] == {}
    assert {"llamacpp/chat", "llamacpp/continuation"} <= set(res["methods"])
    assert res["llamacpp"]["tokenizer_check"]["agrees"] and res["llamacpp"]["n_ctx"] == 8192
    from rcc.prompts import ASSISTANT, HEADER

    def n(text):
        return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])

    by = {r["method"]: r for r in res["records"]}
    for prompt in ("chat", "continuation"):
        full, ll = by[f"full/{prompt}"], by[f"llamacpp/{prompt}"]
        assert ll["info"]["kept_tokens"] == full["info"]["kept_tokens"] and not ll["info"]["truncated"]
        q = ll["question"]  # the pass-key question is its own continuation cue
        overhead = n(HEADER) + n("\n\n" + q + ASSISTANT) if prompt == "chat" else n("\n\n" + q)
        assert ll["info"]["prefill_tokens"] == ll["info"]["kept_tokens"] + overhead
        assert ll["info"]["prefill_s"] > 0 and isinstance(ll["prediction"], str)
    assert any("llamacpp: llama.cpp" in n for n in res["notes"])
