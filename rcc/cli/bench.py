"""``rcc bench`` and ``rcc bench train``: memory and speed against the uncompressed backbone, training speed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rcc.cli.common import add_model_arguments
from rcc.files import atomic_write_text
from rcc.loading import resolve_device, resolve_dtype
from rcc.report import names_list


def bench_args(p: argparse.ArgumentParser) -> None:
    """``rcc bench``'s options: the fields of :class:`~rcc.bench.memory.BenchConfig` and
    :func:`~rcc.bench.memory.run_bench`'s output."""
    # one window at a time: the memory floor (docs/method.md section 4)
    add_model_arguments(p, window_batch_size=1, batch_help="windows encoded per step (default 1: the memory floor)")
    p.add_argument("--lengths", default="2k,4k,8k,16k,32k", help="context lengths (default 2k,4k,8k,16k,32k)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--dtypes", type=names_list, metavar="A,B", help="measure every point in each of these dtypes, one after the other, and "
                   "compare them (e.g. float32,bfloat16; default: --dtype alone)")
    p.add_argument("--kinds", default="rcc,backbone", help="what to measure: rcc, backbone, forward (the backbone's plain forward "
                   "pass over RCC's windows, to time compression against; default rcc,backbone)")
    p.add_argument("--backbone-max-length", help="skip the uncompressed backbone above this length, e.g. 32k")
    p.add_argument("--timeout", type=float, help="seconds per measurement before it counts as failed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads per measurement (default: torch's, one per core); "
                   "on a busy CPU 1 thread decodes several times faster than 2")
    p.add_argument("--repeats", type=int, default=1, help="decodes timed per point; the table shows the median "
                   "and the range (default 1)")
    p.add_argument("-o", "--output", default="runs/bench.json", help="JSON result file (default runs/bench.json)")
    p.add_argument("--plot", help="PNG file (default: beside the JSON)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


def cmd_bench(args) -> int:
    """``rcc bench``: measure RCC against its uncompressed backbone (memory, compression time, TTFT,
    decode speed); write JSON (+ PNG), print a table."""
    from rcc.backbones import RANDOM, parse_random
    from rcc.bench.memory import BenchConfig, format_table, run_bench
    from rcc.bench.plot import bench_memory
    from rcc.bundled import resolve_bundled

    device = resolve_device(args.device)
    if not args.base_model:  # fail here, not once per measurement in the child processes
        resolve_bundled(args.model)
        if args.model.startswith(RANDOM):
            parse_random(args.model)
    dtypes = args.dtypes or [str(resolve_dtype(args.dtype, device)).removeprefix("torch.")]
    dtypes = [str(resolve_dtype(d, device)).removeprefix("torch.") if d == "auto" else d for d in dtypes]
    cfg = BenchConfig(model=args.model, base_model=args.base_model, lengths=args.lengths, device=device, dtypes=dtypes,
                      window=args.window, ratio=args.ratio, window_batch_size=args.window_batch_size,
                      new_tokens=args.new_tokens, kinds=args.kinds.split(","),
                      backbone_max_length=args.backbone_max_length, seed=args.seed, timeout_s=args.timeout,
                      threads=args.threads, repeats=args.repeats)
    output = Path(args.output)
    say = None if args.quiet else (lambda line: print(f"rcc: {line}", file=sys.stderr))
    result = run_bench(cfg, output=output, progress=say)
    print(format_table(result))
    print(f"rcc: wrote {output}", file=sys.stderr)
    if not args.no_plot and any(p.get("ok") for p in result["points"]):
        print(f"rcc: wrote {bench_memory(result, args.plot or output.with_suffix('.png'))}", file=sys.stderr)
    return 0


def bench_train_args(p: argparse.ArgumentParser) -> None:
    """``rcc bench train``'s options: the parameters of :func:`rcc.bench.train.run`."""
    p.prog = "rcc bench train"
    p.add_argument("config", help="training config (YAML/JSON), as rcc train takes it")
    p.add_argument("overrides", nargs="*", help="key=value options on top (both variants), e.g. batch_size=2")
    p.add_argument("--steps", type=int, default=3, help="measured optimiser steps per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="discarded first steps per variant (default 1)")
    p.add_argument("--dtypes", type=names_list, metavar="A,B",
                   help="one variant per compute dtype, alternating: e.g. float32,bfloat16 (run.mixed_precision "
                        "no / bf16); the ratio is the second's samples/s over the first's")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--peak-tflops", type=_peak_arg, metavar="TFLOPS|measure",
                   help="the device's peak TFLOP/s for MFU, or 'measure' (a matmul on the device); default: the "
                        "table on a GPU (an H200: 790, measured), a measured matmul on a CPU")
    p.add_argument("--random-data", action="store_true", help="random token ids instead of the config's train_data")
    p.add_argument("-o", "--output", default="runs/bench-train.json",
                   help="JSON result (default runs/bench-train.json)")
    p.add_argument("-q", "--quiet", action="store_true")


def _peak_arg(text: str) -> float | str:
    if text == "measure":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TFLOP/s or 'measure', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def cmd_bench_train(args) -> int:
    """``rcc bench train``: print the table, write the JSON and the table beside it (``.md``)."""
    from rcc.bench.train import format_table, run

    say = None if args.quiet else (lambda line: print(f"rcc: {line}", file=sys.stderr, flush=True))
    result = run(args.config, args.overrides, steps=args.steps, warmup=args.warmup,
                 device=args.device, peak_tflops=args.peak_tflops, random_data=args.random_data, progress=say,
                 dtypes=args.dtypes)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    table = format_table(result)
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"rcc: wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0
