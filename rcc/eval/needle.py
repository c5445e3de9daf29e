"""Needle in a haystack: a user's needle sentence hidden at a chosen depth of a
user's text, then a question about it (``rcc eval needle``).

:func:`build_haystack` is shared with the pass-key task (whose haystack is
repeated filler): it cuts the haystack into sentences, takes as many as fit
the requested length in tokens of the model's tokenizer (cycling through the
text when it is shorter, which is logged and recorded), and inserts the
needle at the sentence boundary nearest to the requested depth.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass

from ..errors import RCCError
from . import metrics
from .config import EvalConfig
from .task import Example, Prediction

log = logging.getLogger(__name__)

NAME = "needle"
GROUP_BY = ("length", "depth")
METRICS = ("accuracy", "exact_match", "f1")
MAX_NEW_TOKENS = 32


@dataclass
class Haystack:
    """A context with a needle, measured with the tokenizer.

    Attributes:
        text: instruction + haystack sentences with the needle inserted.
        tokens: tokens of ``text``.
        needle_offset: tokens of ``text`` before the needle.
        haystack_tokens: tokens of the haystack sentences alone.
        depth: measured depth: haystack tokens before the needle / ``haystack_tokens``.
        source_repeats: how many times the haystack source was used (> 1: it was cycled).
    """

    text: str
    tokens: int
    needle_offset: int
    haystack_tokens: int
    depth: float
    source_repeats: float


def split_sentences(text: str) -> list[str]:
    """Cut prose after ., ! or ? followed by white space; every piece after the
    first keeps its leading white space, so ``"".join(pieces) == text``."""
    return [p for p in re.split(r"(?<=[.!?])(?=\s)", text) if p.strip()]


def _count(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def build_haystack(tokenizer, pieces: list[str], needle: str, length: int, depth: float,
                   instruction: str = "", start: int = 0) -> Haystack:
    """Fill ``length`` tokens with ``instruction``, haystack pieces and the needle at ``depth``.

    Args:
        tokenizer: the model's tokenizer; lengths are counted with it.
        pieces: haystack sentences, used in order from ``start``, cycling.
        needle: the sentence to hide.
        length: target context length in tokens; the result is at most one
            sentence shorter (sentences are never cut).
        depth: 0 = the needle right after the instruction, 1 = after the last sentence.
        instruction: text before the haystack (not counted in the depth).
        start: index of the first piece (different samples read different text).
    Raises:
        RCCError: when ``length`` cannot hold the instruction and the needle,
        or the haystack is empty.
    """
    pieces = [p if p[:1].isspace() else " " + p for p in pieces if p.strip()]
    if not pieces:
        raise RCCError("the haystack has no text; give a file with some sentences")
    needle_piece = " " + needle.strip()
    fixed_instr = _count(tokenizer, [instruction])[0] if instruction else 0
    fixed = fixed_instr + _count(tokenizer, [needle_piece])[0]
    budget = length - fixed
    if budget < 0:
        raise RCCError(f"length {length} is shorter than the instruction and the needle ({fixed} tokens); use a longer length")
    counts = [max(1, c) for c in _count(tokenizer, pieces)]
    chosen: list[int] = []
    total, i = 0, start % len(pieces)
    while total + counts[i] <= budget:  # a sentence that does not fit ends the haystack
        chosen.append(i)
        total += counts[i]
        i = (i + 1) % len(pieces)
    cum = [0]
    for j in chosen:
        cum.append(cum[-1] + counts[j])
    target = depth * total
    k = min(range(len(cum)), key=lambda j: (abs(cum[j] - target), j))
    before = instruction + "".join(pieces[j] for j in chosen[:k])
    text = before + needle_piece + "".join(pieces[j] for j in chosen[k:])
    if not instruction:
        text, before = text.lstrip(), before.lstrip()
    n_text, n_before = _count(tokenizer, [text, before])
    n_needle = _count(tokenizer, [needle_piece])[0]
    hay = max(n_text - fixed_instr - n_needle, 0)
    source = sum(counts)
    return Haystack(
        text=text,
        tokens=n_text,
        needle_offset=n_before,
        haystack_tokens=hay,
        depth=(n_before - fixed_instr) / hay if hay else depth,
        source_repeats=total / source if source else 0.0,
    )


def _rng(cfg: EvalConfig, *parts) -> random.Random:
    # str seeds are hashed with sha512: the same on every run and machine
    return random.Random("/".join(map(str, (cfg.task, cfg.seed, *parts))))


def examples(cfg: EvalConfig, tokenizer) -> list[Example]:
    """One sample per (length, depth, sample index); each sample starts
    reading the haystack at a seeded sentence.

    Raises:
        RCCError: when the haystack file cannot be read or a length is too short.
    """
    from ..cli import read_text

    pieces = split_sentences(read_text(cfg.haystack))
    out = []
    for length in cfg.lengths:
        for depth in cfg.depths:
            for s in range(cfg.samples):
                start = _rng(cfg, length, depth, s).randrange(len(pieces)) if cfg.samples > 1 else 0
                hs = build_haystack(tokenizer, pieces, cfg.needle, length, depth, start=start)
                if hs.source_repeats > 1:
                    log.warning("the haystack (%s) is shorter than %d tokens: its text was repeated %.1f times",
                                cfg.haystack, length, hs.source_repeats)
                out.append(Example(
                    id=f"len{length}-d{depth:g}-s{s}", context=hs.text, question=cfg.question, answers=[cfg.answer],
                    meta={"length": length, "depth": depth, "tokens": hs.tokens, "needle_offset": hs.needle_offset,
                          "depth_measured": round(hs.depth, 4), "source_repeats": round(hs.source_repeats, 3)},
                ))
    return out


def score(example: Example, prediction: Prediction) -> dict[str, float]:
    """``accuracy``: the answer occurs in the prediction (normalised string match);
    ``exact_match`` and ``f1`` as in SQuAD."""
    return {
        "accuracy": metrics.contains(prediction.text, example.answers),
        "exact_match": metrics.exact_match(prediction.text, example.answers),
        "f1": metrics.token_f1(prediction.text, example.answers),
    }
