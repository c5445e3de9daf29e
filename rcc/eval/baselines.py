"""The methods an evaluation compares, all behind one small interface:

- ``name``;
- ``answer(context, question, max_new_tokens) -> Prediction`` (question samples);
- ``continue_ids(context_ids, prompt_ids, max_new_tokens) -> Prediction``
  (continuation samples: read the context, then continue the prompt).

:class:`RCCMethod` is the model under test (one per instruction mode). The
baselines run the decoder's backbone (LoRA adapters bypassed: for the bundled
model, the plain SmolLM2) on the same samples:

- :class:`FullContext` (``full``): the uncompressed decoder with the whole
  context, cut in the middle (head and tail kept, as LongBench does) when it
  is longer than the decoder's maximum positions; every cut is recorded.
- :class:`RecentTokens` (``recent``): RCC's KV budget (as many positions as
  RCC's slots, n/r) filled with the most recent context tokens.
- :class:`KVPressMethod` (``kvpress``): a press of NVIDIA's ``kvpress`` at
  compression ratio 1 - 1/r, when kvpress works with the installed
  transformers (see :func:`make_kvpress`).

The baselines' layout is the uncompressed chat of RCC's prompts:
``HEADER + context + "\\n\\n" + question + ASSISTANT``; continuations are
``context + cue``. Decoding is greedy, as RCC's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from .. import adapters
from ..errors import RCCError
from ..hooks import cache_kwarg
from ..ask import ask
from ..prompts import ASSISTANT, END, HEADER, split_answer
from .task import Prediction

log = logging.getLogger(__name__)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer) -> set[int]:
    """Token ids that end an answer: the eos id and ``<|im_end|>`` when it is one token."""
    out = set()
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    end = _ids(tokenizer, END)
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


def _answer_text(tokenizer, ids: list[int]) -> str:
    return split_answer(tokenizer.decode(ids, skip_special_tokens=False), "manual", tokenizer.eos_token)[1]


def max_positions(decoder) -> int | None:
    """The positions the decoder was trained on (``max_position_embeddings`` or ``n_positions``)."""
    cfg = decoder.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


class RCCMethod:
    """The RCC model in one instruction mode (``rcc:reconstruct`` / ``rcc:manual``;
    ``rcc`` for continuations, which have no instruction)."""

    def __init__(self, model, mode: str | None, window_batch_size: int | None = 8):
        self.model, self.mode, self.window_batch_size = model, mode, window_batch_size
        self.name = f"rcc:{mode}" if mode else "rcc"

    def answer(self, context: str, question: str, max_new_tokens: int) -> Prediction:
        # reconstruct mode writes the question back first: the same answer budget on top of it
        extra = len(_ids(self.model.tokenizer, question + ASSISTANT)) if self.mode == "reconstruct" else 0
        a = ask(self.model, context, question, mode=self.mode, max_new_tokens=max_new_tokens + extra,
                window_batch_size=self.window_batch_size)
        return Prediction(a.answer, a.token_ids, {"slots": a.num_slots, "compressed_tokens": a.compressed_tokens,
                                                  "compress_s": round(a.compress_seconds, 4),
                                                  "reconstructed_question": a.reconstructed_question})

    def continue_ids(self, context_ids: list[int], prompt_ids: list[int], max_new_tokens: int) -> Prediction:
        t = time.perf_counter()
        memory = self.model.compress(torch.tensor([context_ids]), window_batch_size=self.window_batch_size)
        secs = time.perf_counter() - t
        out = self.model.generate(memory, torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, eos_token_id=None)
        ids = out[0].tolist()
        return Prediction(self.model.tokenizer.decode(ids), ids,
                          {"slots": memory.num_slots, "compress_s": round(secs, 4)})


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

    def answer(self, context: str, question: str, max_new_tokens: int) -> Prediction:
        pre, post = _ids(self.tokenizer, HEADER), _ids(self.tokenizer, "\n\n" + question + ASSISTANT)
        ctx, info = self.select(_ids(self.tokenizer, context), self._room(len(pre) + len(post), max_new_tokens))
        with adapters.disabled(self.decoder):
            ids = greedy(self.decoder, pre + ctx + post, max_new_tokens, self.stops)
        return Prediction(_answer_text(self.tokenizer, ids), ids, info)

    def continue_ids(self, context_ids: list[int], prompt_ids: list[int], max_new_tokens: int) -> Prediction:
        ctx, info = self.select(list(context_ids), self._room(len(prompt_ids), max_new_tokens))
        with adapters.disabled(self.decoder):
            ids = greedy(self.decoder, ctx + list(prompt_ids), max_new_tokens)
        return Prediction(self.tokenizer.decode(ids), ids, info)


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


class KVPressMethod(FullContext):
    """``kvpress:<Press>``: pre-fill the (position-limited) context under a
    kvpress press, which shrinks the KV cache by its compression ratio, then
    decode the question after it, its positions continuing the original text's.

    Args:
        press: a kvpress press object (``with press(model): ...``).
    """

    def __init__(self, decoder, tokenizer, press, limit: int | None = None):
        super().__init__(decoder, tokenizer, limit)
        self.press = press
        self.name = f"kvpress:{type(press).__name__}"

    @torch.no_grad()
    def _prefill(self, ids: list[int]):
        from transformers import DynamicCache

        cache = DynamicCache()
        device = next(self.decoder.parameters()).device
        with self.press(self.decoder):
            self.decoder(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1,
                         **{cache_kwarg(self.decoder): cache})
        return cache

    def answer(self, context: str, question: str, max_new_tokens: int) -> Prediction:
        pre, post = _ids(self.tokenizer, HEADER), _ids(self.tokenizer, "\n\n" + question + ASSISTANT)
        ctx, info = self.select(_ids(self.tokenizer, context), self._room(len(pre) + len(post), max_new_tokens))
        with adapters.disabled(self.decoder):
            cache = self._prefill(pre + ctx)
            info["kv_positions"] = cache.get_seq_length()  # what the press kept, before decoding grows it
            ids = greedy(self.decoder, post, max_new_tokens, self.stops, cache=cache, start=len(pre) + len(ctx))
        return Prediction(_answer_text(self.tokenizer, ids), ids, info)

    def continue_ids(self, context_ids, prompt_ids, max_new_tokens):
        ctx, info = self.select(list(context_ids), self._room(len(prompt_ids), max_new_tokens))
        with adapters.disabled(self.decoder):
            cache = self._prefill(ctx)
            info["kv_positions"] = cache.get_seq_length()
            ids = greedy(self.decoder, list(prompt_ids), max_new_tokens, cache=cache, start=len(ctx))
        return Prediction(self.tokenizer.decode(ids), ids, info)


def make_kvpress(press_name: str, compression_ratio: float):
    """``(press, None)`` or ``(None, why it cannot run)``.

    kvpress installs forward hooks on the attention layers that read the
    ``past_key_values`` and ``cache_position`` arguments; transformers 5.2x
    passes the cache as ``cache`` and no longer passes ``cache_position``, and
    kvpress (0.5.5) declares ``transformers<5.3``. The declared requirement is
    checked before a press is built, so an incompatible install is reported,
    not run.
    """
    try:
        import kvpress
    except Exception as err:  # not installed, or installed without its dependencies
        return None, (f"kvpress is not importable ({type(err).__name__}: {err}); kvpress 0.5.5 needs "
                      "transformers<5.3, which this package does not support (see docs/benchmarks.md)")
    from importlib.metadata import PackageNotFoundError, requires, version

    import transformers
    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in requires("kvpress") or []]
        kv_version = version("kvpress")
    except PackageNotFoundError:
        reqs, kv_version = [], "?"
    for req in reqs:
        if req.name == "transformers" and not req.marker and transformers.__version__ not in req.specifier:
            return None, (f"kvpress {kv_version} requires transformers{req.specifier} but {transformers.__version__} "
                          "is installed; its hooks read `past_key_values`/`cache_position`, which this "
                          "transformers no longer passes to attention layers")
    cls = getattr(kvpress, press_name, None)
    if cls is None:
        return None, f"kvpress has no press named {press_name!r}"
    return cls(compression_ratio=compression_ratio), None
