"""The evaluation config (one dataclass, validated on creation) and the
parsers of ``--lengths 4k,32k,1m`` and ``--depths 0,0.5,1``."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from rcc.errors import RCCError
from rcc.report import parse_lengths
from rcc.prompts import MODES
from rcc.data.synth import VALUE_SHAPES

TASK_NAMES = ("passkey", "needle", "niah", "reconstruct", "qa")  # the modules are rcc.eval.runner.TASKS
BASELINES = ("full", "recent", "kvpress:PRESS@RATIO", "llamacpp")
PROMPTS = ("chat", "continuation")
#: the niah task's value shapes (:mod:`rcc.eval.niah`): ``number7`` is the suite's 7-digit number
NIAH_SHAPES = ("number7", *VALUE_SHAPES)
NIAH_MAX_KEYS = 24  # labelled needles in one sample at most (the task's key words)


def parse_depths(text: str | list) -> list[float]:
    """A comma-separated list of needle depths in [0, 1] (0 = start, 1 = end of the haystack).

    Raises:
        RCCError: on an empty list or a value outside [0, 1].
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for x in items:
        if not str(x).strip():
            continue
        try:
            d = float(x)
        except ValueError:
            raise RCCError(f"bad depth {x!r}: give fractions in [0, 1], e.g. --depths 0,0.5,1") from None
        if not 0.0 <= d <= 1.0:
            raise RCCError(f"depth {d} is outside [0, 1]; 0 puts the needle at the start, 1 at the end")
        out.append(d)
    if not out:
        raise RCCError("no depths given; e.g. --depths 0,0.5,1")
    return out


def parse_baselines(text: str | list) -> list[str]:
    """``full``, ``recent``, ``llamacpp`` and ``kvpress:PRESS@RATIO`` items (:func:`rcc.eval.kvpress.parse_spec`),
    comma-separated; a kvpress item is kept as written (lower-case press names are fine).

    Raises:
        RCCError: on an unknown baseline or a malformed kvpress item.
    """
    from rcc.eval.kvpress import parse_spec

    items = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    for x in items:
        if x.startswith("kvpress"):
            parse_spec(x)
        elif x not in ("full", "recent", "llamacpp"):
            raise RCCError(f"unknown baseline {x!r}; use full, recent, llamacpp or kvpress:PRESS@RATIO "
                           "(e.g. kvpress:snapkv@16)")
    return list(dict.fromkeys(items))


