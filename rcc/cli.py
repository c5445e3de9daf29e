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

from .config import RCCConfig
from .errors import RCCError
from .serve.command import cmd_serve, serve_args

log = logging.getLogger("rcc")

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


# ---------------------------------------------------------------- helpers
def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _device(name: str) -> str:
    """``--device`` checked against this machine (before any model is loaded).

    Raises:
        RCCError: for a name torch does not know or a device that is not here.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise RCCError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RCCError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RCCError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise RCCError(f"--device {name}: no Apple GPU is available here; use --device cpu")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if not (hasattr(backend, "is_available") and backend.is_available()):
            raise RCCError(f"--device {name}: no {dev.type} device is available here; use cpu or cuda")
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


def _generation_options(args) -> dict:
    """``generate`` options from the command line, checked (before any model is loaded).

    Raises:
        RCCError: for a value ``generate`` would refuse or misuse.
    """
    import math

    def bad(flag: str, value, want: str) -> RCCError:
        return RCCError(f"--{flag} {value}: must be {want}")

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise bad("max-new-tokens", args.max_new_tokens, "at least 1")
    checks = {"temperature": (lambda x: x > 0, "a positive number, e.g. 0.7"),
              "top_p": (lambda x: 0 < x <= 1, "in (0, 1], e.g. 0.9"),
              "repetition_penalty": (lambda x: x > 0, "a positive number, e.g. 1.1 (1 is none)")}
    for key, (ok, want) in checks.items():
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise bad(key.replace("_", "-"), value, want)
    if args.top_k is not None and args.top_k < 0:
        raise bad("top-k", args.top_k, "0 (off) or more")
    if args.stop and not all(args.stop):
        raise RCCError("--stop: a stop string must not be empty")
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


def _check_args(args) -> None:
    """Options every command shares, checked before any command does work (and
    before the slow model load): the device, window batch size, generation options.

    Raises:
        RCCError: on the first bad option.
    """
    if getattr(args, "device", None) is not None:
        _device(args.device)
    if getattr(args, "window_batch_size", 1) < 1:
        raise RCCError(f"--window-batch-size {args.window_batch_size}: must be at least 1")
    if hasattr(args, "temperature"):
        _generation_options(args)
    elif getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        raise RCCError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")


# --------------------------------------------------------------- commands
def cmd_ask(args) -> int:
    """Answer a question about a context (text file, stdin, or a saved memory)."""
    import torch

    from .memory import CompressedContext
    from .prompts import ask, build, default_mode

    if (args.context is None) == (args.memory is None):
        raise RCCError("give exactly one of --context FILE|- and --memory FILE.rcc")
    if not args.question.strip():
        raise RCCError("--question is empty")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    context = read_text(args.context) if args.context is not None else None
    memory = CompressedContext.load(args.memory) if args.memory else None
    model, device = _load(args)
    mode = args.mode or ("manual" if args.memory else default_mode(model))
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
    import shutil

    from .memory import STORAGE_DTYPES, check_writable, dtype_name, format_bytes

    output = check_writable(args.output)  # before the slow part, not after it
    context = read_text(args.context)
    model, device = _load(args)
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
    """Print a memory file's metadata (checked, without loading its tensors); a damaged file is an error."""
    from .memory import read_memory_metadata

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


def cmd_prepare_data(args) -> int:
    """Tokenize text / JSONL / a Hugging Face dataset into a memory-mapped token folder."""
    from .data import load_tokenizer, prepare_data

    tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare_data(args.inputs, args.output, tokenizer, text_field=args.text_field,
                        eval_fraction=args.eval_fraction, min_tokens=args.min_tokens, on_error=args.on_error,
                        on_short=args.on_short, append_eos=not args.no_eos, seed=args.seed,
                        overwrite=args.overwrite, progress=not args.quiet, max_tokens=args.max_tokens)
    splits = ", ".join(f"{k} {v['docs']} documents / {v['tokens']} tokens" for k, v in meta["splits"].items())
    print(f"rcc: wrote {args.output} ({meta['dtype']}): {splits}", file=sys.stderr)
    report = meta["report"]
    for reason, n in report["skipped"].items():
        shown = "; ".join(report["skipped_examples"][reason][:3])
        print(f"rcc: skipped {n} {reason}: {shown}{' ...' if n > 3 else ''}", file=sys.stderr)
    return 0


