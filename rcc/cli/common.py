"""What the commands share: the options that name and place a model (the
parameters of :func:`rcc.loading.load_model`), the generation options (those of
:func:`rcc.generation.generation_options`), and compression with a progress bar."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from rcc.config import RCCConfig
from rcc.errors import RCCError
from rcc.generation import FIELDS, MAX_TOP_K, REPETITION_PENALTY, TEMPERATURE, generation_options
from rcc.loading import DTYPES, load_model, resolve_device, resolve_dtype
from rcc.report import peak_memory_mib

if TYPE_CHECKING:
    from rcc.model import RCCModel


def add_model_arguments(p, window_batch_size: int = 8,
                        batch_help: str = "windows encoded per step (default 8)") -> None:
    """The options naming and placing a model (``--model``, ``--device``, ...): the
    parameters of :func:`load_model`, shared by the CLI's commands that load one."""
    from rcc.bundled import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the bundled {DEFAULT_MODEL} (default), our checkpoint folder or hub id, the released "
                        "layout (with --base-model), 'embedded:smollm2' or a transformers backbone (fresh, untrained)")
    p.add_argument("--base-model", help="config (and tokenizer) of the released layout, e.g. EleutherAI/pythia-1.4b")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="default auto: bfloat16 on a GPU; on a CPU bfloat16 where it has native bf16 matrix units, "
                        "else float32 (`rcc info --system` says which and why)")
    p.add_argument("--window", type=int, default=RCCConfig.window,
                   help=f"window of a fresh model (default {RCCConfig.window})")
    p.add_argument("--ratio", type=int, default=RCCConfig.ratio,
                   help=f"ratio of a fresh model (default {RCCConfig.ratio})")
    p.add_argument("--window-batch-size", type=int, default=window_batch_size, help=batch_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")



def check_model_arguments(args) -> None:
    """The options of :func:`add_model_arguments` a namespace has, checked before the
    slow model load: ``--device`` (:func:`resolve_device`), ``--window-batch-size``.

    Raises:
        RCCError: on the first bad option.
    """
    if getattr(args, "device", None) is not None:
        resolve_device(args.device)
    if getattr(args, "window_batch_size", 1) < 1:
        raise RCCError(f"--window-batch-size {args.window_batch_size}: must be at least 1")



def load_from_args(args) -> tuple[RCCModel, str]:
    """:func:`load_model` with the options of :func:`add_model_arguments`; warns (stderr)
    when the model is untrained. Returns ``(model, device)``."""
    device = resolve_device(args.device)
    model = load_model(args.model, base_model=args.base_model, dtype=resolve_dtype(args.dtype, device),
                       device=device, window=args.window, ratio=args.ratio)
    if not model.config.trained:
        print(f"rcc: warning: {args.model} gives an UNTRAINED RCC model (fresh G and A_i); its answers are "
              "meaningless until it is trained with `rcc train`", file=sys.stderr)
    return model, device


def options_from_args(args) -> dict:
    """:func:`generation_options` of the :data:`FIELDS` an argparse namespace has (none:
    nothing to check); e.g. ``rcc eval`` has ``--max-new-tokens`` alone."""
    return generation_options(**{k: getattr(args, k) for k in FIELDS if hasattr(args, k)})



def add_generation_arguments(p) -> None:
    """The options of :func:`generation_options` (``--max-new-tokens``, ``--temperature`` ...)."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help=f"0 (greedy) or {TEMPERATURE[0]:g} to {TEMPERATURE[1]:g}")
    p.add_argument("--top-p", type=float, help="in (0, 1]")
    p.add_argument("--top-k", type=int, help=f"0 (off) to {MAX_TOP_K}")
    p.add_argument("--repetition-penalty", type=float,
                   help=f"{REPETITION_PENALTY[0]:g} to {REPETITION_PENALTY[1]:g} (1 is none)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def compress_with_progress(model, device: str, ids, batch: int, prefix=None, quiet: bool = False,
                           keep_slots: bool = True):
    """``model.compress(ids)`` (ids ``(1, n)``) with a progress bar over the windows and a summary line on stderr."""
    from tqdm.auto import tqdm

    n_windows = model.config.slots_for(ids.shape[-1]) // model.config.slots_per_window
    bar = tqdm(total=n_windows, unit="win", desc="compressing", disable=quiet or n_windows < 2, file=sys.stderr)
    last = [0]

    def progress(done: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    t = time.perf_counter()
    try:  # compress() checks the positions (refusal or one warning) before any work
        memory = model.compress(ids, window_batch_size=batch, progress=progress, prefix=prefix, keep_slots=keep_slots)
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


def check_common_args(args) -> None:
    """Options every command shares, checked before any command does work (and before
    the slow model load): the device, window batch size, generation options.

    Raises:
        RCCError: on the first bad option.
    """
    check_model_arguments(args)
    options_from_args(args)
