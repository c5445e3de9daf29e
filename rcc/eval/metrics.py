"""Scores of the evaluation tasks, each a plain function of strings or token ids.

- ``exact_match`` and ``token_f1``: SQuAD's definitions (lower case, no
  punctuation, no articles, collapsed white space), maximised over references.
- ``rouge_l``: ROUGE-L F-measure from ``rouge-score``.
- ``bleu4``: sentence-level BLEU-4 from ``sacrebleu`` (0..100).
- ``exact_prefix``: how many leading tokens of a generation equal the reference.
- ``passkey_match``: the first number of the answer equals the pass key.

``rouge-score`` and ``sacrebleu`` come with ``pip install rcc-llm[eval]``.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

from rcc.errors import RCCError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
_NUMBER = re.compile(r"\d+")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _refs(answers: str | Sequence[str]) -> list[str]:
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise RCCError("a sample has no reference answer; give at least one")
    return refs


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _refs(answers)))


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD token F1 of the normalised words, the best over references (0..1).

    Both empty counts as 1.0, exactly one empty as 0.0.
    """
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(a).split()) for a in _refs(answers))


def contains(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when a normalised reference occurs in the normalised prediction
    (the "string match" of needle-in-a-haystack benchmarks such as RULER)."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(a)} " in pred for a in _refs(answers) if normalize_answer(a)))


_ROUGE = None


def rouge_l(prediction: str, answers: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (``rouge-score``, no stemming), the best over references (0..1).

    Raises:
        RCCError: when ``rouge-score`` is not installed.
    """
    global _ROUGE
    if _ROUGE is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise RCCError("ROUGE-L needs the rouge-score package: pip install 'rcc-llm[eval]'") from None
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return max(_ROUGE.score(a, prediction)["rougeL"].fmeasure for a in _refs(answers))


def bleu4(prediction: str, reference: str) -> float:
    """Sentence-level BLEU-4 of ``sacrebleu`` (13a tokenisation, exp smoothing), 0..100.

    Raises:
        RCCError: when ``sacrebleu`` is not installed.
    """
    try:
        import sacrebleu
    except ImportError:
        raise RCCError("BLEU needs the sacrebleu package: pip install 'rcc-llm[eval]'") from None
    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def exact_prefix(prediction_ids: Sequence[int], reference_ids: Sequence[int]) -> int:
    """Number of leading positions where the generated ids equal the reference ids."""
    n = 0
    for a, b in zip(prediction_ids, reference_ids):
        if int(a) != int(b):
            break
        n += 1
    return n


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (None when there is none)."""
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def passkey_match(prediction: str, key: str) -> float:
    """1.0 when the first number in the answer is exactly the pass key.

    Stricter than "the key occurs somewhere": a model that lists several
    numbers, or the key with an extra digit, gets 0.
    """
    return float(first_number(prediction) == str(key))


def copy_match(prediction: str, value: str) -> float:
    """1.0 when the answer holds ``value`` exactly as written (case and punctuation inside it
    kept), not as part of a longer word or number: "4430567" matches "It is 4430567." but not
    "44305678" or "443056"; for a number, the first number of the answer must be it (as
    :func:`passkey_match`), so listing several numbers scores 0."""
    if value.isdigit():
        return passkey_match(prediction, value)
    at = prediction.find(value)
    while at >= 0:
        before = prediction[at - 1] if at > 0 else " "
        after = prediction[at + len(value)] if at + len(value) < len(prediction) else " "
        if not (before.isalnum() or after.isalnum()):
            return 1.0
        at = prediction.find(value, at + 1)
    return 0.0


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a rate of ``successes`` in ``n`` (95% by default): unlike the
    normal approximation it stays inside [0, 1] and is honest at 0/n and n/n (Wilson 1927)."""
    if n <= 0:
        raise ValueError("an interval needs at least one sample")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
