"""`rcc synth`: synthetic pass-key / needle / extract records from prose, read
back by the fine-tuning loader; bad arguments are one-line errors."""

import json
from collections import Counter

import pytest

from rcc import RCCError
from rcc.cli import main
from rcc.data import load_examples
from rcc.eval import passkey
from rcc.data.synth import make_records, parse_weights, read_prose
from tests.conftest import REPO, tiny_tokenizer


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prose")
    (folder / "a.txt").write_text((REPO / "examples" / "lighthouse.txt").read_text())
    (folder / "b.txt").write_text("The tide came in slowly over the flat grey sand that evening. "
                                  "Nobody on the pier noticed the small boat until it was very close. " * 5)
    return folder


def test_records_hold_their_answer_at_the_asked_length_and_depth(prose):
    tok = tiny_tokenizer()
    sentences = read_prose([str(prose)])
    records = list(make_records(sentences, tok, count=60, weights={"passkey": 1, "needle": 1, "extract": 1},
                                min_tokens=120, max_tokens=600, seed=3))
    assert Counter(r["task"] for r in records).keys() == {"passkey", "needle", "extract"}
    for r in records:
        assert r["answer"] and r["answer"] in r["input"]  # the answer is in the context, verbatim
        assert r["tokens"] == len(tok(r["input"], add_special_tokens=False).input_ids) <= 600
        assert 0.0 <= r["depth"] <= 1.0
        if r["task"] == "passkey":
            assert r["prompt"] == passkey.QUESTION and r["input"].count(r["answer"]) == 2
            assert r["input"].startswith(passkey.INSTRUCTION)
        if r["task"] == "extract":
            cue = r["prompt"].split('"')[1]
            assert f"{cue} {r['answer']}" in r["input"]
    lengths = sorted(r["tokens"] for r in records)
    assert lengths[0] < 200 and lengths[-1] > 400  # spread over the range, not one length
    depths = [r["depth"] for r in records]
    assert min(depths) < 0.2 and max(depths) > 0.8
    again = list(make_records(sentences, tok, count=60, weights={"passkey": 1, "needle": 1, "extract": 1},
                              min_tokens=120, max_tokens=600, seed=3))
    assert again == records  # a function of the arguments only
    other = list(make_records(sentences, tok, count=60, weights={"passkey": 1, "needle": 1, "extract": 1},
                              min_tokens=120, max_tokens=600, seed=4))
    assert other != records


