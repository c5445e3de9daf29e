"""The evaluation config (one dataclass, validated on creation) and the
parsers of ``--lengths 4k,32k,1m`` and ``--depths 0,0.5,1``."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RCCError
from ..io import parse_length, parse_lengths  # noqa: F401  (re-exported: rcc.eval's API)
from ..prompts import MODES
from ..synth import VALUE_SHAPES

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
    from .kvpress import parse_spec

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
        modes: RCC instruction modes run on question tasks (spec section 2).
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
            from .kvpress import find_python

            find_python(self.kvpress_python)
        if self.llamacpp_python:
            from .llamacpp import find_python as find_llamacpp

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

    @classmethod
    def from_args(cls, args) -> "EvalConfig":
        """The config of parsed ``rcc eval TASK`` options (:func:`add_arguments`).

        Raises:
            RCCError: on bad values.
        """
        from .kvpress import DEFAULT_PRESSES

        task_defaults = {"max_new_tokens": None, "haystack": None, "needle": None, "question": None, "answer": None,
                         "cue": None, "text": None, "cue_tokens": 16, "target_tokens": 64, "data": None, "limit": None,
                         "shapes": "number7", "keys": 1}
        opts = {k: getattr(args, k, v) for k, v in task_defaults.items()}
        baselines = args.baselines or ""
        if args.baseline:
            baselines = ",".join(["full", "recent", *(f"kvpress:{p}" for p in DEFAULT_PRESSES), baselines])
        return cls(task=args.task, lengths=getattr(args, "lengths", "4k"), depths=getattr(args, "depths", "0"),
                   modes=getattr(args, "modes", "reconstruct,manual"), samples=getattr(args, "samples", 1),
                   seed=args.seed, baselines=baselines, prompts=getattr(args, "prompts", ",".join(PROMPTS)),
                   kvpress_python=args.kvpress_python, llamacpp_python=getattr(args, "llamacpp_python", None),
                   window_batch_size=args.window_batch_size, **opts)


def _common(p, lengths: str | None, modes: bool = True) -> None:
    from ..loading import add_model_arguments

    add_model_arguments(p)
    if lengths:
        p.add_argument("--lengths", default=lengths, help=f"context lengths in tokens, k/m suffixes (default {lengths})")
        p.add_argument("--samples", type=int, default=1, help="samples per length (and depth) (default 1)")
    if modes:
        p.add_argument("--modes", default="reconstruct,manual", help="RCC instruction modes (default both)")
        p.add_argument("--max-new-tokens", type=int, help="the answer's token budget (default: the task's)")
        p.add_argument("--prompts", default=",".join(PROMPTS),
                       help="prompts every method answers with: chat and/or continuation (default both; "
                            "the table reports each method at its better one)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the baselines full, recent, kvpress:snapkv and kvpress:expected_attention "
                        "(at the model's ratio) on the same samples")
    p.add_argument("--baselines", help="baselines to run: full, recent, llamacpp, kvpress:PRESS@RATIO (e.g. "
                                       "full,recent,kvpress:snapkv@16,kvpress:expected_attention@32)")
    p.add_argument("--kvpress-python", help="python of the kvpress environment (default: ${RCC_KVPRESS_PYTHON}, "
                                            "else .venv-kvpress made by scripts/kvpress_env.sh)")
    p.add_argument("--llamacpp-python", help="python of the llama-cpp-python environment of the llamacpp baseline "
                                             "(default: ${RCC_LLAMACPP_PYTHON}, else .venv-llamacpp made by "
                                             "scripts/llamacpp_env.sh)")
    p.add_argument("--seed", type=int, default=0, help="seed of keys, offsets and spans (default 0)")
    p.add_argument("-o", "--output", help="JSON result file (default runs/eval-TASK.json)")
    p.add_argument("--plot", help="PNG file (default: beside the JSON)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


def add_arguments(p) -> None:
    """``rcc eval TASK``'s options: the fields of :class:`EvalConfig` (see :meth:`EvalConfig.from_args`)
    and the model's (:func:`rcc.loading.add_model_arguments`)."""
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    depths = ("--depths", "0,0.25,0.5,0.75,1")
    t = sub.add_parser("passkey", help="pass-key retrieval at context lengths x depths")
    _common(t, "4k")
    t.add_argument(depths[0], default=depths[1], help=f"needle depths in [0, 1] (default {depths[1]})")
    t = sub.add_parser("needle", help="a needle sentence hidden in your own haystack text")
    _common(t, "4k")
    t.add_argument(depths[0], default=depths[1], help=f"needle depths in [0, 1] (default {depths[1]})")
    t.add_argument("--haystack", required=True, help="UTF-8 text file to hide the needle in")
    t.add_argument("--needle", required=True, help="the sentence to hide, e.g. 'The secret number is 42.'")
    t.add_argument("--question", required=True, help="the question about it")
    t.add_argument("--answer", required=True, help="the expected answer")
    t.add_argument("--cue", help="the continuation prompt's cue after the question (default: the needle up to "
                                 "the answer, e.g. 'The secret number is')")
    t = sub.add_parser("niah", help="values of any shape (7-digit numbers, UUIDs, names ...) among distractor keys, "
                                    "the long-context suite's needle task")
    _common(t, "4k")
    t.add_argument(depths[0], default=depths[1], help=f"needle depths in [0, 1] (default {depths[1]})")
    t.add_argument("--shapes", default="number7", help="value shapes, comma-separated: number7, number, uuid, hex, "
                                                       "word, phrase, name, date (default number7)")
    t.add_argument("--keys", type=int, default=1, help="labelled needles per sample: the asked one and KEYS-1 "
                                                       "distractors (default 1)")
    t.add_argument("--haystack", help="UTF-8 text whose sentences make the haystack (default: repeated filler)")
    t = sub.add_parser("reconstruct", help="reproduce compressed held-out text: BLEU-4 and exact prefix")
    _common(t, "1k,4k", modes=False)
    t.add_argument("--text", required=True, help="UTF-8 held-out text file")
    t.add_argument("--cue-tokens", type=int, default=16, help="tokens of the span given as the cue (default 16)")
    t.add_argument("--target-tokens", type=int, default=64, help="tokens to reproduce after the cue (default 64)")
    t = sub.add_parser("qa", help="questions from a JSONL file (PwC fields input, prompt, answer)")
    _common(t, None)
    t.add_argument("--data", required=True, help="JSONL file with input, prompt, answer")
    t.add_argument("--limit", type=int, help="only the first N samples")
