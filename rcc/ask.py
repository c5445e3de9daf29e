"""Ask a question about a context: the one path the CLI (``rcc ask``), the
evaluation (:class:`rcc.eval.baselines.RCCMethod`), :meth:`rcc.RCCModel.ask`
and a server share (docs/method.md section 2).

The context is text, a saved memory (:class:`~rcc.CompressedContext`, e.g.
from ``rcc compress``) or a list of memories, read in order as one
(:meth:`rcc.RCCModel.combine`: one decoder pre-fill over their slots):

- text, ``"reconstruct"`` mode: compress ``context + "\\n\\n" + question``,
  prompt with the header; the decoder writes the question back, then answers;
- text, ``"manual"`` mode: compress the context, prompt with the question;
- a memory, ``"manual"`` mode: use it as it is (nothing is compressed);
- a memory, ``"reconstruct"`` mode: compress ``"\\n\\n" + question`` onto it
  (:meth:`~rcc.RCCModel.compress` with ``prefix``: its windows come after the
  memory's, so it is the memory's context and the question cut at the boundary).

With no mode named, a memory is asked in ``"manual"`` mode (nothing to
compress) and text in the model's own (:func:`rcc.prompts.default_mode`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rcc.errors import RCCError
from rcc.memory import CompressedContext
from rcc.prompts import CHATML, default_mode


@dataclass
class Answer:
    """What :func:`ask` returns.

    Attributes:
        answer: the answer text.
        reconstructed_question: what the decoder wrote back as the question
            (``"reconstruct"`` mode only, else None).
        token_ids: the generated ids ``[new_tokens]``.
        mode: the instruction mode it was asked in.
        num_slots: slots of the memory the decoder read.
        compressed_tokens: tokens compressed by this call (0: a memory used as it is).
        compress_seconds: time spent compressing them.
    """

    answer: str
    reconstructed_question: str | None
    token_ids: list[int]
    mode: str | None = None
    num_slots: int = 0
    compressed_tokens: int = 0
    compress_seconds: float = 0.0


class AnswerDone(StoppingCriteria):
    """Stop a row once its answer is closed by the end marker (after the assistant
    header in reconstruct mode, where the question ends with one too):
    :meth:`rcc.prompts.PromptStyle.finished` on the row's tokens from ``start``."""

    def __init__(self, tokenizer, start: int, mode: str, style=CHATML):
        self.tokenizer, self.start, self.mode, self.style = tokenizer, start, mode, style

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [self.style.finished(self.tokenizer.decode(row, skip_special_tokens=False), self.mode)
                for row in input_ids[:, self.start :]]
        return torch.tensor(done, device=input_ids.device)


def choose_mode(model, context, mode: str | None = None) -> str:
    """The instruction mode :func:`ask` uses: ``mode`` when given; for a memory (or
    several) ``"manual"``; for text the model's own (:func:`rcc.prompts.default_mode`)."""
    if mode:
        return mode
    return "manual" if isinstance(context, (CompressedContext, list, tuple)) else default_mode(model)


def ask(model, context: str | CompressedContext | list[CompressedContext], question: str, mode: str | None = None,
        max_new_tokens: int = 128,
        window_batch_size: int | None = 8, progress: Callable[[int, int], None] | None = None,
        compress: Callable | None = None, **generate_kwargs) -> Answer:
    """Answer ``question`` about ``context`` with ``model`` (an :class:`~rcc.RCCModel`).

    Args:
        context: the text, a memory of it (:class:`~rcc.CompressedContext`
            of the context alone, as ``rcc compress`` writes), or a list of memories
            asked as one, in order (:meth:`~rcc.RCCModel.combine`).
        mode: ``"reconstruct"`` or ``"manual"``; None: :func:`choose_mode`.
        max_new_tokens: the generation budget (in reconstruct mode the
            question written back counts too).
        window_batch_size: windows encoded per step while compressing.
        progress: called as ``progress(windows_done, windows_total)`` while compressing.
        compress: runs the compression instead of ``model.compress``, as
            ``compress(ids [1, n], prefix: CompressedContext | None) -> CompressedContext``
            (the CLI passes one that draws a progress bar and prints a summary).
        **generate_kwargs: generation options of :meth:`~rcc.RCCModel.generate`
            (``do_sample``, ``temperature``, ``stop_strings``, ``streamer`` ...).
    Returns:
        :class:`Answer`.
    Raises:
        RCCError: without a tokenizer, with an empty context or question, an
        unknown mode, a memory made by another model, or memories that cannot be
        read together (:meth:`~rcc.RCCModel.combine`).
    """
    tok = model.tokenizer
    if tok is None:
        raise RCCError("this model has no tokenizer; load it with one (e.g. --base-model) to ask questions in text")
    if isinstance(context, (list, tuple)):
        context = model.combine(context, window_batch_size)
    is_memory = isinstance(context, CompressedContext)
    if not is_memory and not isinstance(context, str):
        raise RCCError(f"the context must be text or a CompressedContext, not {type(context).__name__}")
    if not is_memory and not context.strip():
        raise RCCError("the context is empty; give some text to compress")
    if not question.strip():
        raise RCCError("the question is empty")
    mode = choose_mode(model, context, mode)
    prompt = CHATML.build("", question, mode)[1]  # the prompt does not depend on the context; raises on a bad mode
    ids, prefix = None, None
    if is_memory:
        model.check_memory(context)
        if mode == "reconstruct":  # the question is compressed too: its windows extend the memory
            ids, prefix = tok("\n\n" + question, add_special_tokens=False, return_tensors="pt").input_ids, context
    else:
        ids = tok(CHATML.build(context, question, mode)[0], add_special_tokens=False, return_tensors="pt").input_ids
    if compress is None:
        compress = _compressor(model, window_batch_size, progress)
    secs = 0.0
    if ids is None:
        memory = context
    else:
        t = time.perf_counter()
        memory = compress(ids, prefix)
        secs = time.perf_counter() - t
    prompt_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    eos = tok.eos_token
    criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", []))
    criteria.append(AnswerDone(tok, memory.num_slots + prompt_ids.shape[1], mode))
    eos_id = generate_kwargs.pop("eos_token_id", tok.eos_token_id)
    if CHATML.stop_token_id(tok, mode) is None:
        eos_id = None  # the question ends with the end marker too: AnswerDone decides
    out = model.generate(memory, prompt_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                         stopping_criteria=criteria, **generate_kwargs)
    out_ids = out[0].tolist()
    question_back, answer = CHATML.split_answer(tok.decode(out_ids, skip_special_tokens=False), mode, eos,
                                                tuple(generate_kwargs.get("stop_strings") or ()))
    return Answer(answer=answer, reconstructed_question=question_back, token_ids=out_ids, mode=mode,
                  num_slots=memory.num_slots, compressed_tokens=0 if ids is None else int(ids.shape[1]),
                  compress_seconds=secs)


def _compressor(model, window_batch_size: int | None, progress: Callable[[int, int], None] | None) -> Callable:
    def compress(ids: torch.Tensor, prefix: CompressedContext | None) -> CompressedContext:
        total = model.config.slots_for(ids.shape[-1]) // model.config.slots_per_window
        report = None if progress is None else (lambda done: progress(done, total))
        return model.compress(ids, window_batch_size=window_batch_size, progress=report, prefix=prefix,
                              keep_slots=False)

    return compress
