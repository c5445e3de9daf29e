"""The two instruction modes of the released model (spec section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .errors import RCCError

HEADER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
END = "<|im_end|>"
MODES = ("reconstruct", "manual")


@dataclass
class Answer:
    """What :func:`ask` returns.

    Attributes:
        answer: the answer text.
        reconstructed_question: what the decoder wrote back as the question
            (``"reconstruct"`` mode only, else None).
        token_ids: the generated ids ``[new_tokens]``.
    """

    answer: str
    reconstructed_question: str | None
    token_ids: list[int]


def build(context: str, question: str, mode: str) -> tuple[str, str]:
    """``(text to compress, decoder prompt)`` for an instruction mode.

    - reconstruct: compress ``context + "\\n\\n" + question``; prompt = header only;
    - manual: compress the context; prompt = header + question + assistant header.

    Raises:
        RCCError: on an unknown mode.
    """
    if mode == "reconstruct":
        return context + "\n\n" + question, HEADER
    if mode == "manual":
        return context, HEADER + question + ASSISTANT
    raise RCCError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


class _AnswerDone(StoppingCriteria):
    """Stop a row once its answer is closed by ``<|im_end|>`` (after the
    assistant header in reconstruct mode, where the question ends with one too)."""

    def __init__(self, tokenizer, start: int, mode: str):
        self.tokenizer, self.start, self.mode = tokenizer, start, mode

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.start :]:
            text = self.tokenizer.decode(row, skip_special_tokens=False)
            if self.mode == "reconstruct":
                head = text.find(ASSISTANT)
                done.append(head >= 0 and END in text[head + len(ASSISTANT) :])
            else:
                done.append(END in text)
        return torch.tensor(done, device=input_ids.device)


def split_answer(text: str, mode: str, eos: str | None) -> tuple[str | None, str]:
    """``(reconstructed question, answer)`` from the decoded generation."""
    question = None
    if mode == "reconstruct":
        head = text.find(ASSISTANT)
        if head >= 0:
            question, text = text[:head], text[head + len(ASSISTANT) :]
        else:  # never reached the answer: all of it is the question
            question, text = text.split(END)[0], ""
    for stop in (END, eos):
        if stop and stop in text:
            text = text.split(stop)[0]
    return (question.strip() if question is not None else None), text.strip()


def default_mode(model) -> str:
    """The instruction mode a model answers in when none is named."""
    return getattr(model.config, "instruction_mode", None) or "reconstruct"


def ask(model, context: str, question: str, mode: str | None = None, max_new_tokens: int = 128,
        window_batch_size: int | None = 8, memory=None, **generate_kwargs) -> Answer:
    """Answer ``question`` about ``context`` with ``model`` (an :class:`~rcc.RCCModel`).

    Args:
        mode: ``"reconstruct"`` or ``"manual"``; None: :func:`default_mode`.
        memory: a :class:`~rcc.CompressedContext` made from ``build(context, question,
            mode)[0]`` (manual mode: from the context alone) to skip compression.
    Raises:
        RCCError: without a tokenizer, or with an empty context or question.
    """
    tok = model.tokenizer
    if tok is None:
        raise RCCError("this model has no tokenizer; load it with one (e.g. --base-model) to ask questions in text")
    if not context.strip() and memory is None:
        raise RCCError("the context is empty; give some text to compress")
    if not question.strip():
        raise RCCError("the question is empty")
    mode = mode or default_mode(model)
    to_compress, prompt = build(context, question, mode)
    if memory is None:
        ids = tok(to_compress, add_special_tokens=False, return_tensors="pt").input_ids
        memory = model.compress(ids, window_batch_size=window_batch_size)
    prompt_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    eos = tok.eos_token
    criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", []))
    criteria.append(_AnswerDone(tok, memory.num_slots + prompt_ids.shape[1], mode))
    eos_id = generate_kwargs.pop("eos_token_id", tok.eos_token_id)
    if mode == "reconstruct" and eos == END:
        eos_id = None  # the question ends with <|im_end|> too: _AnswerDone decides
    out = model.generate(memory, prompt_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                         stopping_criteria=criteria, **generate_kwargs)
    ids = out[0].tolist()
    text = tok.decode(ids, skip_special_tokens=False)
    question_back, answer = split_answer(text, mode, eos)
    return Answer(answer=answer, reconstructed_question=question_back, token_ids=ids)
