"""The decoder's next-token loss without ``[batch, prompt, vocab]`` logits (docs/method.md section 3).

The loss is the LM head + cross-entropy over the labelled positions only,
fused so that logits exist for one chunk of rows at a time:

- on CUDA, Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` when it is
  installed (``pip install liger-kernel``; optional, not run in our CI);
- otherwise :class:`ChunkedLinearCrossEntropy`, plain torch: each chunk's
  logits are computed, reduced and turned into the gradients of the hidden
  states and the head right away, then freed (three matmuls per chunk, as the
  unfused loss does; no recomputation in backward);
- a head that is not a plain ``nn.Linear`` (e.g. LoRA on the LM head) runs
  chunk by chunk under activation checkpointing (its logits are recomputed in
  backward, one chunk at a time).

Backbones whose logits are more than ``head(hidden)`` (soft-capping, logit
scales) are detected by :func:`plain_head`; the model then uses the decoder's
own logits and the plain loss.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
# config fields of transformers backbones that change logits after the LM head
_AFTER_HEAD = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling", "dim_model_base",
               "lm_head_multiplier", "output_multiplier_scale")
# logits held at once per chunk: 2**23 floats = 32 MiB (about 170 rows of a 49k vocabulary)
CHUNK_ELEMENTS = 2**23


def plain_head(decoder: nn.Module) -> nn.Module | None:
    """The decoder's LM head when its logits are exactly ``head(last_hidden_state)``,
    else None (soft-capping or scaling after the head: use the decoder's own forward)."""
    head = decoder.get_output_embeddings()
    if head is None:
        return None
    cfg = decoder.config
    if any(getattr(cfg, name, None) is not None for name in _AFTER_HEAD):
        return None
    return head


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum over rows of CE(hidden @ weight.T + bias, targets)`` / counted rows,
    one chunk of rows at a time.

    The forward pass also computes the gradients (scaled by 1/count), so
    backward only multiplies them by the incoming gradient: no logits are
    kept, none are recomputed.

    Args (of ``apply``):
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or None;
        targets: ``[N]`` (``IGNORE`` = not counted); chunk: rows per chunk;
        needs: which of (hidden, weight, bias) need a gradient.
    Returns:
        the mean loss, a 0-dim tensor (float32 for half inputs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, needs: tuple[bool, bool, bool]):
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        valid = targets != IGNORE
        count = valid.sum().to(acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        g_hidden = torch.empty_like(hidden) if needs[0] else None
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        g_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs[2] else None
        for s in range(0, hidden.shape[0], chunk):
            h, t, v = hidden[s : s + chunk], targets[s : s + chunk], valid[s : s + chunk]
            logits = F.linear(h, weight, bias).to(acc)  # [rows, V]
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((lse - picked) * v).sum()
            if not any(needs):
                continue
            # d CE / d logits = softmax - one-hot, zero on ignored rows
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
            grad.mul_(v.unsqueeze(1).to(acc))
            if g_hidden is not None:
                g_hidden[s : s + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if g_weight is not None:
                g_weight.addmm_(grad.t(), h.to(acc))
            if g_bias is not None:
                g_bias += grad.sum(0)
        scale = 1.0 / count
        ctx.grads = [None if g is None else g.mul_(scale.to(g.dtype)) for g in (g_hidden, g_weight, g_bias)]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        out = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            out.append(None if g is None else (g * grad_out.to(g.dtype)).to(dtype))
        ctx.grads = None
        return (*out, None, None, None)


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _module_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Any head module, chunk by chunk under non-reentrant checkpointing."""

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum")

    chunk = _chunk_rows(getattr(head, "out_features", None) or head.weight.shape[0])
    total = None
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        value = checkpoint(part, h, t, use_reentrant=False) if torch.is_grad_enabled() else part(h, t)
        total = value if total is None else total + value
    return total / (targets != IGNORE).sum().to(total.dtype)


def _liger():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         kernel: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets``, without all logits at once.

    Args:
        hidden: ``[N, H]`` final hidden states (after the final norm).
        head: the LM head (``[V, H]``).
        targets: ``[N]`` token ids, ``-100`` = not counted.
        kernel: ``"auto"`` (Liger on CUDA when installed, else chunked torch),
            ``"torch"`` (always the chunked torch version) or ``"liger"``.
    Returns:
        a 0-dim tensor, NaN when no target is counted (as ``F.cross_entropy``).
    """
    plain_linear = isinstance(head, nn.Linear)
    if plain_linear and hidden.is_cuda and kernel in ("auto", "liger"):
        liger = _liger()
        if liger is not None:
            return liger(ignore_index=IGNORE, reduction="mean")(head.weight, hidden.to(head.weight.dtype), targets,
                                                                 head.bias)
    if not plain_linear:
        return _module_loss(hidden, head, targets)
    grad = torch.is_grad_enabled()
    bias = head.bias
    needs = (grad and hidden.requires_grad, grad and head.weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    hidden = hidden.to(head.weight.dtype)
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, bias, targets, _chunk_rows(head.weight.shape[0]), needs)


def next_token_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Spec section 3: mean next-token cross-entropy over counted labels.

    Args:
        hidden: ``[batch, m, H]``; ``hidden[:, t]`` predicts ``labels[:, t]``
            (the caller aligns them: the first label is predicted from the last slot).
        head: the decoder's LM head (see :func:`plain_head`).
        labels: ``[batch, m]``, -100 = not counted.
    Returns:
        the mean loss (0-dim).
    """
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not hidden.is_cuda:
        # only the labelled rows; on CUDA the boolean gather would wait for the
        # device, so ignored rows go through the kernel and are masked there
        keep = targets != IGNORE
        flat, targets = flat[keep], targets[keep]
    return linear_cross_entropy(flat, head, targets)
