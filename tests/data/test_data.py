"""Training data: prepare-data token folders, bad-data messages, and the
pretraining / fine-tuning micro-batch builders."""

import json

import numpy as np
import pytest
import torch

from rcc import RCCError
from rcc.cli import main
from rcc.data import (FinetuneBatches, PretrainBatches, TokenFile, iter_records, load_examples, prepare_data,
                      qa_fields, qa_texts, token_dtype, write_token_folder)
from rcc.prompts import ASSISTANT, HEADER
from tests.conftest import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(path))
    return str(path)


WORDS = "the keeper climbs the tower every night to light the lamp for ships far out at sea".split()


def text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ------------------------------------------------------------ prepare-data
def test_prepare_data_writes_documents_in_order_with_a_heldout_split(tmp_path, tok):
    docs = [text(60 + 7 * i, i) for i in range(40)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs[:30]])
    (tmp_path / "b.txt").write_text(docs[30])
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in docs[31:]])
    meta = prepare_data([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), str(tmp_path / "c.jsonl")],
                        tmp_path / "out", tok, eval_fraction=0.25, min_tokens=1, progress=False)
    train, held = TokenFile(tmp_path / "out", "train"), TokenFile(tmp_path / "out", "eval")
    assert train.tokens.dtype == np.uint16 and meta["vocab_size"] == len(tok)
    assert train.num_docs + held.num_docs == 40 and held.num_docs > 0 and train.num_docs > 0
    expected = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in docs]
    got = [np.asarray(f.tokens[f.offsets[i]:f.offsets[i + 1]]).tolist() for f in (train, held) for i in range(f.num_docs)]
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    # the split is fixed by the seed: preparing again gives the same files
    prepare_data([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), str(tmp_path / "c.jsonl")],
                 tmp_path / "again", tok, eval_fraction=0.25, min_tokens=1, progress=False)
    assert (tmp_path / "again" / "eval.bin").read_bytes() == (tmp_path / "out" / "eval.bin").read_bytes()


def test_a_text_file_that_breaks_half_way_is_skipped_whole(tmp_path, tok):
    (tmp_path / "a.txt").write_text(text(200, 0))
    (tmp_path / "b.txt").write_bytes(text(200, 1).encode() + b"\n\xff\xfe broken\n")
    with pytest.raises(RCCError, match=r"b\.txt: not UTF-8 \(bad byte at offset \d+\)"):
        prepare_data([str(tmp_path)], tmp_path / "o1", tok, min_tokens=1, progress=False)
    meta = prepare_data([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "o2", tok, min_tokens=1,
                        on_error="skip", eval_fraction=0.0, progress=False)
    only_a = tok(text(200, 0), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert np.asarray(TokenFile(tmp_path / "o2").tokens).tolist() == only_a
    assert meta["report"]["skipped"] == {"malformed records": 1}


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(50_304) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(151_936) == np.uint32


def test_prepare_data_reads_a_saved_hf_dataset(tmp_path, tok):
    from datasets import Dataset

    Dataset.from_dict({"body": [text(50, i) for i in range(6)]}).save_to_disk(str(tmp_path / "ds"))
    meta = prepare_data([str(tmp_path / "ds")], tmp_path / "out", tok, text_field="body", eval_fraction=0.0,
                        min_tokens=1, progress=False)
    assert meta["splits"]["train"]["docs"] == 6 and meta["report"]["read"] == 6


def test_short_documents_are_counted_never_padded(tmp_path, tok):
    long, short = text(400, 1), text(3, 2)
    write_jsonl(tmp_path / "d.jsonl", [{"text": long}, {"text": short}, {"text": long}])
    meta = prepare_data([str(tmp_path / "d.jsonl")], tmp_path / "out", tok, eval_fraction=0.0, min_tokens=64,
                        progress=False)
    assert meta["splits"]["train"]["docs"] == 2
    (reason, n), = meta["report"]["skipped"].items()
    assert n == 1 and "shorter than 64" in reason and f"{tmp_path / 'd.jsonl'}:2" in meta["report"]["skipped_examples"][reason][0]
    with pytest.raises(RCCError, match=r"d\.jsonl:2: \d+ tokens, fewer than the minimum of 64"):
        prepare_data([str(tmp_path / "d.jsonl")], tmp_path / "out2", tok, min_tokens=64, on_short="fail", progress=False)
    with pytest.raises(RCCError, match="no document was kept"):
        prepare_data([str(tmp_path / "d.jsonl")], tmp_path / "out3", tok, min_tokens=10_000, progress=False)


def test_malformed_lines_fail_or_are_skipped_with_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": text(80, 0)}, '{"text": "unterminated', {"txt": "x"},
                                                {"text": text(80, 1)}])
    with pytest.raises(RCCError, match=r"bad\.jsonl:2: invalid JSON"):
        prepare_data([str(path)], tmp_path / "o1", tok, min_tokens=1, progress=False)
    meta = prepare_data([str(path)], tmp_path / "o2", tok, min_tokens=1, on_error="skip", eval_fraction=0.0,
                        progress=False)
    assert meta["splits"]["train"]["docs"] == 2 and meta["report"]["skipped"] == {"malformed records": 2}
    shown = meta["report"]["skipped_examples"]["malformed records"]
    assert "bad.jsonl:2: invalid JSON" in shown[0] and "bad.jsonl:3: no 'text' field (fields: txt)" in shown[1]
    assert not (tmp_path / "o1" / "meta.json").exists() and not list((tmp_path / "o1").glob("*.part"))


