"""Reconstruction (``rcc eval reconstruct``): compress a stretch of held-out
text, give the decoder the first ``cue_tokens`` of a span of it and ask it to
write the next ``target_tokens`` (the stage-1 objective, docs/method.md section 3: a
span copied from the encoded text, its first 10-20 tokens act as a cue).
Scored by BLEU-4 (sacrebleu) of the decoded text and by the exact-prefix
length in tokens, by context length.
"""

from __future__ import annotations

import logging

from rcc.errors import RCCError
from rcc.files import read_text
from rcc.eval import metrics
from rcc.eval.config import EvalConfig
from rcc.eval.task import Example, Prediction

log = logging.getLogger(__name__)

NAME = "reconstruct"
GROUP_BY = ("length",)
METRICS = ("bleu4", "exact_prefix")


def examples(cfg: EvalConfig, tokenizer) -> list[Example]:
    """``cfg.samples`` stretches of ``length`` tokens per length, each at a seeded
    offset of the text, with a seeded span of ``cue_tokens + target_tokens`` in it.

    Raises:
        RCCError: when the text cannot be read or a length cannot hold the span.
    """
    ids = tokenizer(read_text(cfg.text), add_special_tokens=False)["input_ids"]
    span = cfg.cue_tokens + cfg.target_tokens
    out = []
    for length in cfg.lengths:
        if length < span:
            raise RCCError(f"length {length} cannot hold the cue and the target ({span} tokens); "
                           "use longer lengths or smaller --cue-tokens/--target-tokens")
        repeats = length / len(ids)
        if repeats > 1:
            log.warning("the text (%s, %d tokens) is shorter than %d tokens: it is repeated", cfg.text, len(ids), length)
        for s in range(cfg.samples):
            rng = cfg.rng(length, s)
            if len(ids) > length:
                start = rng.randrange(len(ids) - length + 1)
                chunk = ids[start : start + length]
            else:
                start, chunk = 0, (ids * (int(repeats) + 1))[:length]
            at = rng.randrange(length - span + 1)
            target = chunk[at + cfg.cue_tokens : at + span]
            out.append(Example(
                id=f"len{length}-s{s}", context_ids=chunk, prompt_ids=chunk[at : at + cfg.cue_tokens],
                target_ids=target, answers=[tokenizer.decode(target)],
                meta={"length": length, "tokens": length, "text_offset": start, "span_start": at,
                      "source_repeats": round(max(repeats, 1.0), 3)},
            ))
    return out


def score(example: Example, prediction: Prediction) -> dict[str, float]:
    """``bleu4`` of the decoded continuation against the reference span (0..100);
    ``exact_prefix``: leading tokens equal to the reference."""
    return {
        "bleu4": metrics.bleu4(prediction.text, example.answers[0]),
        "exact_prefix": float(metrics.exact_prefix(prediction.token_ids, example.target_ids)),
    }
