"""The lm-evaluation-harness adapter (rcc/eval/harness.py) through lm-eval's own
``simple_evaluate`` and command line, on the local tasks of tests/lm_eval_task/
(a YAML per request type over docs.jsonl) and a tiny random RCC model saved to disk:
every score lm-eval records is recomputed here with RCCModel's own forward pass
(slots built inline, no cache) and generate."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, tiny_rcc, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")  # in the eval extra; scripts/install.sh installs it (CI)

TASKS = REPO / "tests" / "lm_eval_task"
SPLIT = "\nQuestion:"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_rcc("llama", window=64, ratio=8)
    model.tokenizer = tiny_tokenizer()
    path = tmp_path_factory.mktemp("rcc") / "model"
    model.save_pretrained(str(path), include_backbones=True)
    from rcc import RCCModel

    return str(path), RCCModel.from_pretrained(str(path)).eval()


def _evaluate(path, tasks, **args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import rcc.eval.harness  # noqa: F401  registers --model rcc

    model_args = ",".join(f"{k}={v}" for k, v in {"model": path, "device": "cpu", "dtype": "float32", **args}.items())
    return simple_evaluate(model="rcc", model_args=model_args, tasks=tasks, log_samples=True,
                           task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                           bootstrap_iters=0)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _logprob(model, memory_ids, prompt, cont):
    """log p(cont | slots of memory_ids, prompt) from RCCModel.forward, and whether greedy."""
    out = model(context_ids=torch.tensor([memory_ids]), input_ids=torch.tensor([prompt + cont]))
    # logits[:, t] predicts input_ids[:, t + 1]: the continuation from the prompt's last token on
    lp = F.log_softmax(out.logits[0, len(prompt) - 1 : len(prompt) + len(cont) - 1].double(), -1)
    target = torch.tensor(cont)
    return lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


@pytest.mark.slow  # lm-eval's task loading and three tasks
def test_lm_eval_scores_are_rcc_own_log_probs_and_generations(saved, one_thread):
    path, model = saved
    tok = model.tokenizer
    res = _evaluate(path, ["rcc_tiny_mc", "rcc_tiny_gen", "rcc_tiny_ppl"], split=SPLIT.replace("\n", "\\n"),
                    batch_size=2)
    mc = res["samples"]["rcc_tiny_mc"]
    assert len(mc) == 4
    for s in mc:
        assert len(s["arguments"]) == len(s["resps"]) == 3
        for (context, cont), ((lp, greedy),) in zip(s["arguments"], s["resps"]):
            at = context.rfind(SPLIT)
            head, tail = context[:at], context[at:]
            whole, prompt = _ids(tok, tail + cont), _ids(tok, tail)
            assert at > 0 and whole[: len(prompt)] == prompt
            want = _logprob(model, _ids(tok, head), prompt, whole[len(prompt):])
            assert lp == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
        # acc is lm-eval's choice of the highest log-prob among RCC's scores
        best = max(range(3), key=lambda i: s["resps"][i][0][0])
        assert s["acc"] == float(best == int(s["target"]))
    assert res["results"]["rcc_tiny_mc"]["acc,none"] == pytest.approx(sum(s["acc"] for s in mc) / 4)

    eot = tok.eos_token_id
    for s in res["samples"]["rcc_tiny_gen"]:
        ((context, kwargs),) = s["arguments"]
        assert kwargs["until"] == ["\n", "."] and kwargs["max_gen_toks"] == 8
        at = context.rfind(SPLIT)
        ids = model.generate(torch.tensor([_ids(tok, context[:at])]), torch.tensor([_ids(tok, context[at:])]),
                             max_new_tokens=8, eos_token_id=eot)
        assert s["resps"] == [[tok.decode(ids[0], skip_special_tokens=True).split("\n")[0].split(".")[0]]]

    W = model.config.window
    ppl = res["samples"]["rcc_tiny_ppl"]
    assert any(len(_ids(tok, s["arguments"][0][0])) > W for s in ppl)  # some passage spans two windows
    for s in ppl:
        ids = _ids(tok, s["arguments"][0][0])
        want = 0.0
        for start in range(0, len(ids), W):
            memory = ids[:start] or [eot]  # the windows before, compressed; the first reads the end-of-text token
            before = ids[start - 1 : start] if start else [eot]
            want += _logprob(model, memory, before, ids[start : start + W])[0]
        assert s["resps"][0][0] == pytest.approx(want, abs=1e-3)


def test_requests_split_into_memory_and_prompt(saved):
    """What is compressed and what the decoder reads raw: the split text's last occurrence,
    else the last prompt_tokens tokens; nothing before the prompt compresses end-of-text."""
    from rcc.eval.harness import RCCLM

    _, model = saved
    tok, eot = model.tokenizer, model.tokenizer.eos_token_id
    text = "The keeper rowed to the mainland.\nQuestion: Who rowed?\nAnswer:"
    lm = RCCLM(model=model, prompt_tokens=5)
    memory, prompt, cont = lm.split_request(text, " the keeper")
    whole = _ids(tok, text + " the keeper")
    assert memory + prompt + cont == whole and len(prompt) == 5 and cont
    assert lm.split_request("A", " b")[:2] == ([eot], _ids(tok, "A"))
    assert lm.split_request("", "A")[:2] == ([eot], [eot])
    marked = RCCLM(model=model, split="\\nQuestion:")  # as typed in --model_args
    memory, prompt, _ = marked.split_request(text)
    assert tok.decode(memory) == "The keeper rowed to the mainland." and tok.decode(prompt).startswith("\nQuestion:")
    plain = _ids(tok, "no marker here at all")  # the split text absent: the last prompt_tokens (32) tokens
    assert marked.split_request("no marker here at all")[:2] == (plain[: len(plain) - min(32, len(plain) - 1)],
                                                                plain[len(plain) - min(32, len(plain) - 1):])


def test_bad_model_args_are_errors_that_say_what_to_do(saved):
    from rcc.errors import RCCError
    from rcc.eval.harness import RCCLM

    with pytest.raises(RCCError, match="unknown option.*frobnicate.*; use model, base_model"):
        RCCLM(model=saved[1], frobnicate=1)
    with pytest.raises(RCCError, match="prompt_tokens=0: must be"):
        RCCLM(model=saved[1], prompt_tokens=0)
    # lm-eval's command line gives device=cuda:0 unless told otherwise: without a GPU that means the CPU,
    # and the model's own arguments win over lm-eval's
    lm = RCCLM.create_from_arg_string(f"model={saved[0]},batch_size=3", {"device": "cuda:0", "batch_size": 7})
    assert lm.batch_size == 3 and (torch.cuda.is_available() or lm.device.type == "cpu")
    chat = [{"role": "user", "content": "Who rowed?"}]
    with pytest.raises(RCCError, match="no chat template; drop --apply_chat_template"):
        lm.apply_chat_template(chat)
    lm.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert lm.apply_chat_template(chat) == "<|im_start|>user\nWho rowed?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow  # lm-eval's command line (it indexes its ~15k built-in tasks: ~10 s), one task
def test_rcc_lm_eval_command_writes_lm_eval_results(saved, tmp_path, one_thread, capsys):
    from rcc.cli import main

    code = main(["lm-eval", "--model", "rcc", "--model_args", f"model={saved[0]},device=cpu,frobnicate=1",
                 "--tasks", "rcc_tiny_mc", "--include_path", str(TASKS)])
    err = capsys.readouterr().err
    assert code == 2 and "rcc: error: --model_args: unknown option(s) frobnicate" in err and "Traceback" not in err
    out = tmp_path / "results"
    assert main(["lm-eval", "--model", "rcc", "--model_args", f"model={saved[0]},device=cpu,split=\\nQuestion:",
                 "--tasks", "rcc_tiny_mc", "--include_path", str(TASKS), "--output_path", str(out)]) == 0
    (result,) = out.rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["rcc_tiny_mc"]["acc,none"]
    assert acc == _evaluate(saved[0], ["rcc_tiny_mc"], split="\\nQuestion:")["results"]["rcc_tiny_mc"]["acc,none"]
