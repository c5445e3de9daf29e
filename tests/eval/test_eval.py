"""The evaluation harness: scores on hand-made pairs, the pass-key generator,
every `rcc eval` task end to end on a tiny model, and the baselines' rules."""

import json
import re

import pytest
import torch

from rcc.errors import RCCError
from rcc.eval import EvalConfig, parse_depths, run_eval
from rcc.report import parse_lengths
from rcc.eval import baselines, metrics, passkey
from rcc.data.haystack import build_haystack, split_sentences
from rcc.eval.runner import TASKS
from rcc.eval.task import Prediction
from tests.conftest import REPO, tiny_rcc, tiny_tokenizer

DOC = REPO / "examples" / "lighthouse.txt"
POSITIONS = 512  # the tiny decoder's maximum positions: longer contexts are cut by the full baseline


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("eval") / "model"
    model.save_pretrained(str(path))
    return path


def cli(*args):
    from rcc.cli import main

    return main([str(a) for a in args])


# ------------------------------------------------------------------ metrics
def test_exact_match_and_f1_on_hand_made_pairs():
    assert metrics.exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert metrics.exact_match("Paris", ["London", "  paris!"]) == 1.0
    assert metrics.exact_match("Paris, France", "Paris") == 0.0
    # articles dropped: pred {cat, sat, on, mat}, gold {cat, is, on, mat}: P = R = 3/4
    assert metrics.token_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.75)
    # P = 1/1, R = 1/3 -> F1 = 0.5; the best reference counts
    assert metrics.token_f1("blue", ["dark blue sky", "red"]) == pytest.approx(0.5)
    assert metrics.token_f1("", "x") == 0.0 and metrics.token_f1("a the", "an") == 1.0  # both normalise to empty
    assert metrics.contains("I think it is Teal, really.", "teal") == 1.0
    assert metrics.contains("steal", "teal") == 0.0  # whole words only


