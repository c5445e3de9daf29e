"""The tiny interface every evaluation task implements, and its two records.

A task is a module with:

- ``NAME``: the command name (``rcc eval NAME``);
- ``GROUP_BY``: the ``Example.meta`` keys its summary is grouped by (e.g. ``("length", "depth")``);
- ``METRICS``: the score names, the first being the headline;
- ``examples(cfg, tokenizer) -> list[Example]``;
- ``score(example, prediction) -> dict[str, float]``.

A sample is either a question about a text (``question`` set: the methods
answer it, in both instruction modes for RCC, and, when ``continuation`` is set,
with a continuation prompt too) or a continuation of token ids
(``prompt_ids`` set: the methods continue the prompt after reading the context).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One evaluation sample.

    Attributes:
        id: unique within the task run.
        context: the text a method reads (for RCC: compresses), or None when the
            sample is given as ``context_ids``.
        question: asked after the context (question samples).
        continuation: the text after the context in the continuation prompt,
            ending in a cue the answer continues (``"What is the pass key? The
            pass key is"``); None: the sample has only the chat prompt.
        answers: reference answers (question samples) or the reference text.
        context_ids: ``[n]`` context token ids (continuation samples).
        prompt_ids: ``[m]`` the cue the decoder continues from (continuation samples).
        target_ids: ``[t]`` the reference continuation (continuation samples).
        meta: group keys (``length``, ``depth`` ...) and details worth recording.
    """

    id: str
    context: str | None = None
    question: str | None = None
    continuation: str | None = None
    answers: list[str] = field(default_factory=list)
    context_ids: list[int] | None = None
    prompt_ids: list[int] | None = None
    target_ids: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_question(self) -> bool:
        return self.question is not None


@dataclass
class Prediction:
    """What a method produced for one sample.

    Attributes:
        text: the answer (question samples: after the reconstructed question, cut
            at the end marker) or the decoded continuation.
        token_ids: the generated ids ``[new_tokens]``.
        info: method details: ``slots``, ``kept_tokens``, ``truncated``,
            ``reconstructed_question``, ``seconds`` ...
    """

    text: str
    token_ids: list[int]
    info: dict[str, Any] = field(default_factory=dict)
