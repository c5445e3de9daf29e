"""Synthetic instruction records built from prose (``rcc synth``): teach an
RCC model to find things in long contexts.

Each record has PwC fields (``input``, ``prompt``, ``answer``; see
:func:`rcc.data.qa_fields`) plus ``task`` and ``tokens``, so ``rcc train``'s
``finetune`` stage reads the file as it is. Kinds:

- ``passkey``: the pass-key prompt of :mod:`rcc.data.haystack` (as ``rcc eval passkey``), with a seeded
  5-digit key, hidden in its filler sentences or (half of the time) in prose;
- ``needle``: a templated fact with random names and values hidden in prose,
  and the question about it;
- ``extract``: a prose sentence hidden in other prose; the question gives its
  first words and the answer is how it goes on (the answer is a span of the context);
- ``fact``: a fact whose value is free, not a template's: a sentence or phrase
  from the prose, a full name, a number of 1 to 9 digits (with decimals or
  separators at times), hidden in prose, and the question about it;
- ``multikey``: 2 to 5 labelled pass keys ("The pass key of the red door is
  12345.") in prose or filler; the question asks for one of them;
- ``multineedle``: 2 to 5 ``fact``/``needle`` facts in prose; the question asks for one;
- ``copy``: copy exactly a value the context holds, whatever its shape: a number of 1 to 12
  digits, a UUID, a hex string, a word, a phrase, a full name or a date, under a label
  ("The access code of the east wing is 7f3a9c."), alone or among 1 to 4 distractor labels
  with values of the same shape, sometimes with two values for the asked label; hidden in
  one of five haystacks built here: prose, repeated filler sentences, a numbered list, code
  or a table (:data:`HAYSTACKS`). Its filler sentences are this module's own, not the ones
  ``rcc eval`` uses;
- ``reconstruct``: pre-tokenized (``context_ids``, ``input_ids``, ``labels``):
  compress a stretch of text, then continue a cue taken from it (the stage-1
  objective, as ``rcc eval reconstruct`` asks it);
- ``continue``: pre-tokenized: compress a stretch of text, then write the tokens
  that follow it.

A third of the ``reconstruct`` and ``continue`` texts are number-rich lines
(inventories, timetables, hex codes: digit order matters) instead of prose.

Context lengths are log-uniform in ``[min_tokens, max_tokens]`` (tokens of
the model's tokenizer), depths uniform in [0, 1].
"""

from __future__ import annotations

import json
import math
import random
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from rcc.errors import RCCError
from rcc.data import haystack
from rcc.data.haystack import build_haystack, split_sentences
from rcc.files import atomic_write_text

RECORD_KINDS = ("passkey", "needle", "extract", "fact", "multikey", "multineedle", "copy", "reconstruct", "continue")
CUE_TOKENS = 16
TARGET_TOKENS = 64

NAMES = ("Ada", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kira", "Luca",
         "Maya", "Nils", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe")
THINGS = ("apple", "anchor", "lantern", "violin", "compass", "teapot", "kite", "marble", "ladder", "candle",
          "mirror", "helmet", "basket", "feather", "hammer", "pebble", "ribbon", "saddle", "tulip", "walnut")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white")
CITIES = ("Lisbon", "Oslo", "Kyoto", "Lima", "Nairobi", "Quebec", "Tbilisi", "Hanoi", "Porto", "Dakar",
          "Bergen", "Cusco", "Tallinn", "Valencia", "Zagreb", "Perth", "Bilbao", "Ghent", "Malmo", "Turin")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLACES = ("shed", "attic", "garage", "cellar", "porch", "greenhouse", "barn", "office", "kitchen", "library")

# (needle sentence, question, answer); fields filled by _needle()
TEMPLATES = (
    ("The special magic number for {thing} is {num}.", "What is the special magic number for {thing}?", "{num}"),
    ("{name}'s favourite city is {city}.", "What is {name}'s favourite city?", "{city}"),
    ("The secret word of the {colour} {thing} is {word}.", "What is the secret word of the {colour} {thing}?",
     "{word}"),
    ("The meeting with {name} is on {day}.", "On which day is the meeting with {name}?", "{day}"),
    ("{name} hid the {thing} in the {place}.", "Where did {name} hide the {thing}?", "in the {place}"),
    ("The code to open the {place} is {num}.", "What is the code to open the {place}?", "{num}"),
    ("{name} was born in {city} in {year}.", "In which year was {name} born?", "{year}"),
)


def _needle(rng: random.Random) -> tuple[str, str, str]:
    values = {"thing": rng.choice(THINGS), "num": str(rng.randint(1000, 999999)), "name": rng.choice(NAMES),
              "city": rng.choice(CITIES), "colour": rng.choice(COLOURS), "day": rng.choice(DAYS),
              "place": rng.choice(PLACES), "year": str(rng.randint(1700, 2020)),
              "word": rng.choice(THINGS) + rng.choice(("wood", "stone", "light", "fall", "berry", "field"))}
    return tuple(part.format(**values) for part in rng.choice(TEMPLATES))  # type: ignore[return-value]


SURNAMES = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Kowalski", "Haddad", "Ferreira", "Novak", "Osei",
            "Brennan", "Castillo", "Ivanova", "Mehta", "Schulz", "Dubois", "Nakamura", "Quist", "Varga")