def cmd_synth(args) -> int:
    """Write synthetic pass-key / needle / extract records built from prose."""
    from .data import load_tokenizer
    from .eval.config import parse_length
    from .synth import make_records, parse_weights, read_prose, write_records

    weights = parse_weights(args.kinds)
    low, high = parse_length(args.min_tokens), parse_length(args.max_tokens)
    if not 0 < low <= high:
        raise RCCError(f"--min-tokens ({low}) must be positive and at most --max-tokens ({high})")
    if args.count <= 0:
        raise RCCError(f"--count must be positive; got {args.count}")
    sentences = read_prose(args.inputs)
    tokenizer = load_tokenizer(args.tokenizer)
    n = write_records(args.output, make_records(sentences, tokenizer, count=args.count, weights=weights,
                                                min_tokens=low, max_tokens=high, seed=args.seed))
    print(f"rcc: wrote {n} records to {args.output}", file=sys.stderr)
    return 0


def _eval_config(args):
    from .eval import EvalConfig

    task_defaults = {"max_new_tokens": None, "haystack": None, "needle": None, "question": None, "answer": None,
                     "text": None, "cue_tokens": 16, "target_tokens": 64, "data": None, "limit": None}
    opts = {k: getattr(args, k, v) for k, v in task_defaults.items()}
    baselines = ["full", "recent", "kvpress"] if args.baseline else (args.baselines or "")
    return EvalConfig(task=args.task, lengths=getattr(args, "lengths", "4k"), depths=getattr(args, "depths", "0"),
                      modes=getattr(args, "modes", "reconstruct,manual"), samples=getattr(args, "samples", 1),
                      seed=args.seed, baselines=baselines, kvpress_press=args.kvpress_press,
                      window_batch_size=args.window_batch_size, **opts)


