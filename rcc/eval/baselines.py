"""The methods an evaluation compares, all behind one small interface:

- ``name``;
- ``answer(context, question, max_new_tokens) -> Prediction`` (question samples);
- ``continue_ids(context_ids, prompt_ids, max_new_tokens) -> Prediction``
  (continuation samples: read the context, then continue the prompt).

:class:`RCCMethod` is the model under test (its instruction mode is the
chat prompt it answers in). The baselines run the decoder's backbone (LoRA adapters bypassed: for the bundled
model, the plain SmolLM2) on the same samples:

- :class:`FullContext` (``full``): the uncompressed decoder with the whole
  context, cut in the middle (head and tail kept, as LongBench does) when it
  is longer than the decoder's maximum positions; every cut is recorded.
- :class:`RecentTokens` (``recent``): RCC's KV budget (as many positions as
  RCC's slots, n/r) filled with the most recent context tokens.
- ``kvpress:<press>@<ratio>``: a kvpress press, run in kvpress's own
  environment (:mod:`rcc.eval.kvpress`), with :class:`FullContext`'s layout.
- ``llamacpp``: :class:`FullContext`'s token ids run by llama.cpp on the
  backbone's GGUF file, in llama-cpp-python's own environment (:mod:`rcc.eval.llamacpp`).

Every method answers a question sample with either of two prompts (the runner
picks, :mod:`rcc.eval.runner`): the chat prompt (:meth:`answer`; the baselines'
layout is the uncompressed chat of RCC's prompts, ``HEADER + context +
"\\n\\n" + question + ASSISTANT``) or a continuation (:meth:`continue_ids`
with :func:`continuation_prompt`: ``context + "\\n\\n" + "... The pass key is"``,
no chat markers). Decoding is greedy, as RCC's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rcc import adapters
from rcc.errors import RCCError
from rcc.hooks import cache_kwarg
from rcc.ask import ask
from rcc.prompts import ASSISTANT, CHATML, END, HEADER
from rcc.eval.task import Prediction

if TYPE_CHECKING:
    from rcc.memory import CompressedContext

log = logging.getLogger(__name__)


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer) -> set[int]:
    """Token ids that end an answer: the eos id and ``<|im_end|>`` when it is one token."""
    out = set()
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    end = encode_text(tokenizer, END)
    if len(end) == 1:
        out.add(end[0])
    return out


@torch.no_grad()
def greedy(decoder, ids: list[int], max_new_tokens: int, stops: set[int] = frozenset(), cache=None,
           start: int = 0) -> list[int]:
    """Greedy decoding with a KV cache, written out so a pre-filled (and
    possibly pressed) cache can be continued at the right positions.

    Args:
        decoder: a causal LM.
        ids: ``[m]`` tokens to feed first (after what ``cache`` holds).
        stops: ids that end generation (not included in the output).
        cache: a ``DynamicCache`` to continue (None: a new one).
        start: position of ``ids[0]`` (the length of the original text in the
            cache, which a press may have shortened).
    Returns:
        the new ids ``[<= max_new_tokens]``.
    """
    from transformers import DynamicCache

    device = next(decoder.parameters()).device
    cache = DynamicCache() if cache is None else cache
    kw = cache_kwarg(decoder)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    pos = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = decoder(input_ids=x, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
        nxt = int(logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        x = torch.tensor([[nxt]], dtype=torch.long, device=device)
        pos = pos[:, -1:] + 1
    return out


def answer_text(tokenizer, ids: list[int]) -> str:
    return CHATML.split_answer(tokenizer.decode(ids, skip_special_tokens=False), "manual", tokenizer.eos_token)[1]


def max_positions(decoder) -> int | None:
    """The positions the decoder was trained on (``max_position_embeddings`` or ``n_positions``)."""
    cfg = decoder.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def continuation_prompt(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The continuation prompt of a question sample as ``(context ids, prompt ids)``:
    the context, then ``"\\n\\n" + continuation`` (e.g. ``"What is the pass key? The pass key is"``)."""
    return encode_text(tokenizer, context), encode_text(tokenizer, "\n\n" + continuation)


def continuation_answer(text: str, eos: str | None = None) -> str:
    """The answer in a continuation: up to the first line break or end marker."""
    for stop in (END, eos):
        if stop and stop in text:
            text = text.split(stop)[0]
    return text.strip().split("\n")[0].strip()


