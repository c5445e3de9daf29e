"""Needle in a haystack: a user's needle sentence hidden at a chosen depth of a
user's text, then a question about it (``rcc eval needle``). The haystack is
built by :func:`rcc.data.haystack.build_haystack`, shared with the pass-key task,
``rcc synth`` and ``rcc bench``.
"""

from __future__ import annotations

import logging

from rcc.data.haystack import build_haystack, split_sentences
from rcc.files import read_text
from rcc.eval import metrics
from rcc.eval.config import EvalConfig
from rcc.eval.task import Example, Prediction

log = logging.getLogger(__name__)

NAME = "needle"
GROUP_BY = ("length", "depth")
METRICS = ("accuracy", "exact_match", "f1")
MAX_NEW_TOKENS = 32


def continuation(cfg: EvalConfig) -> str:
    """The continuation prompt's text: the question, then a cue the answer
    continues: ``cfg.cue``, else the needle up to the answer ("The secret
    ingredient of the cake is" for "The secret ingredient of the cake is
    cardamom."), else ``"Answer:"``."""
    cue = cfg.cue
    if not cue:
        at = cfg.needle.lower().find(cfg.answer.lower().strip())
        cue = cfg.needle[:at].strip() if at > 0 else "Answer:"
    return f"{cfg.question.strip()} {cue.strip()}"


def examples(cfg: EvalConfig, tokenizer) -> list[Example]:
    """One sample per (length, depth, sample index); each sample starts
    reading the haystack at a seeded sentence.

    Raises:
        RCCError: when the haystack file cannot be read or a length is too short.
    """
    pieces = split_sentences(read_text(cfg.haystack))
    cont = continuation(cfg)
    out = []
    for length in cfg.lengths:
        for depth in cfg.depths:
            for s in range(cfg.samples):
                start = cfg.rng(length, depth, s).randrange(len(pieces)) if cfg.samples > 1 else 0
                hs = build_haystack(tokenizer, pieces, cfg.needle, length, depth, start=start)
                if hs.source_repeats > 1:
                    log.warning("the haystack (%s) is shorter than %d tokens: its text was repeated %.1f times",
                                cfg.haystack, length, hs.source_repeats)
                out.append(Example(
                    id=f"len{length}-d{depth:g}-s{s}", context=hs.text, question=cfg.question, continuation=cont,
                    answers=[cfg.answer],
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
