"""Generation options as a user gives them (``rcc ask --temperature ...``, the
server's request fields, the vLLM engine's sampling): checked by one set of rules
before any model is loaded or any token generated, and turned into the keyword
arguments of :meth:`rcc.RCCModel.generate` (through :func:`rcc.ask.ask`). Imports
nothing heavy: the CLI builds its parser from it."""

from __future__ import annotations

import math
from collections.abc import Callable

from rcc.errors import RCCError

FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "stop")

#: the ranges every entry point accepts. Temperature 0 is greedy decoding (as in the OpenAI
#: API and vLLM); its upper bound is the OpenAI API's, and the lower one keeps ``logits / T``
#: finite in float32 (1e-300 turned every logit into inf, then the sampler into NaN)
TEMPERATURE = (1e-3, 2.0)
REPETITION_PENALTY = (1e-2, 10.0)  # logits divided or multiplied by it: the same float32 concern
MAX_TOP_K = 1 << 20  # more than any vocabulary; 0 is off


def cli_name(field: str) -> str:
    """``top_p`` -> ``--top-p`` (how the CLI names an option in its errors)."""
    return "--" + field.replace("_", "-")


def _number(value, integer: bool) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def check_sampling(temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                   name: Callable[[str], str] = cli_name) -> None:
    """The sampling values every entry point accepts (the CLI, the Python API, both
    server engines): finite numbers in range, ``top_k`` a true integer. None is unset.

    Args:
        name: how an error names the field (``--top-p`` for the CLI, ``top_p`` for the server).
    Raises:
        RCCError: naming the first value out of range and the range.
    """

    def bad(field: str, value, want: str) -> RCCError:
        return RCCError(f"{name(field)} {value!r}: must be {want}")

    lo, hi = TEMPERATURE
    if temperature is not None and not (_number(temperature, False) and math.isfinite(temperature)
                                        and (temperature == 0 or lo <= temperature <= hi)):
        raise bad("temperature", temperature, f"a positive number from {lo:g} to {hi:g} (e.g. 0.7), or 0 for "
                                              "greedy decoding")
    if top_p is not None and not (_number(top_p, False) and math.isfinite(top_p) and 0 < top_p <= 1):
        raise bad("top_p", top_p, "in (0, 1], e.g. 0.9")
    if top_k is not None and not (_number(top_k, True) and 0 <= top_k <= MAX_TOP_K):
        raise bad("top_k", top_k, f"an integer from 0 (off) to {MAX_TOP_K}")
    lo, hi = REPETITION_PENALTY
    if repetition_penalty is not None and not (_number(repetition_penalty, False)
                                               and math.isfinite(repetition_penalty)
                                               and lo <= repetition_penalty <= hi):
        raise bad("repetition_penalty", repetition_penalty, f"a positive number from {lo:g} to {hi:g}, e.g. 1.1 "
                                                            "(1 is none)")


def check_max_new_tokens(value, name: Callable[[str], str] = cli_name) -> None:
    """Raises RCCError unless ``value`` is an integer of at least 1 (``True`` is not 1)."""
    if not (_number(value, True) and value >= 1):
        raise RCCError(f"{name('max_new_tokens')} {value!r}: must be at least 1 (an integer)")


def sampling(do_sample: bool = False, temperature=None, top_p=None, top_k=None) -> dict:
    """The sampling keyword arguments of ``generate`` for checked values: sampling is on
    when asked for or when ``temperature``, ``top_p`` or ``top_k`` is given, and off
    (greedy) at temperature 0; ``top_k`` 0 is left out (off)."""
    if temperature == 0 or not (do_sample or temperature is not None or top_p is not None or top_k is not None):
        return {}
    opts = {"do_sample": True}
    opts.update((k, v) for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k or None))
                if v is not None)
    return opts


def generation_options(max_new_tokens: int | None = 128, do_sample: bool = False, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None,
                       repetition_penalty: float | None = None, stop: list[str] | None = None,
                       name: Callable[[str], str] = cli_name) -> dict:
    """Checked ``generate`` keyword arguments (:func:`check_sampling`, :func:`sampling`);
    ``stop`` becomes ``stop_strings``. The one place generation options are mapped: the
    CLI, the Python API and the server call it.

    Raises:
        RCCError: for a value ``generate`` would refuse or misuse, named by ``name``
            (default: its CLI option; ``str``: the field as the API spells it).
    """
    if max_new_tokens is not None:
        check_max_new_tokens(max_new_tokens, name)
    check_sampling(temperature, top_p, top_k, repetition_penalty, name=name)
    if do_sample and temperature == 0:
        raise RCCError(f"{name('temperature')} 0 is greedy decoding; drop {name('do_sample')}, or give a positive "
                       "temperature")
    if stop and not all(stop):
        raise RCCError(f"{name('stop')}: a stop string must not be empty")
    opts: dict = {"max_new_tokens": max_new_tokens, **sampling(do_sample, temperature, top_p, top_k)}
    if repetition_penalty is not None:
        opts["repetition_penalty"] = repetition_penalty
    if stop:
        opts["stop_strings"] = list(stop)
    return opts
