"""``rcc``: a thin command line over the Python API.

Each command is a plain function taking parsed arguments; ``COMMANDS`` maps
names to (function, argument builder, help, the Python API it calls). The
commands that are features of their own (eval, bench, synth, prepare-data)
define their options in their module (``add_arguments``). User mistakes
(:class:`RCCError`, bad files) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .errors import RCCError
from .io import peak_memory_mib, read_text
from .loading import DTYPES, load_from_args, resolve_device, resolve_dtype  # noqa: F401  (DTYPES: its old home)

log = logging.getLogger("rcc")


# ---------------------------------------------------------------- helpers
def _lazy(target: str) -> Callable:
    """``"module:function"``, imported when called: only the command that runs imports its module."""
    module, _, name = target.partition(":")
    return lambda *args: getattr(importlib.import_module(module), name)(*args)


def _compress(model, device: str, ids, batch: int, prefix=None, quiet: bool = False):
    from tqdm.auto import tqdm

    n_windows = model.config.slots_for(ids.shape[-1]) // model.config.slots_per_window
    bar = tqdm(total=n_windows, unit="win", desc="compressing", disable=quiet or n_windows < 2, file=sys.stderr)
    last = [0]

    def progress(done: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    t = time.perf_counter()
    try:  # compress() checks the positions (refusal or one warning) before any work
        memory = model.compress(ids, window_batch_size=batch, progress=progress, prefix=prefix)
    finally:
        bar.close()
    secs = time.perf_counter() - t
    if not quiet:
        print(
            f"rcc: {ids.shape[-1]} tokens -> {memory.num_slots} slots ({n_windows} windows of "
            f"{model.config.window}, ratio {model.config.ratio}) in {secs:.2f} s, peak memory "
            f"{peak_memory_mib(device):.0f} MiB",
            file=sys.stderr,
        )
    return memory


def _check_args(args) -> None:
    """Options every command shares, checked before any command does work (and before
    the slow model load): the device, window batch size, generation options.

    Raises:
        RCCError: on the first bad option.
    """
    from .generation import options_from_args
    from .loading import check_model_arguments

    check_model_arguments(args)
    options_from_args(args)


# --------------------------------------------------------------- commands
def cmd_ask(args) -> int:
    """Answer a question about a context (text file, stdin, or a saved memory)."""
    import torch

    from .ask import ask
    from .generation import options_from_args
    from .memory import CompressedContext

    if (args.context is None) == (args.memory is None):
        raise RCCError("give exactly one of --context FILE|- and --memory FILE.rcc")
    if not args.question.strip():
        raise RCCError("--question is empty")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    context = read_text(args.context) if args.context is not None else CompressedContext.load(args.memory)
    model, device = load_from_args(args)
    if model.tokenizer is None:
        raise RCCError(f"{args.model} has no tokenizer; pass --base-model with a tokenizer")
    opts = options_from_args(args)
    if args.stream:
        from transformers import TextStreamer

        opts["streamer"] = TextStreamer(model.tokenizer, skip_prompt=True)
    answer = ask(model, context, args.question, mode=args.mode, **opts,
                 compress=lambda ids, prefix: _compress(model, device, ids, args.window_batch_size, prefix, args.quiet))
    if args.json:
        print(json.dumps({"answer": answer.answer, "reconstructed_question": answer.reconstructed_question,
                          "mode": answer.mode, "slots": answer.num_slots}))
    elif not args.stream:
        if answer.reconstructed_question is not None and not args.quiet:
            print(f"question (reconstructed): {answer.reconstructed_question}", file=sys.stderr)
        print(answer.answer)
    else:
        print()
    return 0


def cmd_compress(args) -> int:
    """Compress a context once into a memory file for later questions."""
    import shutil

    from .memory import STORAGE_DTYPES, check_writable, dtype_name, format_bytes

    output = check_writable(args.output)  # before the slow part, not after it
    context = read_text(args.context)
    model, device = load_from_args(args)
    if model.tokenizer is None:
        raise RCCError(f"{args.model} has no tokenizer; pass --base-model with a tokenizer")
    ids = model.tokenizer(context, add_special_tokens=False, return_tensors="pt").input_ids
    storage = STORAGE_DTYPES[args.storage_dtype] if args.storage_dtype else model.dtype
    slots = model.config.slots_for(ids.shape[-1])
    per_slot = model.kv_bytes_per_slot(storage)
    size = per_slot * slots
    if not args.quiet:
        hint = "; --storage-dtype bfloat16 halves it" if storage.itemsize > 2 and not args.storage_dtype else ""
        print(f"rcc: the memory file will take {format_bytes(size)} ({format_bytes(per_slot)} per slot x {slots} "
              f"slots, {dtype_name(storage)}){hint}", file=sys.stderr)
    folder = output.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if size > free:
        raise RCCError(f"{output}: the memory file needs {format_bytes(size)} but {folder} has {format_bytes(free)} "
                       "free; free some space, choose another -o, or use --storage-dtype bfloat16")
    memory = _compress(model, device, ids, args.window_batch_size, quiet=args.quiet)
    memory.save(output, dtype=storage)
    print(f"rcc: wrote {output} ({format_bytes(output.stat().st_size)})", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    """Print a memory file's metadata (checked, without loading its tensors; a damaged file is an
    error), or with ``--system`` this machine: CPU, threads and what ``--dtype auto`` picks and why."""
    from .memory import read_memory_metadata

    if args.system and args.memory is not None:
        raise RCCError("give a memory file (rcc info doc.rcc) or --system, not both")
    if not args.system and args.memory is None:
        raise RCCError("give a memory file (rcc info doc.rcc), or --system for this machine")
    if args.system:
        from .precision import describe

        info = describe(resolve_device(args.device))
        if args.json:
            print(json.dumps(info))
        else:
            for k, v in info.items():
                print(f"{k:17s} {', '.join(map(str, v)) if isinstance(v, list) else v}")
        return 0
    meta = read_memory_metadata(args.memory)
    for key in ("tensors_sha256", "metadata_sha256"):
        meta.pop(key, None)
    size = Path(args.memory).stat().st_size
    if args.json:
        print(json.dumps({**meta, "bytes": size}))
    else:
        for k in ("num_tokens", "num_slots", "window", "ratio", "layers", "dtype", "model_id", "content_hash",
                  "format"):
            print(f"{k:13s} {meta.get(k)}")
        print(f"{'size':13s} {size / 2**20:.2f} MiB")
    return 0


def cmd_train(args) -> int:
    """Train an RCC model from a YAML config (+ KEY=VALUE overrides); see docs/training.md."""
    import os

    from tqdm.contrib.logging import logging_redirect_tqdm

    from .train import print_config, train

    if args.print_config:
        print(print_config(args.config, args.overrides))
        return 0
    loggers = [logging.getLogger(name) for name in ("rcc.train", "rcc.data")]
    levels = [lg.level for lg in loggers]
    if os.environ.get("RANK", "0") == "0":  # progress and evaluation lines from the main process only
        for lg in loggers:
            lg.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm():
            result = train(args.config, args.overrides)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    if result.is_main:
        print(f"rcc: trained {result.step} steps; model saved to {result.final_dir}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    """Measure RCC against its uncompressed backbone: memory, compression time, TTFT, decode speed."""
    from .bench import command

    device = resolve_device(args.device)
    return command(args, device, str(resolve_dtype(args.dtype, device)).replace("torch.", ""))


# ------------------------------------------------------------------ parser
_model_args = _lazy("rcc.loading:add_model_arguments")


def _ask_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--context", help="text file, or - for standard input")
    p.add_argument("--memory", help="a memory file from `rcc compress` instead of --context")
    p.add_argument("--question", "-q", required=True)
    p.add_argument("--mode", choices=("reconstruct", "manual"),
                   help="instruction mode (default: manual with --memory, else the model's own: "
                        "reconstruct, or manual for a model fine-tuned in manual mode only)")
    _lazy("rcc.generation:add_arguments")(p)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print a JSON object")


def _compress_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--context", required=True, help="text file, or - for standard input")
    p.add_argument("-o", "--output", required=True, help="memory file to write (e.g. doc.rcc)")
    p.add_argument("--storage-dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved keys and values (default: the model's, exact); bfloat16 or float16 "
                        "halve a float32 file, and `rcc ask` casts them back to the model's dtype")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", nargs="?", help="a memory file from `rcc compress`")
    p.add_argument("--system", action="store_true",
                   help="instead: this machine's CPU, threads, and the dtype --dtype auto picks here and why")
    p.add_argument("--device", default="auto", help="with --system: also the auto dtype of this device")
    p.add_argument("--json", action="store_true")


def cmd_lm_eval(args) -> int:
    """lm-evaluation-harness's command line with ``--model rcc`` registered (rcc/lm_eval.py)."""
    try:
        from .lm_eval import main
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "lm_eval":
            raise
        raise RCCError("rcc lm-eval needs lm-evaluation-harness: pip install 'rcc-llm[eval]'") from None
    return main(args.args)


