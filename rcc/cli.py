"""``rcc``: a thin command line over the Python API.

Each command is a plain function taking parsed arguments; ``COMMANDS`` maps
names to (function, argument builder). User mistakes (:class:`RCCError`, bad
files) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import RCCError

log = logging.getLogger("rcc")

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


# ---------------------------------------------------------------- helpers
def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RCCError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return name


def read_text(path: str) -> str:
    """Read a UTF-8 text file, or standard input for ``-``.

    Raises:
        RCCError: when missing, not UTF-8, or empty.
    """
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise RCCError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RCCError(f"{path}: is a folder, give a text file") from None
    except OSError as err:
        raise RCCError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        name = "standard input" if path == "-" else path
        raise RCCError(f"{name}: not UTF-8 text (bad byte at offset {err.start}); convert it to UTF-8 first") from None
    if not text.strip():
        raise RCCError(f"{'standard input' if path == '-' else path}: the context is empty; give some text to compress")
    return text


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(args):
    from .checkpoint import load_model

    device = _device(args.device)
    model = load_model(args.model, base_model=args.base_model, dtype=_dtype(args.dtype, device),
                       device=device, window=args.window, ratio=args.ratio)
    if not model.config.trained:
        print(
            f"rcc: warning: {args.model} gives an UNTRAINED RCC model (fresh G and A_i); its answers are "
            "meaningless until it is trained with `rcc train`",
            file=sys.stderr,
        )
    return model, device


def _compress(model, device: str, ids, batch: int, prefix=None, quiet: bool = False):
    from tqdm.auto import tqdm

    n_windows = model.config.slots_for(ids.shape[-1]) // model.config.slots_per_window
    model.check_positions(model.config.slots_for(ids.shape[-1]) + (prefix.num_slots if prefix else 0))
    bar = tqdm(total=n_windows, unit="win", desc="compressing", disable=quiet or n_windows < 2, file=sys.stderr)
    last = [0]

    def progress(done: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    t = time.perf_counter()
    try:
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


def _generation_options(args) -> dict:
    opts = {"max_new_tokens": args.max_new_tokens}
    if args.do_sample or args.temperature is not None or args.top_p is not None or args.top_k is not None:
        opts["do_sample"] = True
        for k in ("temperature", "top_p", "top_k"):
            if getattr(args, k) is not None:
                opts[k] = getattr(args, k)
    if args.repetition_penalty is not None:
        opts["repetition_penalty"] = args.repetition_penalty
    if args.stop:
        opts["stop_strings"] = args.stop
    return opts


# --------------------------------------------------------------- commands
def cmd_ask(args) -> int:
    """Answer a question about a context (text file, stdin, or a saved memory)."""
    import torch

    from .memory import CompressedContext
    from .prompts import ask, build

    if (args.context is None) == (args.memory is None):
        raise RCCError("give exactly one of --context FILE|- and --memory FILE.rcc")
    if not args.question.strip():
        raise RCCError("--question is empty")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    mode = args.mode or ("manual" if args.memory else "reconstruct")
    context = read_text(args.context) if args.context is not None else None
    memory = CompressedContext.load(args.memory) if args.memory else None
    model, device = _load(args)
    if model.tokenizer is None:
        raise RCCError(f"{args.model} has no tokenizer; pass --base-model with a tokenizer")
    tok = model.tokenizer
    if memory is not None:
        model.check_memory(memory)
        if mode == "reconstruct":  # the question is compressed too: its windows extend the memory
            q_ids = tok("\n\n" + args.question, add_special_tokens=False, return_tensors="pt").input_ids
            memory = _compress(model, device, q_ids, args.window_batch_size, prefix=memory, quiet=args.quiet)
    else:
        text, _ = build(context, args.question, mode)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        memory = _compress(model, device, ids, args.window_batch_size, quiet=args.quiet)
    opts = _generation_options(args)
    if args.stream:
        from transformers import TextStreamer

        opts["streamer"] = TextStreamer(tok, skip_prompt=True)
    answer = ask(model, context or "", args.question, mode=mode, memory=memory, **opts)
    if args.json:
        print(json.dumps({"answer": answer.answer, "reconstructed_question": answer.reconstructed_question,
                          "mode": mode, "slots": memory.num_slots}))
    elif not args.stream:
        if answer.reconstructed_question is not None and not args.quiet:
            print(f"question (reconstructed): {answer.reconstructed_question}", file=sys.stderr)
        print(answer.answer)
    else:
        print()
    return 0


def cmd_compress(args) -> int:
    """Compress a context once into a memory file for later questions."""
    context = read_text(args.context)
    model, device = _load(args)
    if model.tokenizer is None:
        raise RCCError(f"{args.model} has no tokenizer; pass --base-model with a tokenizer")
    ids = model.tokenizer(context, add_special_tokens=False, return_tensors="pt").input_ids
    memory = _compress(model, device, ids, args.window_batch_size, quiet=args.quiet)
    memory.save(args.output)
    print(f"rcc: wrote {args.output} ({memory.nbytes() / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    """Print a memory file's metadata (without loading its tensors)."""
    from .memory import read_memory_metadata

    meta = read_memory_metadata(args.memory)
    meta.pop("tensors_sha256", None)
    size = Path(args.memory).stat().st_size
    if args.json:
        print(json.dumps({**meta, "bytes": size}))
    else:
        for k in ("num_tokens", "num_slots", "window", "ratio", "layers", "model_id", "content_hash", "format"):
            print(f"{k:13s} {meta.get(k)}")
        print(f"{'size':13s} {size / 2**20:.2f} MiB")
    return 0


# ------------------------------------------------------------------ parser
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="our checkpoint folder or hub id, the released layout (with --base-model), "
                        "'embedded:smollm2' or a transformers backbone (fresh, untrained)")
    p.add_argument("--base-model", help="config (and tokenizer) of the released layout, e.g. EleutherAI/pythia-1.4b")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--window", type=int, default=2048, help="window of a fresh model (default 2048)")
    p.add_argument("--ratio", type=int, default=32, help="ratio of a fresh model (default 32)")
    p.add_argument("--window-batch-size", type=int, default=8, help="windows encoded per step (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _ask_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--context", help="text file, or - for standard input")
    p.add_argument("--memory", help="a memory file from `rcc compress` instead of --context")
    p.add_argument("--question", "-q", required=True)
    p.add_argument("--mode", choices=("reconstruct", "manual"),
                   help="instruction mode (default: reconstruct with --context, manual with --memory)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print a JSON object")


def _compress_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--context", required=True, help="text file, or - for standard input")
    p.add_argument("-o", "--output", required=True, help="memory file to write (e.g. doc.rcc)")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", help="a memory file from `rcc compress`")
    p.add_argument("--json", action="store_true")


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "ask": (cmd_ask, _ask_args, "answer a question about a long context"),
    "compress": (cmd_compress, _compress_args, "compress a context into a reusable memory file"),
    "info": (cmd_info, _info_args, "show a memory file's metadata"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="rcc", description="Recurrent Context Compression for LLMs")
    parser.add_argument("--version", action="version", version=f"rcc-llm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_fn, add_args, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="rcc: %(levelname)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command][0](args) or 0
    except RCCError as err:
        print(f"rcc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rcc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