def parse_list(text: str | list, allowed: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated list of names from ``allowed``.

    Raises:
        RCCError: on an unknown name.
    """
    items = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    for x in items:
        if x not in allowed:
            raise RCCError(f"unknown {what} {x!r}; use one of {', '.join(allowed)}")
    return items


@dataclass
class EvalConfig:
    """What one evaluation run does; saved in its JSON result.

    Attributes:
        task: ``passkey``, ``needle``, ``reconstruct`` or ``qa``.
        lengths: context lengths in tokens of the model's tokenizer (passkey,
            needle, reconstruct).
        depths: needle depths in [0, 1] (passkey, needle).
        modes: RCC instruction modes run on question tasks (docs/method.md section 2).
        samples: samples per (length, depth) cell (passkey, needle, reconstruct).
        seed: makes pass keys, text offsets and spans reproducible.
        max_new_tokens: the answer's budget; in reconstruct mode the decoder
            first writes the question back, whose tokens are added on top.
            None: the task's default.
        baselines: any of ``full`` (the uncompressed decoder, cut in the middle
            to its maximum positions), ``recent`` (the decoder with RCC's KV
            budget, n/r positions, keeping the most recent tokens) and
            ``kvpress:PRESS@RATIO`` (a kvpress press keeping 1/RATIO of the
            context's KV positions; no ``@``: the model's ratio), run in
            kvpress's own environment (:mod:`rcc.eval.kvpress`), and ``llamacpp``
            (``full``'s token ids run by llama.cpp on the backbone's GGUF, in
            llama-cpp-python's own environment, :mod:`rcc.eval.llamacpp`).
        prompts: ``chat`` and/or ``continuation``: the prompts every method
            answers question samples with (RCC's chat prompts are ``modes``);
            the continuation needs samples with a cue (passkey, needle).
        kvpress_python: the interpreter of kvpress's environment (None: found,
            see :func:`rcc.eval.kvpress.find_python`).
        llamacpp_python: the interpreter of llama-cpp-python's environment
            (None: found, see :func:`rcc.eval.llamacpp.find_python`).
        cue: the needle task's continuation cue (None: the needle up to the answer).
        window_batch_size: windows RCC encodes per step.
        haystack, needle, question, answer: the needle task's inputs (a text
            file path and three strings).
        text: a UTF-8 text file of held-out text (reconstruct).
        cue_tokens, target_tokens: the reconstruct task's prompt and reference span.
        data: a JSONL file with ``input``, ``prompt``, ``answer`` (qa).
        limit: use only the first ``limit`` samples of ``data``.
        shapes: the niah task's value shapes (:data:`rcc.eval.niah.SHAPES`, e.g. ``number7``, ``uuid``).
        keys: labelled needles in each niah sample: the asked one and ``keys - 1`` distractors.

    Raises:
        RCCError: on an unknown task, mode or baseline, bad lengths or depths,
        or a task's input missing.
    """

    task: str
    lengths: list[int] = field(default_factory=lambda: [4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    samples: int = 1
    seed: int = 0
    max_new_tokens: int | None = None
    baselines: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    kvpress_python: str | None = None
    llamacpp_python: str | None = None
    window_batch_size: int | None = 8
    haystack: str | None = None
    needle: str | None = None
    question: str | None = None
    answer: str | None = None
    cue: str | None = None
    text: str | None = None
    cue_tokens: int = 16
    target_tokens: int = 64
    data: str | None = None
    limit: int | None = None
    shapes: list[str] = field(default_factory=lambda: ["number7"])
    keys: int = 1

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise RCCError(f"unknown task {self.task!r}; use one of {', '.join(TASK_NAMES)}")
        self.lengths = parse_lengths(self.lengths)
        self.depths = parse_depths(self.depths)
        self.modes = parse_list(self.modes, MODES, "mode")
        self.baselines = parse_baselines(self.baselines)
        if self.kvpress_python:  # checked before the (slow) model load
            from rcc.eval.kvpress import find_python

            find_python(self.kvpress_python)
        if self.llamacpp_python:
            from rcc.eval.llamacpp import find_python as find_llamacpp

            find_llamacpp(self.llamacpp_python)
        self.prompts = parse_list(self.prompts, PROMPTS, "prompt")
        self.shapes = parse_list(self.shapes, NIAH_SHAPES, "value shape")
        if not self.shapes:
            raise RCCError(f"no value shape given; use --shapes with some of {', '.join(NIAH_SHAPES)}")
        if not 1 <= self.keys <= NIAH_MAX_KEYS:
            raise RCCError(f"keys must be from 1 to {NIAH_MAX_KEYS}, got {self.keys}")
        if not self.prompts:
            raise RCCError("no prompt given; use --prompts chat,continuation")
        if not self.modes and self.task != "reconstruct":
            raise RCCError("no instruction mode given; use --modes reconstruct,manual")
        for name in ("samples", "cue_tokens", "target_tokens"):
            if int(getattr(self, name)) < 1:
                raise RCCError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise RCCError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise RCCError(f"limit must be at least 1, got {self.limit}")
        need = {"needle": ("haystack", "needle", "question", "answer"), "reconstruct": ("text",), "qa": ("data",)}
        missing = [f"--{n}" for n in need.get(self.task, ()) if not getattr(self, n)]
        if missing:
            raise RCCError(f"the {self.task} task needs {', '.join(missing)}")
        for name in (*need.get(self.task, ()), *(("haystack",) if self.task == "niah" and self.haystack else ())):
            if name in ("haystack", "text", "data") and not Path(getattr(self, name)).is_file():
                raise RCCError(f"--{name} {getattr(self, name)}: no such file")

    def rng(self, *parts) -> random.Random:
        """A generator seeded by (task, seed, *parts): a sample's keys and offsets
        depend on nothing else (str seeds are hashed with sha512: the same on every
        run and machine)."""
        return random.Random("/".join(map(str, (self.task, self.seed, *parts))))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