def test_the_cli_writes_records_the_fine_tuning_loader_reads(prose, tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / "tasks.jsonl"
    assert main(["synth", str(prose), "-o", str(out), "--tokenizer", str(tmp_path / "tok"), "--count", "20",
                 "--kinds", "passkey=1,needle=0", "--min-tokens", "100", "--max-tokens", "300"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 20 and {r["task"] for r in records} == {"passkey"}
    examples, report = load_examples(str(out), tok, mode="manual", window=64, max_windows=8, max_decoder_tokens=256,
                                     answer_suffix="<|im_end|>", progress=False)
    assert report.kept == 20
    for ex, r in zip(examples, records):  # the target is the key and the stop marker
        target = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])
        assert target == r["answer"] + "<|im_end|>"


MIXED = {"fact": 1, "multikey": 1, "multineedle": 1, "reconstruct": 1, "continue": 1}


def test_the_mixed_recipe_kinds(prose):
    """The generalist recipe's kinds: free-valued facts, several labelled keys or
    facts of which one is asked, and pre-tokenized reconstruction / continuation."""
    tok = tiny_tokenizer()
    sentences = read_prose([str(prose)])
    records = list(make_records(sentences, tok, count=80, weights=MIXED, min_tokens=150, max_tokens=900, seed=7))
    assert set(Counter(r["task"] for r in records)) == set(MIXED)
    values, several = set(), []
    for r in records:
        if r["task"] in ("reconstruct", "continue"):
            ctx, ids, labels = r["context_ids"], r["input_ids"], r["labels"]
            assert len(ctx) == r["tokens"] <= 300 and len(ids) == len(labels)
            counted = [t for t, lab in zip(ids, labels) if lab != -100]
            assert counted == [lab for lab in labels if lab != -100] and len(counted) == 64
            text = tok.decode(ctx)
            if r["task"] == "reconstruct":  # cue and target are a stretch of the compressed text
                assert labels[:16] == [-100] * 16 and tok.decode(ids) in text
            else:  # the target follows the context, it is not in it
                assert labels == ids
            continue
        assert r["answer"] and r["answer"] in r["input"]
        if r["task"] == "multikey":
            label = r["prompt"].split("pass key of the ")[1].rstrip("?")
            keys = dict(m for m in __import__("re").findall(r"The pass key of the ([a-z ]+) is (\d{5})", r["input"]))
            assert keys[label] == r["answer"] and len(keys) >= 2  # the others are distractors
        if r["task"] == "multineedle":
            asked = sum(r["input"].count(form) for form in ("in charge of", "password for", "serial number",
                        "note left", "last seen", "favourite city", "magic number", "secret word", "meeting with",
                        "hid the", "code to open", "was born"))
            several.append(asked >= 2)  # a short haystack may drop a distractor; most keep them
        if r["task"] == "fact":
            values.add(r["answer"])
    assert len(values) == sum(r["task"] == "fact" for r in records)  # free values: no two alike
    assert sum(several) >= 0.7 * len(several)


def test_pretokenized_records_load_for_fine_tuning(prose, tmp_path):
    tok = tiny_tokenizer()
    out = tmp_path / "mixed.jsonl"
    records = list(make_records(read_prose([str(prose)]), tok, count=12, weights={"reconstruct": 1, "continue": 1},
                                min_tokens=100, max_tokens=300, seed=1))
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples, report = load_examples(str(out), tok, mode="mixed", window=64, max_windows=8, max_decoder_tokens=128,
                                     answer_suffix="<|im_end|>", progress=False)
    assert report.kept == 12
    for ex, r in zip(examples, records):
        assert list(ex.context[:len(r["context_ids"])]) == r["context_ids"]
        assert list(ex.labels) == r["labels"]


@pytest.mark.parametrize("args, message", [
    (["--kinds", "passkey=1,haystack=2"], "unknown record kind 'haystack'"),
    (["--kinds", "passkey=x"], "is not KIND=SHARE"),
    (["--kinds", "passkey=0"], "gives no kind a positive share"),
    (["--min-tokens", "900", "--max-tokens", "300"], "at most --max-tokens"),
    (["--count", "0"], "--count must be positive"),
])
def test_bad_arguments_are_one_line_errors(prose, tmp_path, capsys, args, message):
    tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / "tasks.jsonl"
    code = main(["synth", str(prose), "-o", str(out), "--tokenizer", str(tmp_path / "tok"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


def test_missing_or_empty_prose_is_refused(tmp_path):
    with pytest.raises(RCCError, match="no such file or folder"):
        read_prose([str(tmp_path / "nope")])
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(RCCError, match="no sentences"):
        read_prose([str(tmp_path / "empty.txt")])
    assert parse_weights("passkey") == {"passkey": 1.0}


def test_copy_records_vary_the_value_shape_and_the_haystack_and_hold_their_answer(prose):
    """`copy`: every value shape and haystack kind appears; the answer is in the context verbatim,
    once per value (distractors have other values); lengths are as asked."""
    import re

    from rcc.data.synth import HAYSTACKS, VALUE_SHAPES, shaped_value

    tok = tiny_tokenizer()
    sentences = read_prose([str(prose)])
    records = list(make_records(sentences, tok, count=120, weights={"copy": 1}, min_tokens=150, max_tokens=500, seed=1))
    assert {r["task"] for r in records} == {"copy"}
    for r in records:
        for value in r["answer"].split(" and "):
            assert value in r["input"], (value, r["prompt"])
        assert r["prompt"].startswith("What is the ") and r["prompt"].endswith("?")
        assert r["tokens"] == len(tok(r["input"], add_special_tokens=False).input_ids)
    texts = " ".join(r["input"] for r in records)
    assert "\n| " in texts and "\ndef " in texts and re.search(r"\n\d+\. ", texts)  # table, code, list haystacks
    assert "The clouds drift over the hills" in texts  # the filler haystack, this module's own sentences
    assert sum(" and " in r["answer"] for r in records) > 0  # two values for one label, at times
    assert max(r["input"].count(" is ") for r in records) > 2  # distractor labels
    import random

    rng = random.Random(0)
    shapes = {s: [shaped_value(rng, s, sentences) for _ in range(200)] for s in VALUE_SHAPES}
    assert {len(v) for v in shapes["number"]} == set(range(1, 13)) and all(v.isdigit() for v in shapes["number"])
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
               for v in shapes["uuid"])
    assert all(re.fullmatch(r"[0-9a-f]{6,32}", v) for v in shapes["hex"])
    assert all(re.fullmatch(r"\d{1,2} [A-Z][a-z]+ \d{4}|\d{4}-\d{2}-\d{2}", v) for v in shapes["date"])
    assert all(1 <= len(v.split()) <= 6 for v in shapes["phrase"]) and len(HAYSTACKS) == 5
