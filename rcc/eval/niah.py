"""Needle in a haystack with values of any shape (``rcc eval niah``), as the standard
long-context suite's single- and multi-key tasks pose it (RULER, Hsieh et al. 2024: "One of the
special magic numbers for {key} is: {value}." in repeated filler sentences), and beyond its
7-digit numbers: the value can be any shape :func:`rcc.data.synth.shaped_value` makes (a UUID, a hex
string, a word, a phrase, a name, a date, a number of 1 to 12 digits).

A sample hides ``keys`` labelled needles (one asked, the others distractors with values of the
same shape) in the haystack, the asked one at the sample's depth and the others at seeded places;
the question asks for the asked key's value. The haystack is this task's own filler (RULER's
noise sentences; ``rcc synth`` trains on other sentences, so a model is never evaluated on the
text it was trained on) or, with ``--haystack FILE``, the sentences of a text.

Cells: ``shape@length`` x depth. ``accuracy`` is an exact copy (:func:`rcc.eval.metrics.copy_match`).
"""

from __future__ import annotations

from rcc.data.haystack import build_haystack, split_sentences
from rcc.files import read_text
from rcc.data.synth import shaped_value
from rcc.eval import metrics
from rcc.eval.config import NIAH_MAX_KEYS, NIAH_SHAPES, EvalConfig
from rcc.eval.task import Example, Prediction

NAME = "niah"
GROUP_BY = ("cell", "depth")
METRICS = ("accuracy",)
MAX_NEW_TOKENS = 32
SHAPES = NIAH_SHAPES
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_WORDS = ("abundant", "brittle", "cautious", "delirious", "elastic", "fragrant", "gleaming", "hollow", "itchy",
             "jubilant", "knotty", "luminous", "mellow", "nimble", "obsolete", "placid", "quaint", "rustic",
             "shallow", "tranquil", "unruly", "vivid", "wistful", "zealous")
# sentences of a neutral text for the word and phrase shapes (never the haystack's)
_WORD_SOURCE = ["Maps of the northern coast show small harbours, steep cliffs and a lighthouse on every cape.",
                "Farmers in the valley grow barley, apples and hops, and sell them at the autumn market."]
assert len(KEY_WORDS) == NIAH_MAX_KEYS
_NOUNS = {"number7": "number", "number": "number", "uuid": "uuid", "hex": "code", "word": "word",
          "phrase": "phrase", "name": "name", "date": "date"}


def value(shape: str, rng) -> str:
    """A value of ``shape`` (:data:`SHAPES`)."""
    if shape == "number7":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    return shaped_value(rng, shape, _WORD_SOURCE)


def needle(shape: str, key: str, val: str) -> str:
    return f"One of the special magic {_NOUNS[shape]}s for {key} is: {val}."


def examples(cfg: EvalConfig, tokenizer) -> list[Example]:
    """One sample per (shape, length, depth, sample index), deterministic by ``cfg.seed``.

    Raises:
        RCCError: when a length cannot hold the needles, or the haystack file cannot be read.
    """
    pieces = split_sentences(read_text(cfg.haystack)) if cfg.haystack else list(FILLER)
    sample = pieces[:200]
    per_piece = max(1.0, len(tokenizer(" ".join(sample), add_special_tokens=False)["input_ids"]) / len(sample))
    out = []
    for shape in cfg.shapes:
        for length in cfg.lengths:
            for depth in cfg.depths:
                for s in range(cfg.samples):
                    rng = cfg.rng(shape, length, depth, s)
                    keys = rng.sample(KEY_WORDS, cfg.keys)
                    values = [value(shape, rng) for _ in keys]
                    while len(set(values)) < len(values):  # distractors never share the asked value
                        values = [value(shape, rng) for _ in keys]
                    start = rng.randrange(len(pieces)) if cfg.haystack else 0
                    # the pieces a length-token haystack holds, and some: none is cycled back in, so
                    # each distractor occurs once, at a seeded place inside the context
                    needles = [needle(shape, k, v) for k, v in zip(keys, values)]
                    room = length - len(tokenizer(" ".join(needles), add_special_tokens=False)["input_ids"])
                    fit = max(1, int(room / per_piece))
                    hay = [pieces[(start + i) % len(pieces)] for i in range(fit + 8)]
                    for text in needles[1:]:  # inside the first 90% of what fits: never cut off the end
                        hay.insert(rng.randrange(max(1, int(0.9 * fit))), text)
                    hs = build_haystack(tokenizer, hay, needles[0], length, depth)
                    noun = _NOUNS[shape]
                    question = f"What is the special magic {noun} for {keys[0]} mentioned in the provided text?"
                    out.append(Example(
                        id=f"{shape}-len{length}-d{depth:g}-s{s}", context=hs.text, question=question,
                        continuation=f"{question} The special magic {noun} for {keys[0]} mentioned in the "
                                     "provided text is",
                        answers=[values[0]],
                        meta={"cell": f"{shape}@{length}", "shape": shape, "length": length, "depth": depth,
                              "keys": cfg.keys, "value": values[0], "tokens": hs.tokens,
                              "needle_offset": hs.needle_offset, "depth_measured": round(hs.depth, 4),
                              "distractors_in_context": sum(needle(shape, k, v) in hs.text
                                                            for k, v in zip(keys[1:], values[1:]))},
                    ))
    return out


def score(example: Example, prediction: Prediction) -> dict[str, float]:
    """``accuracy``: the answer holds the asked value exactly (:func:`rcc.eval.metrics.copy_match`)."""
    return {"accuracy": metrics.copy_match(prediction.text, example.meta["value"])}