FACT_FORMS = (  # (sentence, question) with {subject} and {value}
    ("The note left on the {subject} reads: {value}", "What does the note left on the {subject} read?"),
    ("The password for the {subject} is {value}.", "What is the password for the {subject}?"),
    ("The person in charge of the {subject} is {value}.", "Who is in charge of the {subject}?"),
    ("The serial number of the {subject} is {value}.", "What is the serial number of the {subject}?"),
    ("According to the log, the {subject} was last seen near {value}.",
     "According to the log, where was the {subject} last seen?"),
)
KEY_LABELS = ("red door", "blue gate", "north tower", "old vault", "east wing", "green locker", "cellar hatch",
              "back office", "main server", "garden shed")


def _number(rng: random.Random) -> str:
    digits = rng.randint(1, 9)
    n = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    style = rng.random()
    if style < 0.15 and digits > 3:
        return f"{int(n):,}"
    if style < 0.3 and digits > 2:
        return f"{n[:-2]}.{n[-2:]}"
    return n


def _free_value(rng: random.Random, sentences: list[str], form: int) -> str:
    """A value that no template fixes: a sentence or phrase of the prose, a full name, a number."""
    if form == 0:
        words = rng.choice(sentences).split()
        return " ".join(words[:rng.randint(4, 12)]).rstrip(".,;:") + "."
    if form == 2:
        return f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    if form == 3:
        return rng.choice(("", "SN-", "#")) + _number(rng)
    words = [w.strip(".,;:()\"'") for w in rng.choice(sentences).split()]
    words = [w for w in words if w] or ["the", "harbour"]
    at = rng.randrange(len(words))
    return " ".join(words[at: at + rng.randint(2, 4)])


def _fact(rng: random.Random, sentences: list[str]) -> tuple[str, str, str]:
    form = rng.randrange(len(FACT_FORMS))
    subject = f"{rng.choice(COLOURS)} {rng.choice(THINGS)}" if rng.random() < 0.5 else rng.choice(PLACES)
    value = _free_value(rng, sentences, form)
    sentence, question = FACT_FORMS[form]
    return sentence.format(subject=subject, value=value), question.format(subject=subject), value.rstrip(".")


VALUE_SHAPES = ("number", "uuid", "hex", "word", "phrase", "name", "date")
HAYSTACKS = ("prose", "filler", "list", "code", "table")
COPY_LABELS = ("access code", "serial number", "contact", "password", "reference", "token", "motto", "tag",
               "deadline", "owner")
COPY_SUBJECTS = KEY_LABELS + ("west archive", "night shift", "blue van", "third floor", "spare key", "boiler room")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
# filler sentences of this module's own (``rcc eval`` uses rcc.data.haystack's): repeated, they make a
# haystack with nothing to find but the needle
COPY_FILLER = ("The clouds drift over the hills and the wind keeps turning the old mill.",
               "Nothing much happens in the valley, and the days pass one after another.",
               "The road bends past the orchard, where the trees stand in quiet rows.")


