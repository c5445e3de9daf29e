"""`rcc ask / compress / info` end to end from a shell, and bad input through the CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_rcc, tiny_tokenizer

DOC = REPO / "examples" / "lighthouse.txt"


def rcc(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rcc.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


def assert_user_error(res, *words):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("rcc: error:")]
    assert line, res.stderr
    for w in words:
        assert w in line[0], line[0]


@pytest.fixture(scope="module")
def released(tmp_path_factory, fixture_dir):
    """The fixture's released-layout weights + a base-model folder with its config and a tiny tokenizer."""
    base = tmp_path_factory.mktemp("base")
    shutil.copy(fixture_dir / "config.json", base / "config.json")
    tiny_tokenizer().save_pretrained(str(base))
    return ["--model", fixture_dir / "model.safetensors", "--base-model", base, "--dtype", "float64"]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny RCC model in our format with a tokenizer."""
    path = tmp_path_factory.mktemp("ours") / "model"
    model = tiny_rcc("llama", window=64, ratio=8)
    model.tokenizer = tiny_tokenizer()
    model.save_pretrained(str(path))
    return path


def test_compress_info_ask_end_to_end_on_the_fixture_model(released, tmp_path):
    out = tmp_path / "doc.rcc"
    res = rcc("compress", *released, "--context", DOC, "-o", out)
    assert res.returncode == 0, res.stderr
    assert "slots" in res.stderr and "peak memory" in res.stderr and out.is_file()
    info = rcc("info", out, "--json")
    meta = json.loads(info.stdout)
    assert info.returncode == 0 and meta["num_slots"] == "64" and meta["window"] == "2048"
    human = rcc("info", out)
    assert "num_tokens" in human.stdout
    res = rcc("ask", *released, "--memory", out, "-q", "Who kept the lamp?", "--max-new-tokens", "8", "--json")
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["mode"] == "manual" and answer["slots"] == 64
    # the same question without the memory file recompresses and must give the same answer
    direct = rcc("ask", *released, "--context", DOC, "-q", "Who kept the lamp?", "--mode", "manual",
                 "--max-new-tokens", "8", "--json")
    assert direct.returncode == 0 and json.loads(direct.stdout)["answer"] == answer["answer"]


def test_ask_reconstruct_from_stdin_and_streaming(released):
    res = rcc("ask", *released, "--context", "-", "-q", "Who?", "--max-new-tokens", "6", "--stream", "--quiet",
              stdin=DOC.read_text())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    res = rcc("ask", *released, "--context", DOC, "-q", "Who?", "--max-new-tokens", "6", "--json")
    data = json.loads(res.stdout)
    assert data["mode"] == "reconstruct" and data["reconstructed_question"] is not None


def test_ask_with_memory_in_reconstruct_mode_extends_the_memory(ours, tmp_path):
    out = tmp_path / "doc.rcc"
    assert rcc("compress", "--model", ours, "--context", DOC, "-o", out).returncode == 0
    res = rcc("ask", "--model", ours, "--memory", out, "-q", "Who?", "--mode", "reconstruct", "--max-new-tokens", "4",
              "--json")
    assert res.returncode == 0, res.stderr
    meta = json.loads(rcc("info", out, "--json").stdout)
    assert json.loads(res.stdout)["slots"] > int(meta["num_slots"])


def test_bad_inputs_are_one_line_errors(released, ours, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_user_error(rcc("ask", *released, "--context", empty, "-q", "x"), "empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"caf\xe9 \xff\xfe")
    assert_user_error(rcc("compress", *released, "--context", binary, "-o", tmp_path / "x.rcc"), "not UTF-8")
    assert not (tmp_path / "x.rcc").exists()
    assert_user_error(rcc("ask", *released, "--context", tmp_path / "nope.txt", "-q", "x"), "no such file")
    # a memory made by another model
    mem = tmp_path / "ours.rcc"
    assert rcc("compress", "--model", ours, "--context", DOC, "-o", mem).returncode == 0
    assert_user_error(rcc("ask", *released, "--memory", mem, "-q", "x"), "another model")
    # truncated memory and truncated weights
    trunc = tmp_path / "trunc.rcc"
    trunc.write_bytes(mem.read_bytes()[:-64])
    assert_user_error(rcc("ask", "--model", ours, "--memory", trunc, "-q", "x"))
    assert_user_error(rcc("info", tmp_path / "missing.rcc"), "no such memory file")
    broken = tmp_path / "broken"
    shutil.copytree(ours, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(rcc("ask", "--model", broken, "--context", DOC, "-q", "x"), "truncated or corrupt")
    assert_user_error(rcc("ask", "--model", tmp_path / "nowhere", "--context", DOC, "-q", "x"))


def test_window_not_divisible_and_absolute_positions_through_the_cli(tmp_path):
    from tests.conftest import tiny_backbone

    backbone = tmp_path / "gpt2"
    tiny_backbone("gpt2").save_pretrained(str(backbone))
    tiny_tokenizer().save_pretrained(str(backbone))
    res = rcc("ask", "--model", backbone, "--window", "100", "--ratio", "32", "--context", DOC, "-q", "x")
    assert_user_error(res, "not divisible")
    out = tmp_path / "x.rcc"
    res = rcc("compress", "--model", backbone, "--window", "32", "--ratio", "4", "--context", DOC, "-o", out)
    assert_user_error(res, "absolute position", "at most about 512 context tokens")
    assert not out.exists() and not list(tmp_path.glob("*.part"))
    short = tmp_path / "short.txt"
    short.write_text("The lamp was lit in 1874.")
    res = rcc("ask", "--model", backbone, "--window", "32", "--ratio", "4", "--context", short, "-q", "When?",
              "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr
    assert "UNTRAINED" in res.stderr


def test_cli_table_is_the_python_api():
    from rcc.cli import COMMANDS, build_parser

    assert {"ask", "compress", "info"} <= set(COMMANDS)
    assert build_parser().parse_args(["info", "x.rcc"]).command == "info"
    torch.manual_seed(0)
