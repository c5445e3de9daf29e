"""`rcc ask / compress / info` end to end from a shell, and bad input through the CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, saved_tiny_rcc, tiny_rcc, tiny_tokenizer

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
    return saved_tiny_rcc(tmp_path_factory.mktemp("ours") / "model")


@pytest.mark.slow  # several `rcc` processes, each importing torch
def test_compress_info_ask_end_to_end_on_the_fixture_model(released, tmp_path):
    out = tmp_path / "doc.rcc"
    res = rcc("compress", *released, "--context", DOC, "-o", out)
    assert res.returncode == 0, res.stderr
    assert "slots" in res.stderr and "peak memory" in res.stderr and out.is_file()
    info = rcc("info", out, "--json")
    meta = json.loads(info.stdout)
    assert info.returncode == 0 and meta["num_slots"] == "64" and meta["window"] == "2048"
    human = rcc("info", out)
    assert human.returncode == 0 and meta["num_tokens"] == str(len(tiny_tokenizer()(DOC.read_text()).input_ids))
    assert {ln.split()[0]: ln.split()[-1] for ln in human.stdout.splitlines() if ln.strip()}["num_tokens"] == \
        meta["num_tokens"]
    res = rcc("ask", *released, "--memory", out, "-q", "Who kept the lamp?", "--max-new-tokens", "8", "--json")
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["mode"] == "manual" and answer["slots"] == 64
    # the same question without the memory file recompresses and must give the same answer
    direct = rcc("ask", *released, "--context", DOC, "-q", "Who kept the lamp?", "--mode", "manual",
                 "--max-new-tokens", "8", "--json")
    assert direct.returncode == 0 and json.loads(direct.stdout)["answer"] == answer["answer"]


@pytest.mark.slow  # several `rcc` processes, each importing torch
def test_ask_reconstruct_from_stdin_and_streaming(released):
    streamed = rcc("ask", *released, "--context", "-", "-q", "Who?", "--max-new-tokens", "6", "--stream", "--quiet",
                   stdin=DOC.read_text())
    assert streamed.returncode == 0, streamed.stderr
    res = rcc("ask", *released, "--context", DOC, "-q", "Who?", "--max-new-tokens", "6", "--json")
    data = json.loads(res.stdout)
    assert data["mode"] == "reconstruct" and data["reconstructed_question"].strip()
    # the same text from stdin, streamed, prints the generation the JSON answer was split from
    text = streamed.stdout.strip()
    assert text.startswith(data["reconstructed_question"].strip()) and data["answer"].strip() in text


@pytest.mark.slow  # several `rcc` processes, each importing torch
def test_ask_with_memory_in_reconstruct_mode_extends_the_memory(ours, tmp_path):
    out = tmp_path / "doc.rcc"
    assert rcc("compress", "--model", ours, "--context", DOC, "-o", out).returncode == 0
    res = rcc("ask", "--model", ours, "--memory", out, "-q", "Who?", "--mode", "reconstruct", "--max-new-tokens", "4",
              "--json")
    assert res.returncode == 0, res.stderr
    meta = json.loads(rcc("info", out, "--json").stdout)
    # the question (shorter than a window) is compressed into one more window: 64 / 8 slots
    assert json.loads(res.stdout)["slots"] == int(meta["num_slots"]) + 8


@pytest.mark.slow  # several `rcc` processes, each importing torch
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


@pytest.mark.slow  # several `rcc` processes, each importing torch
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


# options that only shape what the CLI prints
PRESENTATION = {"json", "quiet", "stream", "no_plot", "print_config"}


def _options(add_args) -> dict[str, set[str]]:
    """``{subcommand: option dests}`` that ``add_args`` defines (``{"": ...}`` without
    subcommands), read from the actions ``add_argument`` returns."""
    import argparse

    found: dict[str, set[str]] = {}

    def recording(parser, key):
        add = parser.add_argument
        parser.add_argument = lambda *a, **k: found.setdefault(key, set()).add(add(*a, **k).dest)
        subparsers = parser.add_subparsers

        def add_subparsers(**kw):
            group = subparsers(**kw)
            add_parser = group.add_parser
            group.add_parser = lambda name, **k: recording(add_parser(name, **k), name)
            return group

        parser.add_subparsers = add_subparsers
        return parser

    add_args(recording(argparse.ArgumentParser(), ""))
    return found if set(found) == {""} else {k: v for k, v in found.items() if k}


def _resolve(target: str):
    import importlib

    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _parameters(obj) -> set[str]:
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(obj):
        return {f.name for f in dataclasses.fields(obj)}
    if inspect.isclass(obj):  # e.g. transformers.GenerationConfig: the attributes an instance has
        return set(vars(obj()))
    return set(inspect.signature(obj).parameters) - {"self", "args", "kwargs"}


def _unmapped(cmd) -> list[str]:
    params = set().union(*(_parameters(_resolve(t)) for t in cmd.api))
    return sorted(f"{sub} {d}".strip() for sub, dests in _options(cmd.add_args).items()
                  for d in dests - PRESENTATION if cmd.aliases.get(d, d) not in params)


def test_cli_table_is_the_python_api():
    """Every command names the public, documented functions it calls, and every option
    of the command is a parameter of one of them (directly or through a declared alias)."""
    from rcc.cli.commands import COMMANDS, Command, build_parser

    assert set(COMMANDS) == {"ask", "compress", "info", "train", "prepare-data", "synth", "eval", "bench", "bench-train",
                             "serve", "export-vllm", "lm-eval"}
    assert build_parser().parse_args(["info", "x.rcc"]).command == "info"
    for name, cmd in COMMANDS.items():
        params = set()
        for target in cmd.api:
            obj = _resolve(target)
            assert not target.rpartition(":")[2].split(".")[-1].startswith("_"), target
            if target.startswith("rcc"):
                assert (obj.__doc__ or "").strip(), f"{target} has no docstring"
            params |= _parameters(obj)
        for alias, param in cmd.aliases.items():
            assert param in params, f"{name}: alias {alias} -> {param}, which none of {cmd.api} takes"
        assert _options(cmd.add_args), name
        assert not _unmapped(cmd), f"rcc {name}: options {_unmapped(cmd)} are no parameter of {cmd.api}"
    # the check can fail: an option no function takes is caught
    ask = COMMANDS["ask"]

    def more(p):
        ask.add_args(p)
        p.add_argument("--frobnicate")

    assert _unmapped(Command(ask.run, more, ask.help, ask.api, ask.aliases)) == ["frobnicate"]
    assert "eval" in COMMANDS and set(_options(COMMANDS["eval"].add_args)) == {"passkey", "needle", "niah", "reconstruct", "qa"}


def test_generation_options_become_generate_arguments():
    """The library half of `rcc ask`'s options (rcc/generation.py): checked, then generate's names."""
    from rcc.errors import RCCError
    from rcc.generation import generation_options

    assert generation_options() == {"max_new_tokens": 128}
    assert generation_options(top_p=0.9, stop=["\n"], repetition_penalty=1.1) == {
        "max_new_tokens": 128, "do_sample": True, "top_p": 0.9, "repetition_penalty": 1.1, "stop_strings": ["\n"]}
    with pytest.raises(RCCError, match="--top-k -1"):
        generation_options(top_k=-1)


def test_bench_train_is_routed_to_its_command():
    from rcc.cli.commands import route

    assert route(["-v", "bench", "train", "c.yaml"]) == ["-v", "bench-train", "c.yaml"]
    assert route(["bench", "--lengths", "2k"]) == ["bench", "--lengths", "2k"]
    assert route(["ask", "-q", "bench"]) == ["ask", "-q", "bench"]


# ------------------------------------------------ reliability audit (issue 12)
@pytest.mark.slow  # several `rcc` processes, each importing torch
def test_unwritable_output_is_refused_before_anything_is_loaded(tmp_path):
    """Defect 2: found only after the whole compression, then a traceback. The model
    path does not exist, so any message but the output's proves the order."""
    (tmp_path / "file.txt").write_text("x")
    unwritable = "/proc/rcc-test/doc.rcc" if os.geteuid() == 0 else tmp_path / "ro" / "doc.rcc"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
    for out, words in [(tmp_path, "is a folder"), (tmp_path / "file.txt" / "doc.rcc", "is a file"),
                       (unwritable, "cannot write in the folder")]:
        res = rcc("compress", "--model", tmp_path / "nowhere", "--context", DOC, "-o", out)
        assert_user_error(res, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file.txt"] + (["ro"] if os.geteuid() else []))


BAD_OPTIONS = [
    (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 1"),
    (["--temperature", "-1"], "--temperature -1.0: must be a positive"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--top-k", "-2"], "--top-k -2"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0"),
    (["--stop", ""], "--stop"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--window-batch-size", "0"], "--window-batch-size 0"),
]


@pytest.mark.slow  # several `rcc` processes, each importing torch
def test_bad_generation_options_are_refused_before_the_model_loads(tmp_path, capsys):
    """Defect 3: tracebacks after the model had loaded. The model path does not exist,
    so any other message proves the order. Two cases go through a real process; the
    rest through the same entry, `main`, in this one (a process each costs seconds)."""
    from rcc.cli import main

    res = rcc("ask", "--model", tmp_path / "nowhere", "--context", DOC, "-q", "Who?", "--max-new-tokens", "0")
    assert_user_error(res, "--max-new-tokens 0: must be at least 1")
    res = rcc("compress", "--model", tmp_path / "nowhere", "--context", DOC, "-o", tmp_path / "x.rcc",
              "--device", "tpu")
    assert_user_error(res, "--device tpu: not a device")
    for argv, words in BAD_OPTIONS:
        assert main(["ask", "--model", str(tmp_path / "nowhere"), "--context", str(DOC), "-q", "Who?", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rcc: error: ") and words in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "x.rcc").exists()


def test_eval_checks_the_shared_options_too(tmp_path, capsys):
    from rcc.cli import main

    assert main(["eval", "passkey", "--model", str(tmp_path / "nowhere"), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0: must be at least 1" in capsys.readouterr().err


@pytest.mark.slow  # several `rcc` processes, each importing torch
def test_info_says_a_memory_file_is_damaged(ours, tmp_path):
    """Defect 5: `rcc info` on a truncated file exited 0 with normal metadata (and
    defect 4 through the CLI: a changed num_slots was accepted)."""
    mem = tmp_path / "m.rcc"
    assert rcc("compress", "--model", ours, "--context", DOC, "-o", mem, "--quiet").returncode == 0
    data = mem.read_bytes()
    (tmp_path / "cut.rcc").write_bytes(data[: len(data) * 2 // 3])
    assert_user_error(rcc("info", tmp_path / "cut.rcc"), "incomplete", str(len(data)))
    assert_user_error(rcc("info", tmp_path / "cut.rcc", "--json"), "incomplete")
    changed = tmp_path / "changed.rcc"
    changed.write_bytes(data.replace(b'"num_slots":"88"', b'"num_slots":"96"', 1))
    assert changed.read_bytes() != data
    assert_user_error(rcc("info", changed), "checksum")
    assert_user_error(rcc("ask", "--model", ours, "--memory", changed, "-q", "x"), "checksum")


@pytest.mark.slow  # several `rcc` processes, each importing torch
def test_compress_announces_the_file_size_and_stores_bfloat16(ours, tmp_path):
    """The audit's last paragraph: the size before writing; bf16/fp16 storage."""
    from rcc.memory import format_bytes

    sizes = {}
    for dtype in (None, "bfloat16", "float16"):
        out = tmp_path / f"{dtype}.rcc"
        res = rcc("compress", "--model", ours, "--context", DOC, "-o", out, *(["--storage-dtype", dtype] if dtype else []))
        assert res.returncode == 0, res.stderr
        data = out.read_bytes()
        payload = len(data) - 8 - int.from_bytes(data[:8], "little")
        per_slot = payload // 88  # 700 tokens = 11 windows of 64 at ratio 8
        name = dtype or "float32"
        said = f"will take {format_bytes(payload)} ({format_bytes(per_slot)} per slot x 88 slots, {name})"
        assert said in res.stderr, res.stderr
        before, after = res.stderr.index("will take"), res.stderr.index("peak memory")
        assert before < after  # said before the compression ran
        assert ("bfloat16 halves it" in res.stderr) == (dtype is None)
        info = json.loads(rcc("info", out, "--json").stdout)
        assert info["dtype"] == name and info["bytes"] == len(data)
        assert f"dtype         {name}" in rcc("info", out).stdout
        sizes[name] = payload
    assert sizes["bfloat16"] == sizes["float16"] == sizes["float32"] // 2
    res = rcc("ask", "--model", ours, "--memory", tmp_path / "bfloat16.rcc", "-q", "Who?", "--max-new-tokens", "3",
              "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["slots"] == 88


def test_ctrl_c_during_the_first_imports_is_one_line(ours, tmp_path):
    """Defect 8: Ctrl-C in the first seconds printed a traceback. The child runs the
    console entry as installed (`from rcc.cli import main`); the interrupt is sent
    once `main` runs and has begun to import torch (which takes seconds)."""
    import signal
    import subprocess as sp

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    entry = "import sys; from rcc.cli import main; sys.exit(main())"
    proc = sp.Popen([sys.executable, "-X", "importtime", "-c", entry, "compress", "--model", ours, "--context", DOC,
                     "-o", tmp_path / "x.rcc"], stderr=sp.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:  # importtime prints a module when its import ends
        seen.append(line)
        module = line.rsplit("|", 1)[-1].strip()
        if module.startswith("torch.") and any(ln.rstrip().endswith("| rcc.cli") for ln in seen):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "Traceback" not in rest, rest
    assert [ln for ln in rest.splitlines() if not ln.startswith("import time:")] == ["rcc: interrupted"], rest
    assert not (tmp_path / "x.rcc").exists()


@pytest.fixture(scope="module")
def short_positions(tmp_path_factory):
    """A tiny RCC model whose rotary decoder was 'trained' on 160 positions."""
    path = tmp_path_factory.mktemp("short") / "model"
    model = tiny_rcc("llama", window=64, ratio=8, max_position_embeddings=160)
    model.tokenizer = tiny_tokenizer()
    model.save_pretrained(str(path))
    return path


@pytest.mark.slow  # several `rcc` processes, each importing torch
def test_the_rotary_warning_is_given_once_about_positions_used(short_positions, tmp_path):
    """Defect 8: the warning printed twice and counted the unused max_new_tokens budget."""
    import re

    def warnings(res):
        assert res.returncode == 0, res.stderr
        return [ln for ln in res.stderr.splitlines() if "decoder positions" in ln]

    twice = tmp_path / "twice.txt"
    twice.write_text(DOC.read_text() * 2)  # 1400 tokens: 176 slots, beyond 160
    res = rcc("compress", "--model", short_positions, "--context", twice, "-o", tmp_path / "long.rcc")
    assert len(warnings(res)) == 1 and "the slots span 176 decoder positions" in warnings(res)[0]
    res = rcc("ask", "--model", short_positions, "--context", twice, "-q", "Who?", "--mode", "manual",
              "--max-new-tokens", "3")
    assert len(warnings(res)) == 1
    # 88 slots + the prompt (51 tokens) fit in 160; only a long answer would not, and the warning says so
    mem = tmp_path / "doc.rcc"
    assert rcc("compress", "--model", short_positions, "--context", DOC, "-o", mem, "--quiet").returncode == 0
    res = rcc("ask", "--model", short_positions, "--memory", mem, "-q", "Who?", "--max-new-tokens", "60")
    (line,) = warnings(res)
    used = int(re.search(r"slots \+ prompt span (\d+) of the 160", line).group(1))
    assert 88 < used < 160 and f"longer than {160 - used} tokens (of up to 60)" in line
    res = rcc("ask", "--model", short_positions, "--memory", mem, "-q", "Who?", "--max-new-tokens", "3")
    assert warnings(res) == []  # 3 new tokens stay within 160: nothing to say


def test_append_and_ask_over_several_memories(short_positions, tmp_path, capsys):
    """`rcc compress --append-to` and `rcc ask --memory A --memory B` give what the Python API
    gives (compress with prefix, combine); memories that cannot be read together exit 2
    with one line, before any work."""
    import torch

    from rcc.cli import main
    from rcc.loading import load_model

    text = DOC.read_text()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[: len(text) // 2])
    b.write_text(text[len(text) // 2 :])
    m = ["--model", short_positions, "--dtype", "float32", "--quiet"]
    assert main(["compress", str(a), "-o", str(tmp_path / "a.rcc"), *map(str, m)]) == 0
    assert main(["compress", str(b), "-o", str(tmp_path / "b.rcc"), *map(str, m)]) == 0
    assert main(["compress", str(b), "--append-to", str(tmp_path / "a.rcc"), "-o", str(tmp_path / "ab.rcc"),
                 *map(str, m)]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ab.rcc"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = load_model(str(short_positions), dtype=torch.float32, device="cpu")
    tok = model.tokenizer
    ma, mb = (model.compress(tok(p.read_text(), add_special_tokens=False, return_tensors="pt").input_ids)
              for p in (a, b))
    assert info["parents"] == [ma.content_hash] and info["slot_inputs"] is True
    assert info["segments"] == [ma.num_tokens, mb.num_tokens] and int(info["num_slots"]) == ma.num_slots + mb.num_slots

    def cli_answer(*memories):
        args = ["ask", *[x for p in memories for x in ("--memory", str(tmp_path / p))], "-q", "Who?", "--json",
                "--max-new-tokens", "6", *map(str, m)]
        assert main(args) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])

    capsys.readouterr()
    both = cli_answer("a.rcc", "b.rcc")
    ref = model.ask([ma, mb], "Who?", max_new_tokens=6)
    assert (both["answer"], both["slots"]) == (ref.answer, ma.num_slots + mb.num_slots)
    assert cli_answer("ab.rcc") == both  # an append is the two memories read together
    assert cli_answer("b.rcc", "a.rcc")["slots"] == both["slots"]

    def refused(args, *words):
        capsys.readouterr()
        assert main(args) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rcc: error:")]
        assert len(err) == 1 and all(w in err[0] for w in words), err

    assert main(["compress", str(b), "--no-slots", "-o", str(tmp_path / "bare.rcc"), *map(str, m)]) == 0
    refused(["ask", "--memory", str(tmp_path / "a.rcc"), "--memory", str(tmp_path / "bare.rcc"), "-q", "Who?",
             *map(str, m)], "bare.rcc holds no slot inputs")
    # 160 positions: this many copies of a hold more slots than that
    n = 160 // ma.num_slots + 1
    refused(["ask", *["--memory", str(tmp_path / "a.rcc")] * n, "-q", "Who?", *map(str, m)],
            f"the {n} memories hold {n * ma.num_slots} slots", "160 positions")
    (tmp_path / "big.txt").write_text(text * 2)  # 176 slots: compressed with a warning, appended to: refused
    assert main(["compress", str(tmp_path / "big.txt"), "-o", str(tmp_path / "big.rcc"), *map(str, m)]) == 0
    refused(["compress", str(a), "--append-to", str(tmp_path / "big.rcc"), "-o", str(tmp_path / "x.rcc"),
             *map(str, m)], "160 positions")
    assert not (tmp_path / "x.rcc").exists()
    refused(["compress", str(a), "--context", str(b), "-o", str(tmp_path / "x.rcc")], "give the text to compress once")
