"""Slots: the encoder side of RCC (docs/method.md section 1), windows -> G and A_i outputs.

Each window of W context tokens is run through the encoder E on its own
(positions restart at 0); the states of the levels the decoder reads are
recorded at the k = W / r slot positions only, pooled (:func:`rcc.windows.pool_slots`),
then projected: G(level 0) is a slot's input embedding and A_i(its levels) is
added after decoder layer i. :class:`rcc.model.RCCModel` composes these
functions; each takes that model (its ``encoder``, ``config``, ``level_map``,
``G``, ``A`` and ``device``) as its first argument.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rcc import hooks
from rcc.windows import pad_to_windows, pool_slots


def encode_levels(model, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's slot states of ``windows [num_windows, W]``, before G and A_i.

    The levels are recorded at the slot positions only, as the forward pass
    produces them (:func:`rcc.hooks.capture`), instead of keeping every level
    at every position (``output_hidden_states``).

    Returns:
        ``(level0 [num_windows, k, H_E], sources [L_D, num_windows, k, H_E])``:
        sources[i] = the (mean of the) level(s) decoder layer i reads.
    """
    r, pooling = model.config.ratio, model.config.pooling
    layers = hooks.decoder_layers(model.encoder)
    last = len(layers)
    wanted = {0} | {j for lv in model.level_map for j in lv}
    tied = getattr(model.encoder.config, "tie_last_hidden_states", None) is not False
    hooked = [j for j in wanted if j < last or not tied]  # the tied last level is the body's output

    def keep(hidden: torch.Tensor) -> torch.Tensor:  # a copy: a view would keep the whole level alive
        return pool_slots(hidden, r, pooling).clone(memory_format=torch.contiguous_format)

    body = hooks.backbone_body(model.encoder)
    with hooks.capture(layers, hooked, keep) as levels:
        out = body(input_ids=windows.to(model.device), use_cache=False)
    if last in wanted and tied:
        levels[last] = keep(out.last_hidden_state)
    sources = torch.stack([levels[lv[0]] if len(lv) == 1 else torch.stack([levels[j] for j in lv]).mean(0)
                           for lv in model.level_map])
    return levels[0], sources


def project(model, level0: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """G and all A_i on slot states; the L_D maps run as one batched matmul
    over their stacked weights (two kernels, forward and backward, instead
    of 2 L_D), the same way with and without gradients so that both give
    bit-identical slots.

    Args:
        level0: ``[num_windows, k, H_E]``; sources: ``[L_D, num_windows, k, H_E]``.
    Returns:
        ``(embeds [num_windows, k, H_D], additions: L_D x [num_windows, k, H_D])``.
    """
    embeds = model.G(level0.to(model.G.weight.dtype))
    weight = torch.stack([a.weight for a in model.A])  # [L_D, H_D, H_E]
    L, n, k = sources.shape[:3]
    out = torch.bmm(sources.to(weight.dtype).reshape(L, n * k, -1), weight.transpose(1, 2))  # [L_D, n*k, H_D]
    return embeds, list(out.reshape(L, n, k, -1).unbind(0))


def iter_slots(
    model, context_ids: torch.Tensor, window_batch_size: int | None = None
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Yield projected slots a batch of windows at a time, in context order.

    Args:
        context_ids: ``[batch, n]``.
        window_batch_size: windows of each context encoded together (None: all).
    Yields:
        ``(embeds [batch, j*k, H_D], additions: L_D x [batch, j*k, H_D])`` for
        consecutive groups of j windows.
    """
    W = model.config.window
    padded = pad_to_windows(context_ids, W)
    b = padded.shape[0]
    windows = padded.reshape(b, -1, W)  # [batch, num_windows, W]
    nw = windows.shape[1]
    step = nw if not window_batch_size else max(1, int(window_batch_size))
    for start in range(0, nw, step):
        chunk = windows[:, start : start + step]
        j = chunk.shape[1]
        embeds, additions = project(model, *encode_levels(model, chunk.reshape(b * j, W)))
        k = embeds.shape[1]
        yield embeds.reshape(b, j * k, -1), [a.reshape(b, j * k, -1) for a in additions]


def all_slots(model, ctx: torch.Tensor, window_batch_size: int | None = None, grad_windows: int | None = None,
              focus_windows: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every slot of ``ctx [batch, n]`` at once (training and scoring): with
    ``grad_windows`` and gradients on, through :func:`slots_with_partial_grad`,
    else the concatenated :func:`iter_slots`.

    Returns:
        ``(embeds [batch, P, H_D], additions: L_D x [batch, P, H_D])``.
    """
    if grad_windows and torch.is_grad_enabled():
        return slots_with_partial_grad(model, ctx, int(grad_windows), window_batch_size, focus_windows)
    parts = list(iter_slots(model, ctx, window_batch_size))
    embeds = torch.cat([p[0] for p in parts], dim=1)
    additions = [torch.cat([p[1][i] for p in parts], dim=1) for i in range(len(model.A))]
    return embeds, additions


def slots_with_partial_grad(
    model, ctx: torch.Tensor, grad_windows: int, window_batch_size: int | None,
    focus_windows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Slots of ``ctx [batch, n]`` as :func:`iter_slots` gives them, with
    gradient through ``grad_windows`` windows of each row only: its focus
    window (``focus_windows [batch]``, -1 none) and random others.

    Returns:
        ``(embeds [batch, P, H_D], additions: L_D x [batch, P, H_D])``.
    """
    W = model.config.window
    windows = pad_to_windows(ctx, W).reshape(ctx.shape[0], -1, W)  # [batch, nw, W]
    b, nw = windows.shape[:2]
    flat = windows.reshape(b * nw, W)
    if grad_windows >= nw:
        chosen = torch.ones(b, nw, dtype=torch.bool)
    else:
        scores = torch.rand(b, nw)
        if focus_windows is not None:  # a focus window sorts first
            focus = focus_windows.detach().cpu().long()
            rows = (focus >= 0).nonzero().squeeze(1)
            scores[rows, focus[rows].clamp(max=nw - 1)] = -1.0
        picks = scores.argsort(dim=1)[:, :grad_windows]
        chosen = torch.zeros(b, nw, dtype=torch.bool).scatter_(1, picks, True)
    chosen = chosen.reshape(-1).to(flat.device)
    with_grad = chosen.nonzero().squeeze(1)
    without = (~chosen).nonzero().squeeze(1)
    parts = [encode_levels(model, flat[with_grad])]
    step = max(1, int(window_batch_size or 8) * b)  # bounded: all windows at once can exhaust memory
    with torch.no_grad():
        for s in range(0, len(without), step):
            parts.append(encode_levels(model, flat[without[s : s + step]]))
    order = torch.cat([with_grad, without]).argsort()  # back to window order
    level0 = torch.cat([p[0] for p in parts])[order]
    sources = torch.cat([p[1] for p in parts], dim=1)[:, order]
    # all windows in one projection, as the full pass does (same values), but
    # G and A_i get gradient only from the chosen windows
    embeds, additions = project(model, level0, sources)
    sel = chosen.view(-1, 1, 1)
    embeds = torch.where(sel, embeds, embeds.detach())
    k = embeds.shape[1]
    return embeds.reshape(b, nw * k, -1), [torch.where(sel, a, a.detach()).reshape(b, nw * k, -1) for a in additions]
