"""Decoder positions: slots + prompt (+ an answer) against what the decoder was trained on.

A decoder with learned absolute position embeddings cannot go past its table,
so a longer input is refused; a rotary decoder extrapolates (as in the paper),
so it is only warned about, once per model.
"""

from __future__ import annotations

import logging

from rcc.errors import RCCError

log = logging.getLogger(__name__)


def check_positions(model, total: int, new_tokens: int = 0, what: str = "slots + prompt") -> None:
    """Refuse (absolute positions) or warn (rotary) when ``total`` decoder positions
    (slots + prompt) and up to ``new_tokens`` generated ones exceed what the decoder
    was trained on. The rotary warning is given once per model; it names the
    generation budget only when the budget alone crosses the trained length.

    Args:
        model: the :class:`rcc.model.RCCModel` (its ``position_limit``, ``config``,
            ``decoder`` and the ``_positions_warned`` flag this sets).
    Raises:
        RCCError: for learned absolute position embeddings beyond their table.
    """
    limit, cfg = model.position_limit, model.config
    if limit is not None and total + new_tokens > limit:
        max_ctx = (limit // cfg.slots_per_window) * cfg.window
        budget = f" + up to {new_tokens} new tokens" if new_tokens else ""
        raise RCCError(
            f"{what}{budget} need {total + new_tokens} decoder positions but this decoder has "
            f"learned absolute position embeddings for {limit}; with window "
            f"{cfg.window} and ratio {cfg.ratio} it can read at most about "
            f"{max_ctx} context tokens; shorten the context or the prompt"
        )
    trained = getattr(model.decoder.config, "max_position_embeddings", None)
    if limit is not None or not trained or model._positions_warned:
        return
    if total > trained:
        log.warning("%s span %d decoder positions, beyond the %d the decoder was trained on; rotary "
                    "positions extrapolate (as in the paper) but quality may drop", what, total, trained)
    elif total + new_tokens > trained:
        log.warning("%s span %d of the %d decoder positions the decoder was trained on; an answer longer "
                    "than %d tokens (of up to %d) goes beyond them, where quality may drop",
                    what, total, trained, trained - total, new_tokens)
    else:
        return
    model._positions_warned = True


def check_slot_total(model, total: int, parts: list[int] | None = None, what: str = "the memories") -> None:
    """Refuse, before any work, a combination of memories (``rcc ask --memory A --memory B``,
    an append) whose ``total`` slots exceed the decoder's positions: its absolute table
    or, for a rotary decoder, the ``max_position_embeddings`` it was trained on (a single
    long text past them is only warned about, :func:`check_positions`; reading several
    memories together is refused there, with the numbers, so that it fails before work).

    Args:
        parts: each memory's slots, named in the message.
    Raises:
        RCCError: naming the slots, the limit and the context tokens it allows.
    """
    limit = model.position_limit
    if limit is None:
        limit = getattr(model.decoder.config, "max_position_embeddings", None)
    if not limit or total <= limit:
        return
    cfg = model.config
    sums = f" ({' + '.join(map(str, parts))})" if parts and len(parts) > 1 else ""
    raise RCCError(f"{what} hold {total} slots{sums}, more than the {limit} positions of this decoder; with window "
                   f"{cfg.window} and ratio {cfg.ratio} that is about {(limit // cfg.slots_per_window) * cfg.window} "
                   "context tokens in all; read fewer or shorter memories at once")
