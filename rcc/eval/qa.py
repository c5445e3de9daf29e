"""Question answering (``rcc eval qa``) on a JSONL file with the PwC field
names: ``input`` (the context), ``prompt`` (the question) and ``answer`` (a
string or a list of acceptable strings). Scored by exact match, token F1 and
ROUGE-L, in both instruction modes.
"""

from __future__ import annotations

import json
from pathlib import Path

from rcc.errors import RCCError
from rcc.eval import metrics
from rcc.eval.config import EvalConfig
from rcc.eval.task import Example, Prediction

NAME = "qa"
GROUP_BY: tuple[str, ...] = ()
METRICS = ("exact_match", "f1", "rouge_l")
MAX_NEW_TOKENS = 64


def read_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """The samples of a PwC-style JSONL file (blank lines skipped).

    Raises:
        RCCError: naming the line, on bad JSON, a missing or empty field, or no samples.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RCCError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RCCError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RCCError(f"{path}:{n}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict):
            raise RCCError(f"{path}:{n}: expected a JSON object with input, prompt and answer")
        for key in ("input", "prompt", "answer"):
            if key not in row:
                raise RCCError(f"{path}:{n}: missing field {key!r} (PwC format: input, prompt, answer)")
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        if not all(isinstance(a, str) for a in answers) or not any(a.strip() for a in answers):
            raise RCCError(f"{path}:{n}: 'answer' must be a non-empty string or a list of strings")
        if not isinstance(row["input"], str) or not row["input"].strip():
            raise RCCError(f"{path}:{n}: 'input' (the context) is empty")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise RCCError(f"{path}:{n}: 'prompt' (the question) is empty")
        rows.append({"line": n, "input": row["input"], "prompt": row["prompt"], "answers": answers})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise RCCError(f"{path}: no samples")
    return rows


def examples(cfg: EvalConfig, tokenizer) -> list[Example]:
    """One sample per JSONL line (the first ``cfg.limit``)."""
    rows = read_jsonl(cfg.data, cfg.limit)
    counts = [len(x) for x in tokenizer([r["input"] for r in rows], add_special_tokens=False)["input_ids"]]
    return [
        Example(id=f"line{r['line']}", context=r["input"], question=r["prompt"], answers=r["answers"],
                meta={"line": r["line"], "tokens": n})
        for r, n in zip(rows, counts)
    ]


def score(example: Example, prediction: Prediction) -> dict[str, float]:
    """SQuAD exact match and token F1, ROUGE-L F-measure (all 0..1, best over answers)."""
    return {
        "exact_match": metrics.exact_match(prediction.text, example.answers),
        "f1": metrics.token_f1(prediction.text, example.answers),
        "rouge_l": metrics.rouge_l(prediction.text, example.answers),
    }
