"""The prompt format of the released model and its two instruction modes (spec
section 2; docs/method.md): what is compressed, what the decoder is prompted
with, and where its answer starts and ends.

:class:`PromptStyle` owns a format's markers and every rule that reads them
(as litgpt's ``PromptStyle`` does): :meth:`~PromptStyle.build` the prompt,
:meth:`~PromptStyle.finished` the stop test generation runs per step,
:meth:`~PromptStyle.answer_length` the same test over token ids,
:meth:`~PromptStyle.visible_answer` what may be streamed so far, and
:meth:`~PromptStyle.split_answer` the final answer. :func:`rcc.ask.ask`, the
server's engines, the vLLM path and the evaluation's baselines all call these;
none reads the markers itself. :data:`CHATML` is the released model's format.
"""

from __future__ import annotations

from dataclasses import dataclass

from rcc.errors import RCCError

HEADER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
END = "<|im_end|>"
MODES = ("reconstruct", "manual")


@dataclass(frozen=True)
class PromptStyle:
    """A prompt format: ``header`` opens the user turn, ``assistant`` closes it and
    opens the answer, ``end`` closes the answer.

    In reconstruct mode the decoder first writes the question back (it was
    compressed with the context), so its output holds ``question + assistant +
    answer + end``; in manual mode the prompt already ends with ``assistant`` and
    the output is ``answer + end``.
    """

    header: str = HEADER
    assistant: str = ASSISTANT
    end: str = END

    def build(self, context: str, question: str, mode: str) -> tuple[str, str]:
        """``(text to compress, decoder prompt)`` for an instruction mode.

        - reconstruct: compress ``context + "\\n\\n" + question``; prompt = header only;
        - manual: compress the context; prompt = header + question + assistant header.

        Raises:
            RCCError: on an unknown mode.
        """
        if mode == "reconstruct":
            return context + "\n\n" + question, self.header
        if mode == "manual":
            return context, self.header + question + self.assistant
        raise RCCError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")

    def answer_part(self, text: str, mode: str) -> str | None:
        """The answer in a generation so far: after the assistant header in
        reconstruct mode (None before it), the whole text in manual mode."""
        if mode == "reconstruct":
            head = text.find(self.assistant)
            return None if head < 0 else text[head + len(self.assistant):]
        return text

    def finished(self, text: str, mode: str, eos: str | None = None, stops: tuple[str, ...] = ()) -> bool:
        """Whether a generation so far has closed its answer: the end marker (or
        ``eos``, or one of the stop strings) in the answer part."""
        answer = self.answer_part(text, mode)
        if answer is None:
            return False
        return self.end in answer or bool(eos and eos in answer) or any(s in answer for s in stops)

    def answer_length(self, tokenizer, ids: list[int], mode: str) -> int | None:
        """The number of generated tokens ``ids`` after which :meth:`finished` (end
        marker only) first holds, or None if it never does."""
        for n in range(1, len(ids) + 1):
            if self.finished(tokenizer.decode(ids[:n], skip_special_tokens=False), mode):
                return n
        return None

    def stop_token_id(self, tokenizer, mode: str) -> int | None:
        """The eos id generation may stop at: none in reconstruct mode when eos is the
        end marker (the question written back ends with one too; :meth:`finished` decides)."""
        return None if (mode == "reconstruct" and tokenizer.eos_token == self.end) else tokenizer.eos_token_id

    def visible_answer(self, text: str, mode: str, eos: str | None, stops: tuple[str, ...] = ()) -> str:
        """The part of a generation so far that is surely answer text: after the
        assistant header (reconstruct mode), before any end marker or stop string,
        never a marker's or stop string's first characters or a half-decoded
        character, stripped as :meth:`split_answer` strips the final answer."""
        answer = self.answer_part(text, mode)
        if answer is None:
            return ""
        cut = len(answer)
        for stop in (self.end, eos, *stops):
            if not stop:
                continue
            i = answer.find(stop)
            if i >= 0:
                cut = min(cut, i)
                continue
            for k in range(min(len(stop) - 1, len(answer)), 0, -1):
                if answer.endswith(stop[:k]):
                    cut = min(cut, len(answer) - k)
                    break
        return answer[:cut].rstrip("\ufffd").strip()

    def split_answer(self, text: str, mode: str, eos: str | None,
                     stops: tuple[str, ...] = ()) -> tuple[str | None, str]:
        """``(reconstructed question, answer)`` from the decoded generation: the
        answer ends before the end marker, ``eos`` and the first of ``stops`` (a stop
        string is not part of the answer, as in the OpenAI API and vLLM)."""
        question = None
        if mode == "reconstruct":
            head = text.find(self.assistant)
            if head >= 0:
                question, text = text[:head], text[head + len(self.assistant):]
            else:  # never reached the answer: all of it is the question
                question, text = text.split(self.end)[0], ""
        for stop in (self.end, eos, *stops):
            if stop and stop in text:
                text = text.split(stop)[0]
        return (question.strip() if question is not None else None), text.strip()


#: the released model's format (ChatML with its system line), the one every model here uses
CHATML = PromptStyle()


def default_mode(model) -> str:
    """The instruction mode a model answers in when none is named."""
    return getattr(model.config, "instruction_mode", None) or "reconstruct"
