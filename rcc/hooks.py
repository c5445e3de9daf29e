"""The only module that reaches into a backbone: find its decoder layers and
inject per-layer additions at slot positions through forward hooks.

Spec section 1 (decoder): after decoder layer i the residual stream at slot
positions gets ``+ A_i(level)``. We do that with a forward hook on layer i that
returns a new tensor (no in-place writes, so autograd and gradient
checkpointing see an ordinary function of the layer output).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import RCCError

_LAYER_PATHS = ("layers", "h", "decoder.layers", "blocks", "transformer.h", "model.layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the list of transformer blocks of a causal LM.

    Tries ``model.base_model.<path>`` for the usual paths (``layers`` covers
    GPT-NeoX, Llama, Qwen2, Mistral; ``h`` covers GPT-2-likes).

    Raises:
        RCCError: naming the class and the paths tried when none matches.
    """
    base = getattr(model, "base_model", model)
    for path in _LAYER_PATHS:
        obj: object = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise RCCError(
        f"cannot find the decoder layers of {type(model).__name__}: tried "
        f"{', '.join('base_model.' + p for p in _LAYER_PATHS)}; this backbone is not supported"
    )


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a causal LM's ``forward`` / ``generate`` takes its KV cache by:
    transformers renamed ``past_key_values`` to ``cache`` (5.2x); use what this version takes."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def backbone_body(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (no LM head), e.g. ``model.gpt_neox``."""
    return getattr(model, "base_model", model)


def embedding_layer(model: nn.Module) -> nn.Module:
    return model.get_input_embeddings()


@contextlib.contextmanager
def inject(layers: Sequence[nn.Module], additions: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Add ``additions[i]`` to the first positions of layer i's output, inside the block.

    Args:
        layers: the decoder's blocks, ``len(layers) == len(additions)``.
        additions: ``additions[i]: [batch, slots, hidden]`` (or None for none);
            added to output positions ``0 .. slots-1`` of the current forward
            call, so the slots must be at the start of that call's sequence.

    The hooks are removed on exit, also on an exception. Outside the context
    nothing is injected, so cached decode steps can never be touched.
    """
    assert len(layers) == len(additions), (len(layers), len(additions))
    handles = []

    def make_hook(add: torch.Tensor):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            n = add.shape[1]
            if hidden.shape[1] < n:
                raise RuntimeError(f"injection of {n} slots into a {hidden.shape[1]}-token call")
            new = torch.cat([hidden[:, :n] + add.to(hidden.dtype), hidden[:, n:]], dim=1)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return new

        return hook

    try:
        for layer, add in zip(layers, additions):
            if add is not None:
                handles.append(layer.register_forward_hook(make_hook(add)))
        yield
    finally:
        for h in handles:
            h.remove()


def absolute_position_limit(model: nn.Module) -> int | None:
    """The number of positions a backbone with learned absolute position
    embeddings can address, or None when it uses relative (rotary/ALiBi) ones."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and ("pos" in name.lower() or name.endswith("wpe")):
            return module.num_embeddings
    return None