def _lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS",
                   help="lm-eval's own options, passed through: --model rcc --model_args model=rcc-smollm2-135m,"
                        "split=Question: --tasks TASK [--include_path DIR] ... (see rcc/lm_eval.py)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML training config (see configs/ and docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config options, e.g. optim.max_steps=100 optim.lr=3e-4 run.output_dir=runs/x "
                        "model.backbone.hidden_size=32")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


class Command(NamedTuple):
    """A subcommand: ``run(args) -> exit status``, ``add_args(parser)``, its help, and the
    public Python API it calls (``"module:name"``), whose parameters its options are
    (``aliases``: option -> parameter where the names differ; tests/test_cli.py checks)."""

    run: Callable
    add_args: Callable
    help: str
    api: tuple[str, ...]
    aliases: dict[str, str] = {}


_MODEL_API, _MODEL_ALIASES = ("rcc.loading:load_model",), {"model": "spec"}
COMMANDS: dict[str, Command] = {
    "ask": Command(cmd_ask, _ask_args, "answer a question about a long context",
                   ("rcc.ask:ask", "rcc.generation:generation_options", "torch:manual_seed", *_MODEL_API),
                   {**_MODEL_ALIASES, "memory": "context"}),
    "compress": Command(cmd_compress, _compress_args, "compress a context into a reusable memory file",
                        ("rcc.io:read_text", "rcc.model:RCCModel.compress", "rcc.memory:CompressedContext.save",
                         *_MODEL_API),
                        {**_MODEL_ALIASES, "context": "path", "output": "path", "storage_dtype": "dtype"}),
    "info": Command(cmd_info, _info_args, "show a memory file's metadata, or this machine's (--system)",
                    ("rcc.memory:read_memory_metadata", "rcc.precision:describe"), {"memory": "path", "system": "device"}),
    "train": Command(cmd_train, _train_args, "train an RCC model (compression pretraining or instruction fine-tuning)",
                     ("rcc.train:train", "rcc.train:print_config")),
    "prepare-data": Command(_lazy("rcc.data.tokens:command"), _lazy("rcc.data.tokens:add_arguments"),
                            "tokenize a corpus into a memory-mapped token folder",
                            ("rcc.data:prepare_data", "rcc.data:load_tokenizer"),
                            {"tokenizer": "spec", "no_eos": "append_eos", "quiet": "progress"}),
    "synth": Command(_lazy("rcc.synth:command"), _lazy("rcc.synth:add_arguments"),
                     "build synthetic pass-key / needle / extract records from prose",
                     ("rcc.synth:read_prose", "rcc.synth:make_records", "rcc.synth:write_records",
                      "rcc.data:load_tokenizer"), {"kinds": "weights", "output": "path", "tokenizer": "spec"}),
    "eval": Command(lambda args: _lazy("rcc.eval.runner:command")(args, load_from_args),
                    _lazy("rcc.eval.config:add_arguments"),
                    "evaluate: passkey, needle, reconstruct or qa, with --baseline for the baselines",
                    ("rcc.eval:run_eval", "rcc.eval:EvalConfig", "rcc.eval.plot:plot_result", *_MODEL_API),
                    {**_MODEL_ALIASES, "baseline": "baselines", "plot": "path"}),
    "bench": Command(cmd_bench, _lazy("rcc.bench:add_arguments"),
                     "memory and speed of RCC against the uncompressed backbone "
                     "(`rcc bench train CONFIG`: training speed)",
                     ("rcc.bench:run_bench", "rcc.bench:BenchConfig", "rcc.eval.plot:bench_memory"),
                     {"timeout": "timeout_s", "plot": "path", "dtype": "dtypes"}),
    "bench-train": Command(_lazy("rcc.bench_train:cmd"), _lazy("rcc.bench_train:add_args"),
                           "training speed of a config: tokens/s, step split, memory, MFU (also `rcc bench train`)",
                           ("rcc.bench_train:run", "rcc.io:write_json"), {"legacy": "legacy_overrides", "output": "path"}),
    "lm-eval": Command(cmd_lm_eval, _lm_eval_args,
                       "run lm-evaluation-harness tasks on RCC (--model rcc; needs the eval extra)",
                       ("rcc.lm_eval:main",), {"args": "argv"}),
    "serve": Command(_lazy("rcc.serve.command:cmd_serve"), _lazy("rcc.serve.command:serve_args"),
                     "serve compressed contexts over HTTP (OpenAI-compatible; needs the serve extra)",
                     ("rcc.serve:ServeConfig",), {"api_key_file": "api_key"}),
    "export-vllm": Command(_lazy("rcc.vllm.export:cmd_export"), _lazy("rcc.vllm.export:export_args"),
                           "write a model's decoder as a folder `vllm serve` runs (the RCC vLLM plugin)",
                           ("rcc.vllm.export:export_decoder", *_MODEL_API), {**_MODEL_ALIASES, "output": "path"}),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``rcc`` parser; with ``only`` (a command's name), only that command's options are
    added (the others are listed, with no options): adding a command's options imports its
    module, and a run needs just its own (``rcc info`` then imports neither FastAPI nor vLLM's glue)."""
    from . import __version__

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
        # `rcc bench train CONFIG` is bench-train (rcc/bench_train.py)
        argv = _lazy("rcc.bench_train:route")(argv)
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
        _check_args(args)
        return COMMANDS[args.command][0](args) or 0
    except RCCError as err:
        print(f"rcc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
