"""Haystacks: a needle sentence hidden at a chosen depth of filler or prose,
measured in tokens of the model's tokenizer. Shared by the evaluation
(``rcc eval passkey`` / ``needle``), ``rcc synth`` and ``rcc bench``.

:func:`build_haystack` cuts the text into sentences, takes as many as fit
the requested length (cycling through the text when it is shorter, which is
recorded), and inserts the needle at the sentence boundary nearest to the
requested depth. The pass-key prompt (Mohtashami & Jaggi 2023, "Landmark
Attention"; used by LongLoRA, YaRN and others) is defined here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rcc.errors import RCCError

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = (
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


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
