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

    if (args.context is None) == (not args.memory):
        raise RCCError("give exactly one of --context FILE|- and --memory FILE.rcc (--memory again to ask over "
                       "several memories at once)")
    if not args.question.strip():
        raise RCCError("--question is empty")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.context is not None:
        context = read_text(args.context)
    else:
        context = [CompressedContext.load(path) for path in args.memory]
        check_together(context, args.memory)
    model, device = load_from_args(args)
    if model.tokenizer is None:
        raise RCCError(f"{args.model} has no tokenizer; pass --base-model with a tokenizer")
    if args.context is None and len(context) == 1:
        context = context[0]  # several: ask() combines them, checking their slots before any work
    opts = options_from_args(args)
    if args.stream:
        from transformers import TextStreamer

        opts["streamer"] = TextStreamer(model.tokenizer, skip_prompt=True)
    answer = ask(model, context, args.question, mode=args.mode, **opts, window_batch_size=args.window_batch_size,
                 compress=lambda ids, prefix: compress_with_progress(model, device, ids, args.window_batch_size, prefix,
                                                                     args.quiet, keep_slots=False))
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


def check_together(memories, paths) -> None:
    """Memories read together must come from one model with one window and ratio (the
    loaded model's own is checked when it is loaded), and every one after the first
    must hold its slot inputs.

    Raises:
        RCCError: naming the first that differs from the first memory.
    """
    first = memories[0]
    for mem, path in zip(memories[1:], paths[1:]):
        if mem.slots is None:
            raise RCCError(f"{path} holds no slot inputs (compressed with --no-slots, or by an older rcc-llm), so it "
                           f"cannot be read after {paths[0]}; compress it again without --no-slots, or give it first")
        if (mem.model_id, mem.window, mem.ratio) != (first.model_id, first.window, first.ratio):
            raise RCCError(f"{path} was made by another model (model id {mem.model_id}, window {mem.window}, ratio "
                           f"{mem.ratio}) than {paths[0]} (model id {first.model_id}, window {first.window}, ratio "
                           f"{first.ratio}); memories read together must come from one model")


def cmd_compress(args) -> int:
    """Compress a context once into a memory file for later questions (or, with
    ``--append-to``, extend a memory with more text: only the new windows are encoded)."""
    import shutil

    from rcc.files import check_writable
    from rcc.memory import STORAGE_DTYPES, CompressedContext, dtype_name, format_bytes

    if (args.text is None) == (args.context is None):
        raise RCCError("give the text to compress once: as the argument (rcc compress FILE) or as --context FILE|-")
    output = check_writable(args.output)  # before the slow part, not after it
    parent = CompressedContext.load(args.append_to) if args.append_to else None
    context = read_text(args.text if args.text is not None else args.context)
    model, device = load_from_args(args)
    if model.tokenizer is None:
        raise RCCError(f"{args.model} has no tokenizer; pass --base-model with a tokenizer")
    ids = model.tokenizer(context, add_special_tokens=False, return_tensors="pt").input_ids
    storage = STORAGE_DTYPES[args.storage_dtype] if args.storage_dtype else model.dtype
    slots = model.config.slots_for(ids.shape[-1])
    keep = not args.no_slots
    if parent is not None:
        from rcc.positions import check_slot_total

        model.check_memory(parent)
        check_slot_total(model, parent.num_slots + slots, [parent.num_slots, slots],
                         what=f"{args.append_to} and the new text")
        if storage == model.dtype and not args.storage_dtype:
            storage = parent.kv[0][0].dtype  # an append keeps its parent's storage dtype
        if keep and parent.slots is None:
            keep = False
            print(f"rcc: {args.append_to} holds no slot inputs, so the result cannot be read after another memory "
                  "either", file=sys.stderr)
        slots += parent.num_slots
    per_slot = model.kv_bytes_per_slot(storage) + (model.slot_bytes_per_slot(storage) if keep else 0)
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
    memory = compress_with_progress(model, device, ids, args.window_batch_size, prefix=parent, quiet=args.quiet,
                                    keep_slots=keep)
    memory.save(output, dtype=storage)
    what = f", {args.append_to} + {ids.shape[-1]} new tokens" if parent is not None else ""
    print(f"rcc: wrote {output} ({format_bytes(output.stat().st_size)}{what})", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    """Print a memory file's metadata (checked, without loading its tensors; a damaged file is an
    error), or with ``--system`` this machine: CPU, threads and what ``--dtype auto`` picks and why."""
    from rcc.memory import memory_fields, memory_pieces, read_header, read_memory_metadata

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
    segments, parents = memory_pieces(meta, memory_fields(meta, args.memory), args.memory)
    combinable = "slots" in read_header(Path(args.memory))[1]
    info = {**meta, "segments": segments, "parents": parents, "slot_inputs": combinable,
            "bytes": size}
    if args.json:
        print(json.dumps(info))
    else:
        for k in ("num_tokens", "num_slots", "window", "ratio", "layers", "dtype", "model_id", "content_hash",
                  "format"):
            print(f"{k:13s} {meta.get(k)}")
        print(f"{'segments':13s} {', '.join(map(str, segments))} tokens")
        print(f"{'parents':13s} {', '.join(parents) or 'none'}")
        print(f"{'slot inputs':13s} {'yes (it can be read after another memory)' if combinable else 'no (it can only be read first)'}")
        print(f"{'size':13s} {size / 2**20:.2f} MiB")
    return 0


def ask_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--context", help="text file, or - for standard input")
    p.add_argument("--memory", action="append", metavar="FILE.rcc",
                   help="a memory file from `rcc compress` instead of --context; give it again to ask over several "
                        "memories, read in the order given")
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
    p.add_argument("text", nargs="?", help="text file to compress, or - for standard input (or --context)")
    p.add_argument("--context", help="text file, or - for standard input (instead of the argument)")
    p.add_argument("-o", "--output", required=True, help="memory file to write (e.g. doc.rcc)")
    p.add_argument("--append-to", metavar="MEMORY.rcc",
                   help="extend this memory with the text: only its windows are encoded, the memory's are kept as they "
                        "are cut (the result equals compressing both texts at once when both are whole windows); "
                        "the memory itself is not changed")
    p.add_argument("--no-slots", action="store_true",
                   help="leave out the slots' decoder inputs (the file is about 2.5x smaller for SmolLM2) and the "
                        "memory can then only be read first, not after another (rcc ask --memory A --memory B)")
    p.add_argument("--storage-dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved keys and values (default: the model's, exact); bfloat16 or float16 "
                        "halve a float32 file, and `rcc ask` casts them back to the model's dtype")


def info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", nargs="?", help="a memory file from `rcc compress`")
    p.add_argument("--system", action="store_true",
                   help="instead: this machine's CPU, threads, and the dtype --dtype auto picks here and why")
    p.add_argument("--device", default="auto", help="with --system: also the auto dtype of this device")
    p.add_argument("--json", action="store_true")