def shaped_value(rng: random.Random, shape: str, sentences: list[str]) -> str:
    """A random value of ``shape`` (one of :data:`VALUE_SHAPES`); words and phrases come from ``sentences``."""
    if shape == "number":
        digits = rng.randint(1, 12)
        return str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1))
    if shape == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if shape == "hex":
        return "".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(6, 32)))
    if shape == "name":
        return f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    if shape == "date":
        day, month, year = rng.randint(1, 28), rng.randrange(12), rng.randint(1900, 2099)
        return f"{day} {MONTHS[month]} {year}" if rng.random() < 0.5 else f"{year}-{month + 1:02d}-{day:02d}"
    words = [w.strip(".,;:()\"'!?") for w in rng.choice(sentences).split()]
    words = [w for w in words if w.isalpha()] or ["harbour", "lantern", "meadow"]
    if shape == "word":
        return rng.choice(words)
    at = rng.randrange(len(words))
    return " ".join((words * 2)[at: at + rng.randint(2, 6)])


def _haystack_pieces(rng: random.Random, kind: str, prose: list[str], length: int) -> list[str]:
    """Pieces (sentences, or lines that start with a newline) of a ``kind`` haystack
    (:data:`HAYSTACKS`): more than ``length`` tokens hold (prose is cycled by the haystack builder)."""
    count = length // 8 + 16
    if kind == "prose":
        return list(prose)
    if kind == "filler":
        return [COPY_FILLER[i % len(COPY_FILLER)] for i in range(count)]
    return ["\n" + line for line in _lines(rng, kind, prose, count)]


def _lines(rng: random.Random, kind: str, prose: list[str], count: int) -> list[str]:
    if kind == "list":
        return [f"{i + 1}. {rng.choice(COLOURS)} {rng.choice(THINGS)}, {rng.randint(1, 99)} in stock, "
                f"shelf {rng.choice('ABCDEFGH')}{rng.randint(1, 40)}." for i in range(count)]
    if kind == "code":
        return [rng.choice((f"def {rng.choice(THINGS)}_{i}(x):\n    return x * {rng.randint(2, 99)}",
                            f"{rng.choice(THINGS)}_{i} = [{rng.randint(0, 9)}, {rng.randint(10, 99)}]",
                            f"# {rng.choice(prose) if prose else 'a note'}"))
                for i in range(count)]
    return [f"| {rng.choice(NAMES)} | {rng.choice(CITIES)} | {rng.randint(1, 999)} | {rng.choice(DAYS)} |"
            for _ in range(count)]


def _copy(rng: random.Random, sentences: list[str], prose: list[str], length: int) -> tuple[str, str, str, list[str]]:
    """A ``copy`` record's (needle, question, answer, haystack pieces with its distractors)."""
    shape, label = rng.choice(VALUE_SHAPES), rng.choice(COPY_LABELS)
    subjects = rng.sample(COPY_SUBJECTS, rng.randint(1, 5))
    values = [shaped_value(rng, shape, sentences) for _ in subjects]
    asked = 0
    if rng.random() < 0.15:  # two values for the asked label
        values[asked] = f"{values[asked]} and {shaped_value(rng, shape, sentences)}"
    form = rng.randrange(3)

    def sentence(subject: str, value: str) -> str:
        return (f"The {label} of the {subject} is {value}.", f"{subject.capitalize()} {label}: {value}.",
                f"Note that the {label} for the {subject} is {value}.")[form]

    needle = sentence(subjects[asked], values[asked])
    question = f"What is the {label} of the {subjects[asked]}?"
    pieces = _haystack_pieces(rng, rng.choice(HAYSTACKS), prose, length)
    pieces = _with_distractors(rng, pieces, [sentence(s, v) for s, v in zip(subjects[1:], values[1:])], length)
    return needle, question, values[asked], pieces


