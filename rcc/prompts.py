"""The two instruction modes of the released model (spec section 2): what is
compressed and what the decoder is prompted with. :mod:`rcc.ask` runs them."""

from __future__ import annotations

from .errors import RCCError

HEADER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
END = "<|im_end|>"
MODES = ("reconstruct", "manual")


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
