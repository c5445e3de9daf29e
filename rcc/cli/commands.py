"""``rcc``: a thin command line over the Python API.

Each command is a plain function ``cmd_NAME(args) -> exit status`` beside its
options ``NAME_args(parser)``, in one module of :mod:`rcc.cli` per area (ask,
data, train, eval, bench, serve); ``COMMANDS`` maps names to them, their help,
and the Python API they call. Only the running command's module is imported.
User mistakes (:class:`RCCError`, bad files) print one line and exit 2, never a
traceback. This package is the only one that parses arguments; nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import NamedTuple

from rcc.errors import RCCError

log = logging.getLogger("rcc")


def _lazy(target: str) -> Callable:
    """``"module:function"``, imported when called: only the command that runs imports its module."""
    module, _, name = target.partition(":")
    return lambda *args: getattr(importlib.import_module(module), name)(*args)


class Command(NamedTuple):
    """A subcommand: ``run(args) -> exit status``, ``add_args(parser)``, its help, and the
    public Python API it calls (``"module:name"``), whose parameters its options are
    (``aliases``: option -> parameter where the names differ; tests/cli/test_cli.py checks)."""

    run: Callable
    add_args: Callable
    help: str
    api: tuple[str, ...]
    aliases: dict[str, str] = {}


def _command(module: str, name: str, *rest) -> Command:
    """The :class:`Command` of ``rcc.cli.MODULE``'s ``cmd_NAME`` and ``NAME_args``."""
    return Command(_lazy(f"rcc.cli.{module}:cmd_{name}"), _lazy(f"rcc.cli.{module}:{name}_args"), *rest)


_MODEL_API, _MODEL_ALIASES = ("rcc.loading:load_model",), {"model": "spec"}
COMMANDS: dict[str, Command] = {
    "ask": _command("ask", "ask", "answer a question about a long context",
                    ("rcc.ask:ask", "rcc.generation:generation_options", "torch:manual_seed", *_MODEL_API),
                    {**_MODEL_ALIASES, "memory": "context"}),
    "compress": _command("ask", "compress", "compress a context into a reusable memory file",
                         ("rcc.files:read_text", "rcc.model:RCCModel.compress", "rcc.memory:CompressedContext.save",
                          *_MODEL_API),
                         {**_MODEL_ALIASES, "text": "path", "context": "path", "output": "path", "storage_dtype": "dtype",
                          "append_to": "prefix", "no_slots": "keep_slots"}),
    "info": _command("ask", "info", "show a memory file's metadata, or this machine's (--system)",
                     ("rcc.memory:read_memory_metadata", "rcc.precision:describe"), {"memory": "path", "system": "device"}),
    "train": _command("train", "train", "train an RCC model (compression pretraining or instruction fine-tuning)",
                      ("rcc.train:train", "rcc.train:print_config")),
    "prepare-data": _command("data", "prepare_data", "tokenize a corpus into a memory-mapped token folder",
                             ("rcc.data:prepare_data", "rcc.data:load_tokenizer"),
                             {"tokenizer": "spec", "no_eos": "append_eos", "quiet": "progress"}),
    "synth": _command("data", "synth", "build synthetic pass-key / needle / extract / copy records from prose",
                      ("rcc.data.synth:read_prose", "rcc.data.synth:make_records", "rcc.data.synth:write_records",
                       "rcc.data:load_tokenizer"), {"kinds": "weights", "output": "path", "tokenizer": "spec"}),
    "eval": _command("eval", "eval", "evaluate: passkey, needle, niah, reconstruct or qa, with --baseline for the baselines",
                     ("rcc.eval:run_eval", "rcc.eval:EvalConfig", "rcc.eval.plot:plot_result", *_MODEL_API),
                     {**_MODEL_ALIASES, "baseline": "baselines", "plot": "path"}),
    "bench": _command("bench", "bench", "memory and speed of RCC against the uncompressed backbone "
                      "(`rcc bench train CONFIG`: training speed)",
                      ("rcc.bench.memory:run_bench", "rcc.bench.memory:BenchConfig", "rcc.bench.plot:bench_memory"),
                      {"timeout": "timeout_s", "plot": "path", "dtype": "dtypes"}),
    "bench-train": _command("bench", "bench_train",
                            "training speed of a config: tokens/s, step split, memory, MFU (also `rcc bench train`)",
                            ("rcc.bench.train:run", "rcc.files:write_json"), {"output": "path"}),
    "lm-eval": _command("eval", "lm_eval", "run lm-evaluation-harness tasks on RCC (--model rcc; needs the eval extra)",
                        ("rcc.eval.harness:main",), {"args": "argv"}),
    "serve": _command("serve", "serve", "serve compressed contexts over HTTP (OpenAI-compatible; needs the serve extra)",
                      ("rcc.serve:ServeConfig",), {"api_key_file": "api_key"}),
    "export-vllm": _command("serve", "export",
                            "write a model's decoder as a folder `vllm serve` runs (the RCC vLLM plugin)",
                            ("rcc.vllm.export:export_decoder", *_MODEL_API), {**_MODEL_ALIASES, "output": "path"}),
}


def route(argv: list[str]) -> list[str]:
    """The ``rcc`` command line with ``bench train`` (the first words that are no
    option) spelled as its command, ``bench-train``; any other line as it is."""
    argv = list(argv)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if argv[at : at + 2] == ["bench", "train"]:
        argv[at : at + 2] = ["bench-train"]
    return argv


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``rcc`` parser; with ``only`` (a command's name), only that command's options are
    added (the others are listed, with no options): adding a command's options imports its
    module, and a run needs just its own (``rcc info`` then imports neither FastAPI nor vLLM's glue)."""
    from rcc import __version__

    parser = argparse.ArgumentParser(prog="rcc", description="Recurrent Context Compression for LLMs")
    parser.add_argument("--version", action="version", version=f"rcc-llm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if only is None or name == only:
            cmd.add_args(p)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command ``argv`` runs (its first word that is no option), if it is one of :data:`COMMANDS`."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """The ``rcc`` console entry: Ctrl-C at any point, the first seconds of imports
    included, exits 130 with one line (``rcc/__init__`` imports nothing heavy)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("rcc: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own options (argparse's REMAINDER stops at the first "--x")
        parser = build_parser("lm-eval")
        args = parser.parse_args(argv[:1])
        args.args = argv[1:]
    else:
        argv = route(argv)
        parser = build_parser(_command_of(argv))
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="rcc: %(levelname)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        _lazy("rcc.cli.common:check_common_args")(args)
        return COMMANDS[args.command][0](args) or 0
    except RCCError as err:
        print(f"rcc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
