"""The evaluation config (one dataclass, validated on creation) and the
parsers of ``--lengths 4k,32k,1m`` and ``--depths 0,0.5,1``."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RCCError
from ..prompts import MODES

TASK_NAMES = ("passkey", "needle", "reconstruct", "qa")  # the modules are rcc.eval.runner.TASKS
BASELINES = ("full", "recent", "kvpress")
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(text: str | int) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500 tokens (1k = 1024).

    Raises:
        RCCError: when not a positive number with an optional k/m suffix.
    """
    if isinstance(text, int):
        value = text
    else:
        m = _LENGTH.match(str(text))
        if not m:
            raise RCCError(f"bad length {text!r}: give a number of tokens with an optional k or m suffix, e.g. 4k, 32k, 1m")
        value = int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()])
    if value <= 0:
        raise RCCError(f"bad length {text!r}: must be at least one token")
    return value


def parse_lengths(text: str | list) -> list[int]:
    """A comma-separated list of lengths, e.g. ``"4k,32k,128k,1m"``, in the given order.

    Raises:
        RCCError: on an empty list or a bad item.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [parse_length(x) for x in items if str(x).strip()]
    if not out:
        raise RCCError("no lengths given; e.g. --lengths 4k,32k")
    return out


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
        modes: RCC instruction modes run on question tasks (spec section 2).
        samples: samples per (length, depth) cell (passkey, needle, reconstruct).
        seed: makes pass keys, text offsets and spans reproducible.
        max_new_tokens: the answer's budget; in reconstruct mode the decoder
            first writes the question back, whose tokens are added on top.
            None: the task's default.
        baselines: any of ``full`` (the uncompressed decoder, cut in the middle
            to its maximum positions), ``recent`` (the decoder with RCC's KV
            budget, n/r positions, keeping the most recent tokens) and
            ``kvpress`` (a kvpress press at compression ratio 1 - 1/r).
        kvpress_press: the kvpress class used by the ``kvpress`` baseline.
        window_batch_size: windows RCC encodes per step.
        haystack, needle, question, answer: the needle task's inputs (a text
            file path and three strings).
        text: a UTF-8 text file of held-out text (reconstruct).
        cue_tokens, target_tokens: the reconstruct task's prompt and reference span.
        data: a JSONL file with ``input``, ``prompt``, ``answer`` (qa).
        limit: use only the first ``limit`` samples of ``data``.

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
    kvpress_press: str = "KnormPress"
    window_batch_size: int | None = 8
    haystack: str | None = None
    needle: str | None = None
    question: str | None = None
    answer: str | None = None
    text: str | None = None
    cue_tokens: int = 16
    target_tokens: int = 64
    data: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise RCCError(f"unknown task {self.task!r}; use one of {', '.join(TASK_NAMES)}")
        self.lengths = parse_lengths(self.lengths)
        self.depths = parse_depths(self.depths)
        self.modes = parse_list(self.modes, MODES, "mode")
        self.baselines = parse_list(self.baselines, BASELINES, "baseline")
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
        for name in need.get(self.task, ()):
            if name in ("haystack", "text", "data") and not Path(getattr(self, name)).is_file():
                raise RCCError(f"--{name} {getattr(self, name)}: no such file")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
