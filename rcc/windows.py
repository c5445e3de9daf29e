"""Cutting a context into windows and picking slot states (docs/method.md section 1)."""

from __future__ import annotations

import logging

import torch

from rcc.config import windows_for

log = logging.getLogger(__name__)


def pad_to_windows(ids: torch.Tensor, window: int) -> torch.Tensor:
    """Pad a context to whole windows the way the released model does at inference.

    - n < W: tile the context floor(W/n) times, then prepend the last
      (W mod n) tokens of the tiled sequence (exactly W tokens);
    - n > W, n mod W != 0: prepend the last (W - n mod W) context tokens;
    - n mod W == 0: unchanged.

    The original's two bugs (multiplying ids instead of tiling when W mod n == 0;
    an extra window when n mod W == 0) are not reproduced.

    Args:
        ids: ``[batch, n]`` token ids (all rows the same length).
    Returns:
        ``[batch, windows * W]``.
    Raises:
        RCCError: on an empty context.
    """
    n = ids.shape[-1]
    total = windows_for(n, window) * window
    if n == total:
        return ids
    if n < window:
        tiled = ids.repeat(1, window // n)
        extra = window % n
        out = torch.cat([tiled[:, tiled.shape[1] - extra :], tiled], dim=1) if extra else tiled
        log.info("context of %d tokens tiled to one window of %d", n, window)
        return out
    extra = total - n
    log.info("context of %d tokens: last %d tokens prepended to fill %d windows", n, extra, total // window)
    return torch.cat([ids[:, n - extra :], ids], dim=1)


def window_of(position: int, n: int, window: int) -> int:
    """The window that token ``position`` of an ``n``-token context lands in
    after :func:`pad_to_windows`: the copy at its own place (the filler
    prepended to the first window may hold another copy of a late token)."""
    if n <= window:
        return 0
    return (position + windows_for(n, window) * window - n) // window


def pool_slots(hidden: torch.Tensor, ratio: int, pooling: str) -> torch.Tensor:
    """Turn per-token states into per-block slots.

    Args:
        hidden: ``[batch, W, ...]`` states of one window.
    Returns:
        ``[batch, W // ratio, ...]``: the state at positions r-1, 2r-1, ..., W-1
        (``"last"``) or the mean over each block of r tokens (``"mean"``).
    """
    b, w = hidden.shape[:2]
    blocks = hidden.reshape(b, w // ratio, ratio, *hidden.shape[2:])
    if pooling == "last":
        return blocks[:, :, -1]
    return blocks.mean(dim=2)