@pytest.mark.parametrize("content, extra, message", [
    ("", [], r"x\.jsonl: empty file"),
    ('{"text": "the lamp"}\n{"text": "the lamp\n', [], r"x\.jsonl:2: invalid JSON \(Unterminated string"),
    ('{"text": "ok ok"}\n[1, 2]\n', [], r"x\.jsonl:2: expected a JSON object"),
    ('{"text": "ok ok"}\n{"body": "the lamp"}\n', [], r"x\.jsonl:2: no 'text' field \(fields: body\)"),
    ('{"text": 5}\n', [], r"x\.jsonl:1: a non-text \(int\) 'text' field"),
    ('{"text": "the lamp was lit at dusk by the keeper"}\n{"text": "the lamp"}\n', ["--min-tokens", "6", "--on-short", "fail"],
     r"x\.jsonl:2: \d tokens, fewer than the minimum of 6"),
    ('{"text": "the lamp"}\n', ["--min-tokens", "50"], r"no document was kept.*x\.jsonl:1: \d tokens"),
])
def test_prepare_data_cli_reports_bad_data_with_a_nonzero_exit(tmp_path, tok_dir, capsys, content, extra, message):
    (tmp_path / "x.jsonl").write_text(content)
    code = main(["prepare-data", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "out"), "--tokenizer", tok_dir,
                 "--min-tokens", "1", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rcc: error:") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_prepare_data_cli_refuses_to_overwrite(tmp_path, tok_dir, capsys):
    (tmp_path / "a.txt").write_text(text(100, 0))
    args = ["prepare-data", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"), "--tokenizer", tok_dir,
            "--min-tokens", "8", "--eval-fraction", "0", "--quiet"]
    assert main(args) == 0
    assert "train 1 documents" in capsys.readouterr().err
    assert main(args) == 2 and "already holds prepared data" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


# ----------------------------------------------------- pretraining batches
@pytest.fixture(scope="module")
def token_folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    lengths = [40, 100, 70, 33, 250]
    docs = [rng.integers(1, 300, n) for n in lengths]
    folder = tmp_path_factory.mktemp("tokens")
    write_token_folder(folder, {"train": docs, "eval": docs[:1]}, 300)
    return folder, docs


def _find(doc_list, seq):
    """(doc index, offset) of seq inside one document, or None."""
    for d, doc in enumerate(doc_list):
        for s in range(len(doc) - len(seq) + 1):
            if np.array_equal(doc[s:s + len(seq)], seq):
                return d, s
    return None


def test_reconstruction_batches_copy_a_span_of_the_encoded_text(token_folder):
    folder, docs = token_folder
    data = PretrainBatches(TokenFile(folder), window=16, batch_size=4, min_windows=1, max_windows=2,
                           target_tokens=12, cue_min=3, cue_max=5, reconstruct_fraction=1.0, seed=0)
    seen_c = set()
    for i in range(20):
        b = data[i]
        n = b["context_ids"].shape[1]
        seen_c.add(n // 16)
        assert n in (16, 32) and b["input_ids"].shape == b["labels"].shape == (4, 12)
        for ctx, ids, lab in zip(b["context_ids"].numpy(), b["input_ids"].numpy(), b["labels"].numpy()):
            assert _find(docs, ctx) is not None  # one document, never across a boundary
            assert _find([ctx], ids) is not None  # the target lies inside the encoded text
            cue = int((lab == -100).sum())
            assert 3 <= cue <= 5 and (lab[:cue] == -100).all() and (lab[cue:] == ids[cue:]).all()
    assert seen_c == {1, 2}
    fresh = PretrainBatches(TokenFile(folder), window=16, batch_size=4, min_windows=1, max_windows=2,
                            target_tokens=12, cue_min=3, cue_max=5, reconstruct_fraction=1.0, seed=0)
    again = fresh[7]  # batch i depends only on (seed, i), not on the batches drawn before it
    assert again.keys() == data[7].keys() and all(torch.equal(again[k], data[7][k]) for k in again)
    assert not torch.equal(data[7]["context_ids"][:, :16], data[8]["context_ids"][:, :16])


def test_continuation_batches_continue_the_encoded_text(token_folder):
    folder, docs = token_folder
    data = PretrainBatches(TokenFile(folder), window=32, batch_size=3, min_windows=1, max_windows=1,
                           target_tokens=20, cue_min=0, cue_max=0, reconstruct_fraction=0.0, seed=1)
    for i in range(10):
        b = data[i]
        for ctx, ids, lab in zip(b["context_ids"].numpy(), b["input_ids"].numpy(), b["labels"].numpy()):
            d, s = _find(docs, np.concatenate([ctx, ids]))  # context then target, contiguous in one document
            assert len(docs[d]) >= 52 and (lab == ids).all()


def test_no_document_long_enough_is_a_clear_error(token_folder):
    folder, _ = token_folder
    with pytest.raises(RCCError, match=r"no document has the 256 tokens .*longest: 250"):
        PretrainBatches(TokenFile(folder), window=256, batch_size=1, min_windows=1, max_windows=2, target_tokens=8,
                        cue_min=1, cue_max=2, reconstruct_fraction=1.0)
    packed = PretrainBatches(TokenFile(folder), window=256, batch_size=1, min_windows=1, max_windows=1,
                             target_tokens=8, cue_min=1, cue_max=2, reconstruct_fraction=1.0, cross_documents=True)
    assert packed[0]["context_ids"].shape == (1, 256)


def test_unprepared_folder_is_refused(tmp_path):
    with pytest.raises(RCCError, match="prepare the data with `rcc prepare-data`"):
        TokenFile(tmp_path)


# ------------------------------------------------------ fine-tuning records
PWC = {"input": "The lamp was lit at dusk.", "prompt": "When was the lamp lit?", "answer": "At dusk."}
HOTPOT_HF = {"question": "Who lit it?", "answer": "The keeper",
             "context": {"title": ["Lamp", "Keeper"], "sentences": [["It was lit. ", "Daily."], ["He climbs."]]}}
HOTPOT_JSON = {"question": "Who lit it?", "answer": "The keeper",
               "context": [["Lamp", ["It was lit. ", "Daily."]], ["Keeper", ["He climbs."]]]}


def test_qa_fields_read_pwc_and_both_hotpotqa_shapes():
    assert qa_fields(PWC, "f:1") == (PWC["input"], PWC["prompt"], PWC["answer"])
    hf, js = qa_fields(HOTPOT_HF, "f:2"), qa_fields(HOTPOT_JSON, "f:3")
    assert hf == js and hf[0] == "Lamp\nIt was lit. Daily.\n\nKeeper\nHe climbs." and hf[1:] == ("Who lit it?", "The keeper")
    with pytest.raises(RCCError, match=r"f:4: missing field 'answer' \(PwC records need input, prompt, answer\)"):
        qa_fields({"input": "x", "prompt": "y"}, "f:4")
    with pytest.raises(RCCError, match=r"f:5: unknown record shape \(fields: foo\)"):
        qa_fields({"foo": 1}, "f:5")
    with pytest.raises(RCCError, match=r"f:6: field 'prompt' must be text"):
        qa_fields({"input": "x", "prompt": 3, "answer": "z"}, "f:6")


def test_instruction_modes_put_the_question_where_the_spec_says():
    ctx, q, a = PWC["input"], PWC["prompt"], PWC["answer"]
    comp, prompt, target = qa_texts(ctx, q, a, "reconstruct", "<|im_end|>")
    assert comp == ctx + "\n\n" + q and prompt == HEADER and target == q + ASSISTANT + a + "<|im_end|>"
    comp, prompt, target = qa_texts(ctx, q, a, "manual", "<|im_end|>")
    assert comp == ctx and prompt == HEADER + q + ASSISTANT and target == a + "<|im_end|>"


def test_finetune_examples_count_only_the_target(tmp_path, tok):
    write_jsonl(tmp_path / "qa.jsonl", [PWC, HOTPOT_HF])
    examples, report = load_examples(str(tmp_path / "qa.jsonl"), tok, mode="reconstruct", window=64, max_windows=2,
                                     max_decoder_tokens=512, answer_suffix="<|im_end|>", progress=False)
    assert report.kept == 2 and len(examples) == 2
    e = examples[0]
    n_prompt = len(tok(HEADER, add_special_tokens=False)["input_ids"])
    assert (e.labels[:n_prompt] == -100).all() and (e.labels[n_prompt:] == e.input_ids[n_prompt:]).all()
    assert tok.decode(e.input_ids[n_prompt:].tolist()) == PWC["prompt"] + ASSISTANT + PWC["answer"] + "<|im_end|>"
    assert tok.decode(e.context.tolist()) == PWC["input"] + "\n\n" + PWC["prompt"]
    assert "shorter than one window" in report.summary()


def test_finetune_batches_name_the_window_that_holds_the_answer(tmp_path, tok):
    # the answer sits at varied depths of 1-to-4-window contexts; a record whose
    # answer is not in its context (and a pre-tokenized one) gets no focus
    records = []
    for k, (before, after) in enumerate([(5, 5), (30, 200), (120, 10), (250, 40), (60, 300)]):
        records.append({"input": f"{text(before, k)} the code is QZX{k}. {text(after, k + 9)}",
                        "prompt": "What is the code?", "answer": f"QZX{k}"})
    records.append({"input": text(80, 50), "prompt": "What is the code?", "answer": "zebra"})
    records.append({"context_ids": [5] * 90, "input_ids": [6, 7], "labels": [-100, 7]})
    write_jsonl(tmp_path / "qa.jsonl", records)
    examples, report = load_examples(str(tmp_path / "qa.jsonl"), tok, mode="manual", window=64, max_windows=32,
                                     max_decoder_tokens=64, answer_suffix="", progress=False)
    assert report.kept == 7 and sorted(e.answer_at >= 0 for e in examples) == [False] * 2 + [True] * 5
    assert len({len(e.context) // 64 for e in examples}) >= 3  # contexts of several lengths
    data = FinetuneBatches(examples, window=64, batch_size=1, seed=0)
    focused = 0
    for i in range(len(data)):
        b = data[i]
        answer = tok.decode(b["input_ids"][0][b["labels"][0] != -100].tolist())
        if "focus_windows" not in b:
            assert answer in ("zebra", tok.decode([7]))
            continue
        w = int(b["focus_windows"][0])
        ctx = tok.decode(b["context_ids"][0].tolist())
        window = tok.decode(b["context_ids"][0, 64 * w: 64 * (w + 1)].tolist())
        assert answer in ctx and "Q" in window  # the window where the answer starts ("Q" occurs nowhere else)
        focused += 1
    assert focused == 5


def test_finetune_batches_group_by_windows_and_pad_on_the_right():
    from rcc.data import FinetuneExample

    rng = np.random.default_rng(0)
    ex = [FinetuneExample(rng.integers(1, 50, n), rng.integers(1, 50, m), rng.integers(1, 50, m))
          for n, m in [(10, 5), (20, 7), (40, 3), (70, 6), (33, 4), (100, 8)]]
    data = FinetuneBatches(ex, window=32, batch_size=2, seed=0, pad_id=0)
    seen = []
    for i in range(len(data)):
        b = data[i]
        assert b["context_ids"].shape[1] % 32 == 0
        if "attention_mask" in b:
            pad = b["attention_mask"] == 0
            assert (b["labels"][pad] == -100).all() and (b["input_ids"][pad] == 0).all()
            assert (b["attention_mask"].diff(dim=1) <= 0).all()  # ones then zeros
        seen += [int(b["context_ids"].shape[1])] * b["context_ids"].shape[0]
    assert sorted(seen) == [32, 32, 64, 64, 96, 128]  # every example once per epoch
    assert [data.plan(0)] != [data.plan(1)] or len(data) == 1


def test_bad_finetune_records_stop_rcc_train_with_file_and_line(tmp_path, tok_dir, capsys):
    write_jsonl(tmp_path / "qa.jsonl", [PWC, {"input": "x", "prompt": "y"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: finetune\ndata:\n  train_data: {tmp_path / 'qa.jsonl'}\n"
                   f"run:\n  output_dir: {tmp_path / 'run'}\n  progress: false\noptim:\n  max_steps: 1\n"
                   "model:\n  backbone: {model_type: llama, vocab_size: 300, hidden_size: 32, num_hidden_layers: 1,"
                   " num_attention_heads: 2, intermediate_size: 64}\n  window: 32\n  ratio: 4\n"
                   f"  tokenizer: {tok_dir}\n")
    code = main(["train", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'qa.jsonl'}:2: missing field 'answer'" in err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["train", str(cfg), f"data.train_data={tmp_path / 'empty.jsonl'}"]) == 2
    assert "empty.jsonl: empty file" in capsys.readouterr().err


def test_iter_records_reads_hotpotqa_json_lists(tmp_path):
    (tmp_path / "h.json").write_text(json.dumps([HOTPOT_JSON, HOTPOT_JSON]))
    assert [w for w, _ in iter_records(str(tmp_path / "h.json"))] == [f"{tmp_path / 'h.json'}#0", f"{tmp_path / 'h.json'}#1"]
    (tmp_path / "bad.json").write_text('[{"a": 1},\n {"b": ]')
    with pytest.raises(RCCError, match=r"bad\.json:2: invalid JSON"):
        list(iter_records(str(tmp_path / "bad.json")))