class RCCMethod:
    """The RCC model: :meth:`answer` in an instruction mode (``reconstruct`` or
    ``manual``), :meth:`continue_ids` for continuations. The last context it
    compressed is kept, so the prompts of one sample compress it once
    (``info.compress_reused``)."""

    name = "rcc"

    def __init__(self, model, window_batch_size: int | None = 8):
        self.model, self.window_batch_size = model, window_batch_size
        self._last: tuple[torch.Tensor, CompressedContext] | None = None

    def _compress(self, ids: torch.Tensor, prefix=None) -> tuple[CompressedContext, float | None]:
        """``(memory of ids [1, n], seconds or None when reused)``."""
        if prefix is None and self._last is not None and torch.equal(self._last[0], ids):
            return self._last[1], None
        t = time.perf_counter()
        memory = self.model.compress(ids, window_batch_size=self.window_batch_size, prefix=prefix)
        secs = time.perf_counter() - t
        if prefix is None:
            self._last = (ids, memory)
        return memory, secs

    def answer(self, context: str, question: str, max_new_tokens: int, mode: str = "manual") -> Prediction:
        # reconstruct mode writes the question back first: the same answer budget on top of it
        extra = len(encode_text(self.model.tokenizer, question + ASSISTANT)) if mode == "reconstruct" else 0
        timing: dict = {}

        def compress(ids, prefix):
            memory, timing["s"] = self._compress(ids, prefix)
            return memory

        a = ask(self.model, context, question, mode=mode, max_new_tokens=max_new_tokens + extra, compress=compress)
        return Prediction(a.answer, a.token_ids, {"slots": a.num_slots, "compressed_tokens": a.compressed_tokens,
                                                  **self._timing(timing.get("s")),
                                                  "reconstructed_question": a.reconstructed_question})

    def continue_ids(self, context_ids: list[int], prompt_ids: list[int], max_new_tokens: int) -> Prediction:
        memory, secs = self._compress(torch.tensor([context_ids]))
        out = self.model.generate(memory, torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, eos_token_id=None)
        ids = out[0].tolist()
        return Prediction(self.model.tokenizer.decode(ids), ids, {"slots": memory.num_slots, **self._timing(secs)})

    @staticmethod
    def _timing(secs: float | None) -> dict:
        return {"compress_reused": True} if secs is None else {"compress_s": round(secs, 4)}


class _DecoderMethod:
    """Shared by the baselines: the decoder, its tokenizer and its position limit."""

    name = "decoder"

    def __init__(self, decoder, tokenizer, limit: int | None = None):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.limit = limit if limit is not None else max_positions(decoder)
        self.stops = stop_ids(tokenizer)

    def select(self, context_ids: list[int], room: int) -> tuple[list[int], dict]:
        """The context tokens this method keeps, given ``room`` positions for them."""
        raise NotImplementedError

    def _room(self, overhead: int, max_new_tokens: int) -> int:
        if self.limit is None:
            return 1 << 62
        room = self.limit - overhead - max_new_tokens
        if room < 1:
            raise RCCError(f"{self.name}: the prompt and {max_new_tokens} new tokens already exceed the decoder's "
                           f"{self.limit} positions; ask for fewer new tokens")
        return room

    def generate(self, ids: list[int], max_new_tokens: int, stops: set[int] = frozenset()) -> tuple[list[int], dict]:
        """Greedy new ids after ``ids`` (the whole laid-out prompt) and what to record
        of the run: here the decoder's backbone, adapters bypassed; the ``llamacpp``
        baseline (:mod:`rcc.eval.llamacpp`) runs llama.cpp instead."""
        with adapters.disabled(self.decoder):
            return greedy(self.decoder, ids, max_new_tokens, stops), {}

    def answer(self, context: str, question: str, max_new_tokens: int) -> Prediction:
        pre, post = encode_text(self.tokenizer, HEADER), encode_text(self.tokenizer, "\n\n" + question + ASSISTANT)
        ctx, info = self.select(encode_text(self.tokenizer, context), self._room(len(pre) + len(post), max_new_tokens))
        ids, extra = self.generate(pre + ctx + post, max_new_tokens, self.stops)
        return Prediction(answer_text(self.tokenizer, ids), ids, {**info, **extra})

    def continue_ids(self, context_ids: list[int], prompt_ids: list[int], max_new_tokens: int) -> Prediction:
        ctx, info = self.select(list(context_ids), self._room(len(prompt_ids), max_new_tokens))
        ids, extra = self.generate(ctx + list(prompt_ids), max_new_tokens)
        return Prediction(self.tokenizer.decode(ids), ids, {**info, **extra})


class FullContext(_DecoderMethod):
    """``full``: the uncompressed decoder; a context longer than its positions
    keeps its first and last halves (``info.truncated``, ``info.kept_tokens``)."""

    name = "full"

    def select(self, context_ids, room):
        n = len(context_ids)
        if n <= room:
            return context_ids, {"truncated": False, "kept_tokens": n, "context_tokens": n}
        head = room // 2
        kept = context_ids[:head] + context_ids[n - (room - head):]
        return kept, {"truncated": True, "kept_tokens": room, "context_tokens": n}


class RecentTokens(_DecoderMethod):
    """``recent``: the decoder with RCC's KV budget, the last ``budget(n)`` context tokens.

    Args:
        budget: context tokens -> positions kept (RCC's slot count for that context).
    """

    name = "recent"

    def __init__(self, decoder, tokenizer, budget: Callable[[int], int], limit: int | None = None):
        super().__init__(decoder, tokenizer, limit)
        self.budget = budget

    def select(self, context_ids, room):
        n = len(context_ids)
        keep = min(self.budget(n), n, room)
        return context_ids[n - keep:], {"kept_tokens": keep, "budget": self.budget(n), "context_tokens": n}
