"""Pass-key retrieval (``rcc eval passkey``), the standard prompt of the
long-context literature (Mohtashami & Jaggi 2023, "Landmark Attention";
used by LongLoRA, YaRN and others): an instruction, repeated filler
sentences, one "The pass key is NNNNN. Remember it. NNNNN is the pass key."
at a chosen depth, then the question.

Lengths count the context (instruction + filler + needle) in tokens of the
model's tokenizer; the question comes on top (compressed with the context in
RCC's reconstruct mode, written in the prompt in manual mode). The question
ends in its own cue, so the continuation prompt is the question itself without
the chat template.
"""

from __future__ import annotations

from rcc.data.haystack import PASSKEY_FILLER, PASSKEY_INSTRUCTION, PASSKEY_NEEDLE, PASSKEY_QUESTION, build_haystack
from rcc.eval import metrics
from rcc.eval.config import EvalConfig
from rcc.eval.task import Example, Prediction

NAME = "passkey"
GROUP_BY = ("length", "depth")
METRICS = ("accuracy",)
MAX_NEW_TOKENS = 16

# the prompt's text lives with the haystack builder (rcc synth and rcc bench use it too)
INSTRUCTION, FILLER, NEEDLE, QUESTION = PASSKEY_INSTRUCTION, PASSKEY_FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION


def make_key(cfg: EvalConfig, length: int, depth: float, sample: int) -> str:
    """A 5-digit pass key, a function of (seed, length, depth, sample) only."""
    return str(cfg.rng(length, depth, sample).randint(10000, 99999))


def examples(cfg: EvalConfig, tokenizer) -> list[Example]:
    """One sample per (length, depth, sample index), deterministic by ``cfg.seed``.

    Raises:
        RCCError: when a length cannot hold the instruction and the needle.
    """
    out = []
    for length in cfg.lengths:
        for depth in cfg.depths:
            for s in range(cfg.samples):
                key = make_key(cfg, length, depth, s)
                hs = build_haystack(tokenizer, list(FILLER), NEEDLE.format(key=key), length, depth,
                                    instruction=INSTRUCTION)
                out.append(Example(
                    id=f"len{length}-d{depth:g}-s{s}", context=hs.text, question=QUESTION, continuation=QUESTION,
                    answers=[key],
                    meta={"length": length, "depth": depth, "key": key, "tokens": hs.tokens,
                          "needle_offset": hs.needle_offset, "depth_measured": round(hs.depth, 4)},
                ))
    return out


def score(example: Example, prediction: Prediction) -> dict[str, float]:
    """``accuracy``: the first number of the answer is exactly the pass key."""
    return {"accuracy": metrics.passkey_match(prediction.text, example.meta["key"])}
