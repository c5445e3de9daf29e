"""Timing decodes for ``rcc bench`` (:mod:`rcc.bench`): when each new token arrives, tokens/s,
and repeated decodes from one compressed (or pre-filled) state, so that a point's decode speed
comes with its spread over repeats."""

from __future__ import annotations

import time


class Clock:
    """A ``generate`` streamer that only notes when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self.start: float | None = None  # when generate began (after RCC's compression)

    def put(self, value) -> None:
        if self.start is None:  # generate first puts the prompt
            self.start = time.perf_counter()
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def tok_s(times: list[float]) -> float | None:
    """Decode tokens/s from the arrival times of the new tokens (after the first)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None


def decode_again(model, kind: str, ids, prompt, new_tokens: int, window_batch_size: int | None, times: int):
    """``times`` more timed decodes of ``new_tokens`` after the same context, from one state made
    once: RCC's memory (each ``generate`` copies it) or the backbone's cache pre-filled with all
    but the last prompt token (copied for each). Returns ``[(tokens/s, new ids [1, new_tokens])]``."""
    import torch

    from rcc import hooks
    from rcc.memory import cache_from, kv_of

    decoder, runs = model.decoder, []
    if kind == "rcc":
        memory = model.compress(ids, window_batch_size)
    else:
        from transformers import DynamicCache

        full, prefilled = torch.cat([ids, prompt], dim=1), DynamicCache()
        decoder(input_ids=full[:, :-1], use_cache=True, logits_to_keep=1, **{hooks.cache_kwarg(decoder): prefilled})
        pad = decoder.generation_config.pad_token_id
    for _ in range(times):
        clock = Clock()
        if kind == "rcc":
            out = model.generate(memory, prompt, max_new_tokens=new_tokens, eos_token_id=None, streamer=clock)
        else:
            cache = cache_from([(k.clone(), v.clone()) for k, v in kv_of(prefilled)])
            out = decoder.generate(input_ids=full, attention_mask=torch.ones_like(full), do_sample=False,
                                   streamer=clock, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=pad if pad is not None else 0, **{hooks.cache_kwarg(decoder): cache})
            out = out[:, full.shape[1]:]
        runs.append((tok_s(clock.times), out))
    return runs
