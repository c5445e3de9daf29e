"""`rcc synth`: synthetic pass-key / needle / extract records from prose, read
back by the fine-tuning loader; bad arguments are one-line errors."""

import json
from collections import Counter
from pathlib import Path

import pytest

from rcc import RCCError
from rcc.cli import main
from rcc.data import load_examples
from rcc.eval import passkey
from rcc.synth import make_records, parse_weights, read_prose
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