def test_bleu_rouge_prefix_and_passkey_on_hand_made_pairs():
    assert metrics.bleu4("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    # all n-gram precisions are 1; brevity penalty exp(1 - 7/6)
    assert metrics.bleu4("the cat sat on the mat", "the cat sat on the mat today") == pytest.approx(
        100 * 2.718281828 ** (1 - 7 / 6), abs=0.01)
    assert metrics.bleu4("completely different words here", "the cat sat on the mat") < 10
    # LCS(a b c d, a c d e) = 3 -> P = R = 3/4
    assert metrics.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert metrics.rouge_l("x y", ["a b", "x y"]) == pytest.approx(1.0)
    assert metrics.exact_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert metrics.exact_prefix([], [1]) == 0 and metrics.exact_prefix([5, 6], [5, 6, 7]) == 2
    assert metrics.passkey_match("The pass key is 12345.", "12345") == 1.0
    assert metrics.passkey_match("123456", "12345") == 0.0
    assert metrics.passkey_match("It is 9 or 12345", "12345") == 0.0
    assert metrics.passkey_match("no idea", "12345") == 0.0


def test_length_and_depth_parsing():
    assert parse_lengths("4k,32k,128k,1m") == [4096, 32768, 131072, 1048576]
    assert parse_lengths("1500, 2K") == [1500, 2048]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("", "4x", "-1k", "0"):
        with pytest.raises(RCCError):
            parse_lengths(bad)
    with pytest.raises(RCCError, match="outside"):
        parse_depths("0,1.5")
    with pytest.raises(RCCError, match="--haystack"):
        EvalConfig(task="needle", needle="n", question="q", answer="a")
    with pytest.raises(RCCError, match="no such file"):
        EvalConfig(task="qa", data="/nonexistent.jsonl")
    with pytest.raises(RCCError, match="unknown baseline"):
        EvalConfig(task="passkey", baselines="full,bogus")


# --------------------------------------------------------- pass-key generator
def test_passkey_generator_is_deterministic_by_seed(tok):
    cfg = EvalConfig(task="passkey", lengths=[300, 700], depths=[0, 0.5, 1], samples=2, seed=7)
    a, b = passkey.examples(cfg, tok), passkey.examples(cfg, tok)
    assert [(e.context, e.answers) for e in a] == [(e.context, e.answers) for e in b]
    keys = [e.meta["key"] for e in a]
    assert all(re.fullmatch(r"\d{5}", k) for k in keys) and len(set(keys)) > len(keys) // 2
    other = passkey.examples(EvalConfig(task="passkey", lengths=[300, 700], depths=[0, 0.5, 1], samples=2, seed=8), tok)
    assert [e.meta["key"] for e in other] != keys
    for e in a:  # the needle appears once, with its key, and the question is the literature's
        assert e.context.count("The pass key is") == 1 and e.context.count(e.meta["key"]) == 2
        assert e.question == passkey.QUESTION and e.context.startswith(passkey.INSTRUCTION)


@pytest.mark.parametrize("length", [400, 2000])
def test_passkey_needle_sits_at_the_requested_depth(tok, length):
    cfg = EvalConfig(task="passkey", lengths=[length], depths=[0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    instr = count(passkey.INSTRUCTION)
    biggest = max(count(p) for p in passkey.FILLER)
    offsets = []
    for e in passkey.examples(cfg, tok):
        n = count(e.context)
        assert n == e.meta["tokens"] and length - 2 * biggest <= n <= length
        at = e.context.index(" The pass key is")
        before = count(e.context[:at])  # measured independently of the generator's bookkeeping
        needle = count(e.context) - count(e.context[:at]) - count(e.context[at:].split("pass key.", 1)[1])
        hay = n - instr - needle
        depth = (before - instr) / hay
        assert abs(depth - e.meta["depth"]) <= (biggest + 2) / hay, (e.meta, depth)
        offsets.append(before)
    assert offsets == sorted(offsets) and offsets[0] == instr  # depth 0: right after the instruction
    assert abs(offsets[-1] - (n - needle)) <= 2  # depth 1: at the end


def test_haystack_cycles_short_prose_and_refuses_impossible_lengths(tok):
    pieces = split_sentences(DOC.read_text())
    assert "".join(pieces).strip() == DOC.read_text().strip() and len(pieces) > 5
    hs = build_haystack(tok, pieces, "The secret colour is teal.", 3000, 0.5)
    assert hs.source_repeats > 1 and hs.tokens <= 3000 and "The secret colour is teal." in hs.text
    with pytest.raises(RCCError, match="shorter than the instruction and the needle"):
        build_haystack(tok, pieces, "The secret colour is teal.", 3, 0.5)


# ------------------------------------------------------------ baselines' rules
def test_recent_keeps_exactly_rccs_budget_of_the_latest_tokens(model, tok):
    m = baselines.RecentTokens(model.decoder, tok, budget=model.config.slots_for)
    ctx = list(range(3, 3 + 300))
    kept, info = m.select(ctx, room=10_000)
    assert len(kept) == model.config.slots_for(300) == 40 and kept == ctx[-40:]
    assert info["kept_tokens"] == 40


def test_full_context_is_cut_in_the_middle_to_the_decoder_positions(model, tok):
    m = baselines.FullContext(model.decoder, tok)
    assert m.limit == POSITIONS
    ctx = list(range(1000))
    kept, info = m.select(ctx, room=m._room(overhead=30, max_new_tokens=20))
    assert len(kept) == POSITIONS - 50 and info["truncated"] and info["context_tokens"] == 1000
    assert kept[:10] == ctx[:10] and kept[-10:] == ctx[-10:]
    assert m.select(ctx[:100], room=462) == (ctx[:100], {"truncated": False, "kept_tokens": 100, "context_tokens": 100})
    with pytest.raises(RCCError, match="positions"):
        m._room(overhead=500, max_new_tokens=20)


def test_baselines_run_the_backbone_without_the_lora_adapters(tok):
    from rcc.adapters import add_lora

    model = tiny_rcc("llama", window=64, ratio=8, max_position_embeddings=POSITIONS)
    plain = tiny_rcc("llama", window=64, ratio=8, max_position_embeddings=POSITIONS).decoder  # same seed
    add_lora(model.decoder, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained-looking adapters that change the logits
            p.requires_grad_("lora_" in name)
    ids = torch.randint(3, 300, (1, 40))
    assert not torch.allclose(model.decoder(ids).logits, plain(ids).logits, atol=1e-3)
    context, prompt = list(range(5, 65)), [7, 8, 9]
    for method in (baselines.FullContext(model.decoder, tok),
                   baselines.RecentTokens(model.decoder, tok, budget=model.config.slots_for)):
        got = method.continue_ids(context, prompt, 6)
        kept, _ = method.select(context, room=10_000)
        assert got.token_ids == baselines.greedy(plain, kept + prompt, 6)  # the base model's answer
    # the adapters are back, and what trains is unchanged
    assert not torch.allclose(model.decoder(ids).logits, plain(ids).logits, atol=1e-3)
    assert {n for n, p in model.decoder.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.decoder.named_parameters() if "lora_" in n}


def test_continuation_prompt_and_answer(tok):
    ctx, prompt = baselines.continuation_prompt(tok, "Some text.", "What is the pass key? The pass key is")
    assert tok.decode(ctx) == "Some text." and tok.decode(prompt) == "\n\nWhat is the pass key? The pass key is"
    assert baselines.continuation_answer(" 12345. Remember it.\nWhat is") == "12345. Remember it."
    assert baselines.continuation_answer("\n 42<|im_end|>junk") == "42"


def test_needle_continuation_cue_comes_from_the_needle_or_the_option():
    from rcc.eval import needle

    kw = dict(task="needle", haystack=str(DOC), needle="The secret ingredient of the cake is cardamom.",
              question="What is the secret ingredient of the cake?", answer="cardamom")
    assert needle.continuation(EvalConfig(**kw)) == ("What is the secret ingredient of the cake? "
                                                     "The secret ingredient of the cake is")
    assert needle.continuation(EvalConfig(**kw, cue="It is")) == "What is the secret ingredient of the cake? It is"
    assert needle.continuation(EvalConfig(**{**kw, "answer": "nutmeg"})).endswith("? Answer:")


def test_rcc_compresses_a_context_once_for_its_prompts(model, tok):
    """The manual chat prompt and the continuation prompt read the same memory."""
    method = baselines.RCCMethod(model)
    context = DOC.read_text()[:400]
    a = method.answer(context, "Who kept the lamp?", 4, mode="manual")
    ctx, prompt = baselines.continuation_prompt(tok, context, "Who kept the lamp? It was")
    b = method.continue_ids(ctx, prompt, 4)
    assert "compress_s" in a.info and b.info == {"slots": a.info["slots"], "compress_reused": True}
    fresh = baselines.RCCMethod(model).continue_ids(ctx, prompt, 4)
    assert fresh.token_ids == b.token_ids and "compress_s" in fresh.info


def test_kvpress_without_an_environment_is_reported_not_run(monkeypatch, model, tmp_path):
    from rcc.eval import kvpress

    monkeypatch.setattr(kvpress, "SOURCE_ROOT", tmp_path)  # no .venv-kvpress there
    monkeypatch.delenv(kvpress.ENV_VAR, raising=False)
    monkeypatch.setattr(kvpress, "_importable", lambda: False)  # nor kvpress in this interpreter
    cfg = EvalConfig(task="passkey", lengths=[200], depths=[0.5], modes="manual", baselines="kvpress:snapkv@16")
    res = run_eval(model, cfg)
    assert res["methods"] == ["rcc/manual", "rcc/continuation"]
    assert "no kvpress environment" in res["skipped"]["kvpress:snapkv@16"]
    assert any(n.startswith("kvpress:snapkv@16: skipped: no kvpress environment") for n in res["notes"])
    with pytest.raises(RCCError, match="no such executable"):
        kvpress.find_python(str(tmp_path / "nope"))


def test_baseline_specs():
    from rcc.eval.kvpress import PressSpec, budget, parse_spec

    assert EvalConfig(task="passkey", baselines="full,kvpress:snapkv@16,kvpress:SnapKVPress@32.5,full").baselines == \
        ["full", "kvpress:snapkv@16", "kvpress:SnapKVPress@32.5"]
    assert parse_spec("kvpress:expected_attention@32") == PressSpec("expected_attention", 32.0)
    assert parse_spec("kvpress") == PressSpec("snapkv", None) and parse_spec("kvpress").name(8) == "kvpress:snapkv@8"
    for bad in ("kvpress:", "kvpress:snap kv@4", "kvpress:x@", "kvpress@abc"):
        with pytest.raises(RCCError, match="kvpress:PRESS@RATIO"):
            parse_spec(bad)
    with pytest.raises(RCCError, match="above 1"):
        parse_spec("kvpress:knorm@0.5")
    with pytest.raises(RCCError, match="unknown baseline"):
        EvalConfig(task="passkey", baselines="kvpres:knorm")
    assert budget(2048, 16) == 128 and budget(2049, 16) == 129 and budget(3, 16) == 1


# ------------------------------------------------------- scoring via an oracle
class Oracle:
    """Answers from the context itself, so every score must come out perfect."""

    name = "oracle"

    def __init__(self, qa_answers=None):
        self.qa = qa_answers or {}

    def answer(self, context, question, max_new_tokens):
        m = re.search(r"The pass key is (\d+)", context)
        asked = re.search(r"special magic \w+ for (\w+) mentioned", question)
        if asked:
            m = re.search(rf"for {asked.group(1)} is: (.+?)\.(?: |$)", context)
        text = m.group(1) if m else self.qa.get(question, "teal")
        return Prediction(text, [])

    def continue_ids(self, context_ids, prompt_ids, max_new_tokens):
        k = len(prompt_ids)
        at = next(i for i in range(len(context_ids)) if context_ids[i:i + k] == list(prompt_ids))
        return Prediction(TOK.decode(context_ids[at + k: at + k + max_new_tokens]),
                          context_ids[at + k: at + k + max_new_tokens])


TOK = tiny_tokenizer()


@pytest.mark.slow  # every task end to end (13 s CPU)
def test_an_oracle_scores_perfectly_on_every_task(model, tmp_path):
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"input": "Agnes kept the lamp.", "prompt": "Who kept it?", "answer": "Agnes"}) + "\n")
    cases = {
        "passkey": dict(lengths=[200, 600], depths=[0, 1]),
        "needle": dict(haystack=str(DOC), needle="The secret colour is teal.", question="Colour?", answer="teal",
                       lengths=[300], depths=[0.5]),
        "niah": dict(lengths=[300], depths=[0.5], shapes=["number7", "uuid", "name", "date"], keys=3),
        "reconstruct": dict(text=str(DOC), lengths=[128, 256], samples=2, cue_tokens=8, target_tokens=16),
        "qa": dict(data=str(jsonl)),
    }
    for task, kw in cases.items():
        res = run_eval(model, EvalConfig(task=task, **kw), extra_methods=[Oracle({"Who kept it?": "Agnes"})])
        overall = res["summary"]["oracle" if task == "reconstruct" else "oracle/chat"]["overall"]
        if task == "reconstruct":
            assert overall["bleu4"] == pytest.approx(100.0) and overall["exact_prefix"] == 16
        else:
            assert overall[TASKS[task].METRICS[0]] == 1.0, (task, overall)


def test_wilson_interval_and_exact_copy_on_known_values():
    assert metrics.wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert metrics.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert metrics.wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    assert metrics.copy_match("It is 4430567.", "4430567") == 1.0
    assert metrics.copy_match("443056", "4430567") == 0.0 and metrics.copy_match("44305678", "4430567") == 0.0
    assert metrics.copy_match("1234567 or 4430567", "4430567") == 0.0  # the first number counts
    assert metrics.copy_match("The uuid is 3f2a-9c.", "3f2a-9c") == 1.0
    assert metrics.copy_match("x3f2a-9c", "3f2a-9c") == 0.0 and metrics.copy_match("Ada Novakova", "Ada Novak") == 0.0
    rows = [{"method": "m", "length": 1, "scores": {"accuracy": float(i < 7)}} for i in range(10)]
    from rcc.eval.runner import summarize

    overall = summarize(rows, ("length",), ("accuracy",))["m"]["overall"]
    assert overall["accuracy"] == 0.7 and overall["accuracy_ci95"] == pytest.approx([0.3968, 0.8922], abs=1e-4)


def test_niah_samples_hold_the_asked_value_once_among_distinct_distractors(tok):
    from rcc.eval import niah

    cfg = EvalConfig(task="niah", lengths=[400, 900], depths=[0, 0.5, 1], samples=2, keys=4,
                     shapes=["number7", "uuid", "hex", "phrase"])
    exs = niah.examples(cfg, tok)
    assert len(exs) == 4 * 2 * 3 * 2 and [e.id for e in exs] == [e.id for e in niah.examples(cfg, tok)]
    for e in exs:
        value, shape = e.meta["value"], e.meta["shape"]
        assert e.context.count(f"is: {value}.") == 1 and e.answers == [value]
        assert e.meta["distractors_in_context"] == 3 and e.context.count("One of the special magic") == 4
        assert e.meta["tokens"] <= e.meta["length"] and abs(e.meta["depth_measured"] - e.meta["depth"]) < 0.1
        if shape == "number7":
            assert len(value) == 7 and value.isdigit()
        assert e.meta["cell"] == f"{shape}@{e.meta['length']}"
        assert "The grass is green." in e.context and e.continuation.endswith("mentioned in the provided text is")
    with pytest.raises(RCCError, match="value shape"):
        EvalConfig(task="niah", shapes=["float"])
    with pytest.raises(RCCError, match="keys"):
        EvalConfig(task="niah", keys=0)


# ------------------------------------------------------------ the CLI, end to end
@pytest.mark.slow  # `rcc eval` end to end with plots
def test_eval_passkey_cli_with_baselines_writes_json_table_and_heatmap(ckpt, tmp_path, capsys):
    out = tmp_path / "pk.json"
    assert cli("eval", "passkey", "--model", ckpt, "--lengths", "256,1k", "--depths", "0,0.5,1", "--baseline",
               "-o", out, "--quiet") == 0
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["task"] == "passkey" and res["seed"] == 0 and res["model"]["trained"] is False
    assert res["model"]["fingerprint"] and res["config"]["lengths"] == [256, 1024]
    runs = ["rcc/reconstruct", "rcc/manual", "rcc/continuation", "full/chat", "full/continuation", "recent/chat",
            "recent/continuation"]
    kv = [n for n in ("kvpress:snapkv@8", "kvpress:expected_attention@8") if n not in res["skipped"]]
    runs += [f"{n}/{p}" for n in kv for p in ("chat", "continuation")]
    assert res["methods"] == runs and len(res["records"]) == 2 * 3 * len(runs)
    full = [r for r in res["records"] if r["method"] == "full/chat"]
    assert [r["info"]["truncated"] for r in full] == [False] * 3 + [True] * 3  # 1k > 512 positions
    assert any("cut in the middle" in n for n in res["notes"])
    assert set(res["skipped"]) <= {"kvpress:snapkv@8", "kvpress:expected_attention@8"}  # ran where .venv-kvpress is
    rcc = [r for r in res["records"] if r["method"] == "rcc/manual" and r["length"] == 1024]
    assert all(r["info"]["slots"] == 128 for r in rcc)  # 1k tokens -> 16 windows of 64 -> 128 slots
    assert [b["method"] for b in res["best"]] == ["rcc", "full", "recent", *kv]
    for b in res["best"]:
        assert b["run"] == f"{b['method']}/{b['prompt']}" and b["accuracy"] == max(b["runs"].values())
    groups = res["summary"]["rcc/manual"]["groups"]
    assert [(g["length"], g["depth"]) for g in groups] == [(a, b) for a in (256, 1024) for b in (0, 0.5, 1)]
    for name in res["methods"]:
        assert name in table
    assert "each method at its better prompt" in table
    assert "UNTRAINED" in table and "accuracy@length=1024" in table
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.slow  # `rcc eval` end to end with plots
def test_eval_needle_reconstruct_qa_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "n.json"
    assert cli("eval", "needle", "--model", ckpt, "--haystack", DOC, "--needle", "The secret colour is teal.",
               "--question", "What is the secret colour?", "--answer", "teal", "--lengths", "300",
               "--depths", "0,1", "--modes", "manual", "--baselines", "recent", "--prompts", "chat", "-o", out,
               "--quiet") == 0
    res = json.loads(out.read_text())
    assert res["methods"] == ["rcc/manual", "recent/chat"] and len(res["records"]) == 4
    assert set(res["records"][0]["scores"]) == {"accuracy", "exact_match", "f1"}

    out = tmp_path / "r.json"
    assert cli("eval", "reconstruct", "--model", ckpt, "--text", DOC, "--lengths", "128,300", "--samples", "2",
               "--target-tokens", "12", "--baseline", "-o", out, "--quiet") == 0
    res = json.loads(out.read_text())
    kv = [n for n in ("kvpress:snapkv@8", "kvpress:expected_attention@8") if n not in res["skipped"]]
    assert res["methods"] == ["rcc", "full", "recent", *kv] and len(res["records"]) == 2 * 2 * (3 + len(kv))
    for r in res["records"]:
        if r["method"] in kv:  # continuation samples: the press keeps ceil(n / 8) of the context's positions
            assert r["info"]["kv_positions"] == -(-r["info"]["context_tokens"] // 8)
    assert res["best"] == [] or all(b["prompt"] is None for b in res["best"])
    for r in res["records"]:
        assert set(r["scores"]) == {"bleu4", "exact_prefix"} and 0 <= r["scores"]["bleu4"] <= 100
        assert len(TOK(r["prediction"], add_special_tokens=False)["input_ids"]) > 0
    assert out.with_suffix(".png").is_file()

    data = tmp_path / "qa.jsonl"
    rows = [{"input": "Agnes Morrow kept the lamp for forty-one years.", "prompt": "Who kept the lamp?",
             "answer": "Agnes Morrow"},
            {"input": "The tower is thirty-one metres tall.", "prompt": "How tall?", "answer": ["31 m", "thirty-one metres"]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "q.json"
    capsys.readouterr()
    assert cli("eval", "qa", "--model", ckpt, "--data", data, "--max-new-tokens", "6", "-o", out) == 0
    res = json.loads(out.read_text())
    assert len(res["records"]) == 4 and set(res["summary"]) == {"rcc/reconstruct", "rcc/manual"}  # no cue: chat only
    assert res["records"][2]["answers"] == ["31 m", "thirty-one metres"]
    assert set(res["summary"]["rcc/manual"]["overall"]) == {"n", "exact_match", "exact_match_ci95", "f1", "rouge_l"}
    assert not out.with_suffix(".png").exists()  # QA has no picture
    assert "[4/4]" in capsys.readouterr().err  # progress lines


def test_eval_user_mistakes_are_one_line_errors(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x", "prompt": "y", "answer": "z"}) + "\n" + json.dumps({"input": "x"}) + "\n")
    assert cli("eval", "qa", "--model", ckpt, "--data", bad, "--quiet") == 2
    assert "bad.jsonl:2: missing field 'prompt'" in capsys.readouterr().err
    assert cli("eval", "passkey", "--model", ckpt, "--lengths", "10", "--quiet") == 2
    assert "shorter than the instruction and the needle" in capsys.readouterr().err
    assert cli("eval", "passkey", "--model", ckpt, "--depths", "2", "--quiet") == 2
    assert "outside [0, 1]" in capsys.readouterr().err
    assert cli("eval", "reconstruct", "--model", ckpt, "--text", DOC, "--lengths", "40", "--quiet") == 2
    assert "cannot hold the cue and the target" in capsys.readouterr().err


@pytest.mark.slow
def test_passkey_on_the_embedded_smollm2_with_baselines(tmp_path):
    """The real tokenizer and backbone: the generator's depths hold and every method runs."""
    from rcc.loading import load_model

    model = load_model("embedded:smollm2", window=512, ratio=32)
    cfg = EvalConfig(task="passkey", lengths=[600], depths=[0, 0.5, 1], modes="manual", baselines="full,recent")
    res = run_eval(model, cfg, output=tmp_path / "pk.json")
    for r in res["records"]:
        assert abs(r["depth_measured"] - r["depth"]) < 0.05 and 560 <= r["tokens"] <= 600
    assert res["methods"] == ["rcc/manual", "rcc/continuation", "full/chat", "full/continuation", "recent/chat",
                              "recent/continuation"]
    full = [r for r in res["records"] if r["family"] == "full"]
    assert not any(r["info"]["truncated"] for r in full) and all(r["prediction"] for r in full)
    # the plain SmolLM2 reads a 5-digit key from 600 tokens when asked to continue "The pass key is"
    assert res["summary"]["full/continuation"]["overall"]["accuracy"] >= 2 / 3
    recent = [r for r in res["records"] if r["family"] == "recent"]
    assert all(r["info"]["kept_tokens"] == 32 for r in recent)  # 600 tokens -> two windows of 512 -> 32 slots


def test_eval_niah_cli_writes_cells_with_intervals(ckpt, tmp_path, capsys):
    out = tmp_path / "niah.json"
    assert cli("eval", "niah", "--model", ckpt, "--lengths", "300", "--depths", "0,1", "--shapes", "number7,uuid",
               "--keys", "2", "--modes", "manual", "--prompts", "chat", "-o", out, "--quiet", "--no-plot") == 0
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["config"]["shapes"] == ["number7", "uuid"] and res["config"]["keys"] == 2
    assert res["group_by"] == ["cell", "depth"] and len(res["records"]) == 4
    by_cell = {g["cell"]: g for g in res["summary"]["rcc/manual"]["by_cell"]}
    assert set(by_cell) == {"number7@300", "uuid@300"}
    for g in by_cell.values():
        lo, hi = g["accuracy_ci95"]
        assert g["n"] == 2 and 0.0 <= lo <= g["accuracy"] <= hi <= 1.0
    assert "accuracy@cell=uuid@300" in table
    assert cli("eval", "niah", "--model", ckpt, "--shapes", "float", "-o", out) == 2
    assert "unknown value shape 'float'" in capsys.readouterr().err