def _number_lines(rng: random.Random, tokens: int) -> str:
    """Number-rich text of about ``tokens`` tokens: inventories, timetables, codes."""
    lines = []
    while len(lines) * 14 < tokens:
        kind = rng.randrange(3)
        if kind == 0:
            lines.append(f"Item {rng.randint(1000, 99999)}: {rng.randint(1, 999)} units of {rng.choice(THINGS)} "
                         f"at {rng.randint(1, 500)}.{rng.randint(0, 99):02d} each.")
        elif kind == 1:
            lines.append(f"Train {rng.randint(10, 9999)} leaves {rng.choice(CITIES)} at {rng.randint(0, 23):02d}:"
                         f"{rng.randint(0, 59):02d} from platform {rng.randint(1, 24)}.")
        else:
            lines.append(f"Code {rng.randint(0, 0xFFFFFF):06X} maps to {rng.randint(0, 10 ** 6)} "
                         f"({rng.choice(NAMES)}, {rng.randint(1700, 2030)}).")
    return " ".join(lines)


def _text_ids(rng: random.Random, sentences: list[str], tokenizer, tokens: int) -> list[int]:
    """``tokens`` token ids of prose (two thirds) or number-rich lines (one third)."""
    if rng.random() < 1 / 3:
        text = _number_lines(rng, tokens + 64)
    else:
        start = rng.randrange(len(sentences))
        text, n = [], 0
        while n < 6 * tokens + 400:
            text.append(sentences[(start + len(text)) % len(sentences)])
            n += len(text[-1])
        text = " ".join(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def _pretokenized(kind: str, rng: random.Random, sentences: list[str], tokenizer, length: int) -> dict:
    """A ``reconstruct`` or ``continue`` record: ``context_ids [length]``, decoder
    ``input_ids [m]`` and ``labels [m]`` (-100: the cue, not counted)."""
    if kind == "reconstruct":
        ctx = _text_ids(rng, sentences, tokenizer, length)
        at = rng.randrange(length - CUE_TOKENS - TARGET_TOKENS + 1)
        ids = ctx[at: at + CUE_TOKENS + TARGET_TOKENS]
        labels = [-100] * CUE_TOKENS + ids[CUE_TOKENS:]
    else:
        ids_all = _text_ids(rng, sentences, tokenizer, length + TARGET_TOKENS)
        ctx, ids = ids_all[:length], ids_all[length:]
        labels = list(ids)
    return {"context_ids": ctx, "input_ids": ids, "labels": labels}


def read_prose(inputs: list[str]) -> list[str]:
    """Sentences of the UTF-8 text files in ``inputs`` (files or folders,
    searched for ``*.txt``), in a stable order.

    Raises:
        RCCError: when an input is missing or no sentence is found.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.txt") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise RCCError(f"{item}: no such file or folder")
    sentences: list[str] = []
    for path in files:
        try:
            sentences += split_sentences(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise RCCError(f"{path}: not UTF-8 text; convert it or leave it out") from None
    if not sentences:
        raise RCCError(f"no sentences in {', '.join(inputs)}; give UTF-8 prose (*.txt files)")
    return sentences


def make_records(sentences: list[str], tokenizer, *, count: int, weights: dict[str, float], min_tokens: int,
                 max_tokens: int, seed: int = 0) -> Iterator[dict]:
    """``count`` records, a function of the arguments only.

    Args:
        sentences: prose sentences (:func:`read_prose`), the haystacks and the
            extract sentences.
        tokenizer: the model's tokenizer (lengths are counted with it).
        weights: share of each kind in :data:`RECORD_KINDS` (need not sum to 1).
        min_tokens / max_tokens: context length range in tokens.
    """
    rng = random.Random(f"rcc-synth/{seed}")
    kinds = [k for k in RECORD_KINDS if weights.get(k, 0) > 0]
    shares = [weights[k] for k in kinds]
    long_enough = [i for i, s in enumerate(sentences) if 8 <= len(s.split()) <= 60]
    if "extract" in kinds and not long_enough:
        raise RCCError("the prose has no sentence of 8 to 60 words for extract records")
    for n in range(count):
        kind = rng.choices(kinds, shares)[0]
        length = int(round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens)))))
        depth = rng.random()
        if kind in ("reconstruct", "continue"):  # one to two windows' worth of text at most
            length = max(CUE_TOKENS + TARGET_TOKENS, min(length, 2 * min_tokens))
            record = _pretokenized(kind, rng, sentences, tokenizer, length)
            yield {**record, "task": kind, "tokens": length, "id": f"{kind}-{n}"}
            continue
        start = rng.randrange(len(sentences))
        prose = sentences[start: start + length // 6 + 64]  # more than enough sentences; cycled when short
        instruction = ""
        if kind == "passkey":
            key = str(rng.randint(10000, 99999))
            needle, question, answer = haystack.PASSKEY_NEEDLE.format(key=key), haystack.PASSKEY_QUESTION, key
            instruction = haystack.PASSKEY_INSTRUCTION
            if rng.random() < 0.5:
                prose = list(haystack.PASSKEY_FILLER)
        elif kind == "needle":
            needle, question, answer = _needle(rng)
        elif kind == "fact":
            needle, question, answer = _fact(rng, sentences)
        elif kind == "multikey":
            labels = rng.sample(KEY_LABELS, rng.randint(2, 5))
            keys = [str(rng.randint(10000, 99999)) for _ in labels]
            asked = rng.randrange(len(labels))
            needle = f"The pass key of the {labels[asked]} is {keys[asked]}. Remember it."
            question, answer = f"What is the pass key of the {labels[asked]}?", keys[asked]
            prose = list(haystack.PASSKEY_FILLER) if rng.random() < 0.5 else list(prose)
            prose = _with_distractors(rng, prose, [f"The pass key of the {lab} is {key}."
                                                   for i, (lab, key) in enumerate(zip(labels, keys)) if i != asked], length)
        elif kind == "copy":
            needle, question, answer, prose = _copy(rng, sentences, list(prose), length)
        elif kind == "multineedle":
            facts = [_fact(rng, sentences) if rng.random() < 0.6 else _needle(rng) for _ in range(rng.randint(2, 5))]
            needle, question, answer = facts[0]
            prose = _with_distractors(rng, list(prose), [f[0] for f in facts[1:]], length)
        else:
            words = sentences[rng.choice(long_enough)].split()
            cue = rng.randint(3, 6)
            needle = " ".join(words)
            question = f'In the text, how does the sentence that begins "{" ".join(words[:cue])}" go on?'
            answer = " ".join(words[cue: cue + 12])
        try:
            hs = build_haystack(tokenizer, prose, needle, length, depth, instruction=instruction)
        except RCCError:  # a length too short for this needle: take the shortest that holds it
            hs = build_haystack(tokenizer, prose, needle, max(length, 4 * min_tokens), depth, instruction=instruction)
        yield {"input": hs.text, "prompt": question, "answer": answer, "task": kind, "tokens": hs.tokens,
               "depth": round(hs.depth, 4), "id": f"{kind}-{n}"}


def _with_distractors(rng: random.Random, prose: list[str], sentences: list[str], length: int) -> list[str]:
    """``prose``, cycled to more sentences than ``length`` tokens hold, with each of
    ``sentences`` inserted at a seeded place among those a ``length``-token haystack uses."""
    want = length // 3 + 16
    prose = (list(prose) * (want // max(1, len(prose)) + 1))[:max(want, len(prose))]
    for sentence in sentences:
        prose.insert(rng.randrange(max(1, length // 40)), sentence)
    return prose


def parse_weights(text: str) -> dict[str, float]:
    """``"passkey=0.4,needle=0.35,extract=0.25"`` -> a dict.

    Raises:
        RCCError: on an unknown kind or a value that is not a non-negative number.
    """
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if name not in RECORD_KINDS:
            raise RCCError(f"unknown record kind {name!r} in --kinds; choose from {', '.join(RECORD_KINDS)}")
        try:
            out[name] = float(value) if sep else 1.0
        except ValueError:
            raise RCCError(f"--kinds: {item!r} is not KIND=SHARE (e.g. passkey=0.5)") from None
        if out[name] < 0:
            raise RCCError(f"--kinds: the share of {name} must not be negative")
    if not any(out.values()):
        raise RCCError("--kinds gives no kind a positive share")
    return out


def write_records(path: str | Path, records) -> int:
    """Write records as JSONL, atomically; returns how many."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return len(lines)