def cmd_eval(args) -> int:
    """Run an evaluation task on RCC (and, with --baseline, the baselines); write JSON (+ PNG), print a table."""
    from .eval import format_table, run_eval
    from .eval.plot import plot_result

    cfg = _eval_config(args)  # validate before the (slow) model load
    model, _device_name = _load(args)
    output = Path(args.output or f"runs/eval-{args.task}.json")
    say = None if args.quiet else (lambda line: print(f"rcc: {line}", file=sys.stderr))
    result = run_eval(model, cfg, output=output, model_spec=args.model, progress=say)
    print(format_table(result))
    print(f"rcc: wrote {output}", file=sys.stderr)
    if not args.no_plot:
        png = plot_result(result, args.plot or output.with_suffix(".png"))
        if png is not None:
            print(f"rcc: wrote {png}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    """Measure RCC against its uncompressed backbone: memory, compression time, TTFT, decode speed."""
    from .bench import BenchConfig, format_table, run_bench
    from .bundled import resolve_bundled
    from .eval.plot import bench_memory

    device = _device(args.device)
    if not args.base_model:  # fail here, not once per measurement in the child processes
        resolve_bundled(args.model)
    dtype = str(_dtype(args.dtype, device)).replace("torch.", "")
    cfg = BenchConfig(model=args.model, base_model=args.base_model, lengths=args.lengths, device=device, dtype=dtype,
                      window=args.window, ratio=args.ratio, window_batch_size=args.window_batch_size,
                      new_tokens=args.new_tokens, kinds=args.kinds.split(","),
                      backbone_max_length=args.backbone_max_length, seed=args.seed, timeout_s=args.timeout)
    output = Path(args.output)
    say = None if args.quiet else (lambda line: print(f"rcc: {line}", file=sys.stderr))
    result = run_bench(cfg, output=output, progress=say)
    print(format_table(result))
    print(f"rcc: wrote {output}", file=sys.stderr)
    if not args.no_plot and any(p.get("ok") for p in result["points"]):
        print(f"rcc: wrote {bench_memory(result, args.plot or output.with_suffix('.png'))}", file=sys.stderr)
    return 0


def cmd_bench_train(args) -> int:
    from .bench_train import cmd

    return cmd(args)


def _bench_train_args(p: argparse.ArgumentParser) -> None:
    from .bench_train import add_args  # imports no torch

    add_args(p)


# ------------------------------------------------------------------ parser
def _model_args(p: argparse.ArgumentParser) -> None:
    from .bundled import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the bundled {DEFAULT_MODEL} (default), our checkpoint folder or hub id, the released "
                        "layout (with --base-model), 'embedded:smollm2' or a transformers backbone (fresh, untrained)")
    p.add_argument("--base-model", help="config (and tokenizer) of the released layout, e.g. EleutherAI/pythia-1.4b")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--window", type=int, default=RCCConfig.window,
                   help=f"window of a fresh model (default {RCCConfig.window})")
    p.add_argument("--ratio", type=int, default=RCCConfig.ratio,
                   help=f"ratio of a fresh model (default {RCCConfig.ratio})")
    p.add_argument("--window-batch-size", type=int, default=8, help="windows encoded per step (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _ask_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--context", help="text file, or - for standard input")
    p.add_argument("--memory", help="a memory file from `rcc compress` instead of --context")
    p.add_argument("--question", "-q", required=True)
    p.add_argument("--mode", choices=("reconstruct", "manual"),
                   help="instruction mode (default: manual with --memory, else the model's own: "
                        "reconstruct, or manual for a model fine-tuned in manual mode only)")
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
    p.add_argument("--storage-dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved keys and values (default: the model's, exact); bfloat16 or float16 "
                        "halve a float32 file, and `rcc ask` casts them back to the model's dtype")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", help="a memory file from `rcc compress`")
    p.add_argument("--json", action="store_true")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML training config (see configs/ and docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config options, e.g. optim.max_steps=100 optim.lr=3e-4 run.output_dir=runs/x "
                        "model.backbone.hidden_size=32")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def _prepare_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+",
                   help=".txt files (one document each), .jsonl/.json files, folders of them, a saved dataset "
                        "folder, or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("-o", "--output", required=True, help="folder to write (train.bin/.idx, eval.bin/.idx, meta.json)")
    p.add_argument("--tokenizer", required=True, help="hub id, folder or embedded:smollm2 (the model's tokenizer)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSON records (default text)")
    p.add_argument("--eval-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--min-tokens", type=int, default=2048,
                   help="skip documents with fewer tokens, e.g. one window (default 2048)")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="malformed records: stop with file:line (default) or skip and count them")
    p.add_argument("--on-short", choices=("skip", "fail"), default="skip",
                   help="documents under --min-tokens: skip and count them (default) or stop with file:line")
    p.add_argument("--no-eos", action="store_true", help="do not append the EOS token to each document")
    p.add_argument("--max-tokens", type=int, help="stop after about this many tokens (a slice of a large corpus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _eval_common(p: argparse.ArgumentParser, lengths: str | None, modes: bool = True) -> None:
    _model_args(p)
    if lengths:
        p.add_argument("--lengths", default=lengths, help=f"context lengths in tokens, k/m suffixes (default {lengths})")
        p.add_argument("--samples", type=int, default=1, help="samples per length (and depth) (default 1)")
    if modes:
        p.add_argument("--modes", default="reconstruct,manual", help="RCC instruction modes (default both)")
        p.add_argument("--max-new-tokens", type=int, help="the answer's token budget (default: the task's)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the baselines full, recent and kvpress on the same samples")
    p.add_argument("--baselines", help="a subset of the baselines, e.g. full,recent")
    p.add_argument("--kvpress-press", default="KnormPress", help="kvpress press for the kvpress baseline")
    p.add_argument("--seed", type=int, default=0, help="seed of keys, offsets and spans (default 0)")
    p.add_argument("-o", "--output", help="JSON result file (default runs/eval-TASK.json)")
    p.add_argument("--plot", help="PNG file (default: beside the JSON)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


def _eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    depths = ("--depths", "0,0.25,0.5,0.75,1")
    t = sub.add_parser("passkey", help="pass-key retrieval at context lengths x depths")
    _eval_common(t, "4k")
    t.add_argument(depths[0], default=depths[1], help=f"needle depths in [0, 1] (default {depths[1]})")
    t = sub.add_parser("needle", help="a needle sentence hidden in your own haystack text")
    _eval_common(t, "4k")
    t.add_argument(depths[0], default=depths[1], help=f"needle depths in [0, 1] (default {depths[1]})")
    t.add_argument("--haystack", required=True, help="UTF-8 text file to hide the needle in")
    t.add_argument("--needle", required=True, help="the sentence to hide, e.g. 'The secret number is 42.'")
    t.add_argument("--question", required=True, help="the question about it")
    t.add_argument("--answer", required=True, help="the expected answer")
    t = sub.add_parser("reconstruct", help="reproduce compressed held-out text: BLEU-4 and exact prefix")
    _eval_common(t, "1k,4k", modes=False)
    t.add_argument("--text", required=True, help="UTF-8 held-out text file")
    t.add_argument("--cue-tokens", type=int, default=16, help="tokens of the span given as the cue (default 16)")
    t.add_argument("--target-tokens", type=int, default=64, help="tokens to reproduce after the cue (default 64)")
    t = sub.add_parser("qa", help="questions from a JSONL file (PwC fields input, prompt, answer)")
    _eval_common(t, None)
    t.add_argument("--data", required=True, help="JSONL file with input, prompt, answer")
    t.add_argument("--limit", type=int, help="only the first N samples")


def _bench_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    for action in p._actions:  # one window at a time: the memory floor (spec section 4)
        if action.dest == "window_batch_size":
            action.default, action.help = 1, "windows encoded per step (default 1: the memory floor)"
    p.add_argument("--lengths", default="2k,4k,8k,16k,32k", help="context lengths (default 2k,4k,8k,16k,32k)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--kinds", default="rcc,backbone", help="what to measure: rcc, backbone, forward (the backbone's plain forward pass over "
                        "RCC's windows, to time compression against; default rcc,backbone)")
    p.add_argument("--backbone-max-length", help="skip the uncompressed backbone above this length, e.g. 32k")
    p.add_argument("--timeout", type=float, help="seconds per measurement before it counts as failed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="runs/bench.json", help="JSON result file (default runs/bench.json)")
    p.add_argument("--plot", help="PNG file (default: beside the JSON)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


def _synth_args(p) -> None:
    p.add_argument("inputs", nargs="+", help="UTF-8 prose: *.txt files or folders of them")
    p.add_argument("-o", "--output", required=True, help="JSONL file to write (PwC fields: input, prompt, answer)")
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer (lengths count its tokens)")
    p.add_argument("--count", type=int, default=1000, help="records to write (default 1000)")
    p.add_argument("--kinds", default="passkey=0.4,needle=0.35,extract=0.25",
                   help="share of each kind (default passkey=0.4,needle=0.35,extract=0.25)")
    p.add_argument("--min-tokens", default="256", help="shortest context, k suffix allowed (default 256)")
    p.add_argument("--max-tokens", default="8k", help="longest context (default 8k)")
    p.add_argument("--seed", type=int, default=0)


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "ask": (cmd_ask, _ask_args, "answer a question about a long context"),
    "compress": (cmd_compress, _compress_args, "compress a context into a reusable memory file"),
    "info": (cmd_info, _info_args, "show a memory file's metadata"),
    "train": (cmd_train, _train_args, "train an RCC model (compression pretraining or instruction fine-tuning)"),
    "prepare-data": (cmd_prepare_data, _prepare_data_args, "tokenize a corpus into a memory-mapped token folder"),
    "synth": (cmd_synth, _synth_args, "build synthetic pass-key / needle / extract records from prose"),
    "eval": (cmd_eval, _eval_args, "evaluate: passkey, needle, reconstruct or qa, with --baseline for the baselines"),
    "bench": (cmd_bench, _bench_args, "memory and speed of RCC against the uncompressed backbone "
              "(`rcc bench train CONFIG`: training speed)"),
    "bench-train": (cmd_bench_train, _bench_train_args,
                    "training speed of a config: tokens/s, step split, memory, MFU (also `rcc bench train`)"),
    "serve": (cmd_serve, serve_args, "serve compressed contexts over HTTP (OpenAI-compatible; needs the serve extra)"),
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
    """The ``rcc`` console entry: Ctrl-C at any point, the first seconds of imports
    included, exits 130 with one line (``rcc/__init__`` imports nothing heavy)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("rcc: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if argv[at : at + 2] == ["bench", "train"]:  # `rcc bench train CONFIG`: training speed (rcc/bench_train.py)
        argv[at : at + 2] = ["bench-train"]
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
