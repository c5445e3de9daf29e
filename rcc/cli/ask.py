"""``rcc ask``, ``rcc compress`` and ``rcc info``: questions about a context, memory files, this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rcc.cli.common import add_generation_arguments, add_model_arguments, compress_with_progress, load_from_args, options_from_args
from rcc.errors import RCCError
from rcc.files import read_text
from rcc.loading import resolve_device


# --------------------------------------------------------------- commands
def cmd_ask(args) -> int:
    """Answer a question about a context (text file, stdin, or a saved memory)."""
    import torch

    from rcc.ask import ask
    from rcc.memory import CompressedContext

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
                 compress=lambda ids, prefix: compress_with_progress(model, device, ids, args.window_batch_size, prefix, args.quiet))
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

    from rcc.files import check_writable
    from rcc.memory import STORAGE_DTYPES, dtype_name, format_bytes

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
    memory = compress_with_progress(model, device, ids, args.window_batch_size, quiet=args.quiet)
    memory.save(output, dtype=storage)
    print(f"rcc: wrote {output} ({format_bytes(output.stat().st_size)})", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    """Print a memory file's metadata (checked, without loading its tensors; a damaged file is an
    error), or with ``--system`` this machine: CPU, threads and what ``--dtype auto`` picks and why."""
    from rcc.memory import read_memory_metadata

    if args.system and args.memory is not None:
        raise RCCError("give a memory file (rcc info doc.rcc) or --system, not both")
    if not args.system and args.memory is None:
        raise RCCError("give a memory file (rcc info doc.rcc), or --system for this machine")
    if args.system:
        from rcc.precision import describe

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


def ask_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--context", help="text file, or - for standard input")
    p.add_argument("--memory", help="a memory file from `rcc compress` instead of --context")
    p.add_argument("--question", "-q", required=True)
    p.add_argument("--mode", choices=("reconstruct", "manual"),
                   help="instruction mode (default: manual with --memory, else the model's own: "
                        "reconstruct, or manual for a model fine-tuned in manual mode only)")
    add_generation_arguments(p)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print a JSON object")


def compress_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--context", required=True, help="text file, or - for standard input")
    p.add_argument("-o", "--output", required=True, help="memory file to write (e.g. doc.rcc)")
    p.add_argument("--storage-dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved keys and values (default: the model's, exact); bfloat16 or float16 "
                        "halve a float32 file, and `rcc ask` casts them back to the model's dtype")


def info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", nargs="?", help="a memory file from `rcc compress`")
    p.add_argument("--system", action="store_true",
                   help="instead: this machine's CPU, threads, and the dtype --dtype auto picks here and why")
    p.add_argument("--device", default="auto", help="with --system: also the auto dtype of this device")
    p.add_argument("--json", action="store_true")
