"""Generation options as a user gives them (``rcc ask --temperature ...``):
checked before any model is loaded, and turned into the keyword arguments of
:meth:`rcc.RCCModel.generate` (through :func:`rcc.ask.ask`). Imports nothing
heavy: the CLI builds its parser from it."""

from __future__ import annotations

import math

from .errors import RCCError

FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "stop")


def generation_options(max_new_tokens: int | None = 128, do_sample: bool = False, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None,
                       repetition_penalty: float | None = None, stop: list[str] | None = None) -> dict:
    """Checked ``generate`` keyword arguments: sampling is on when asked for or when
    ``temperature``, ``top_p`` or ``top_k`` is given; ``stop`` becomes ``stop_strings``.

    Raises:
        RCCError: for a value ``generate`` would refuse or misuse (named as its CLI option).
    """

    def bad(flag: str, value, want: str) -> RCCError:
        return RCCError(f"--{flag} {value}: must be {want}")

    if max_new_tokens is not None and max_new_tokens < 1:
        raise bad("max-new-tokens", max_new_tokens, "at least 1")
    checks = {"temperature": (temperature, lambda x: x > 0, "a positive number, e.g. 0.7"),
              "top_p": (top_p, lambda x: 0 < x <= 1, "in (0, 1], e.g. 0.9"),
              "repetition_penalty": (repetition_penalty, lambda x: x > 0, "a positive number, e.g. 1.1 (1 is none)")}
    for key, (value, ok, want) in checks.items():
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise bad(key.replace("_", "-"), value, want)
    if top_k is not None and top_k < 0:
        raise bad("top-k", top_k, "0 (off) or more")
    if stop and not all(stop):
        raise RCCError("--stop: a stop string must not be empty")
    opts: dict = {"max_new_tokens": max_new_tokens}
    if do_sample or temperature is not None or top_p is not None or top_k is not None:
        opts["do_sample"] = True
        opts.update((k, v) for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k))
                    if v is not None)
    if repetition_penalty is not None:
        opts["repetition_penalty"] = repetition_penalty
    if stop:
        opts["stop_strings"] = list(stop)
    return opts


def options_from_args(args) -> dict:
    """:func:`generation_options` of the :data:`FIELDS` an argparse namespace has (none:
    nothing to check); e.g. ``rcc eval`` has ``--max-new-tokens`` alone."""
    return generation_options(**{k: getattr(args, k) for k in FIELDS if hasattr(args, k)})


def add_arguments(p) -> None:
    """The options of :func:`generation_options` (``--max-new-tokens``, ``--temperature`` ...)."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
