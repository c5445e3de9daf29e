"""The only module that reaches into a backbone: find its decoder layers and
inject per-layer additions at slot positions through forward hooks.

Spec section 1 (decoder): after decoder layer i the residual stream at slot
positions gets ``+ A_i(level)``. We do that with a forward hook on layer i.
The hook adds in place to the slot rows of the layer's output when that is
provably safe (the output is a fresh tensor that no input shares and whose
autograd node does not need it for its backward, see :func:`_may_add_in_place`),
so the whole hidden state is not copied once per layer; otherwise it returns a
new tensor. Gradient checkpointing in transformers wraps a layer's ``forward``,
not its ``__call__``, so the hooks run outside the checkpointed region either way.

Spec section 1 (encoder): :func:`capture` records the levels the encoder
reports with ``output_hidden_states=True`` (level 0 = input of the first layer,
level j = output of layer j-1) through hooks too, keeping only what the caller
selects from each (the slot positions) instead of every level at every position.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from rcc.errors import RCCError

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


# autograd nodes whose backward does not read their own result: a slot-row add on
# such an output leaves every saved tensor intact
_SAFE_IN_PLACE = {"AddBackward0"}


def _tensors(args, kwargs) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


def _may_add_in_place(hidden: torch.Tensor, args, kwargs) -> bool:
    """Whether ``hidden[:, :n] += add`` is safe on a layer output: not a view,
    not a leaf that requires grad, no input shares its storage (a layer that
    returns its input), and, under autograd, produced by an op whose backward
    does not need it (the residual add of every transformers decoder layer).
    A compiled or unusual layer falls back to an out-of-place add."""
    if hidden._base is not None or (hidden.is_leaf and hidden.requires_grad):
        return False
    ptr = hidden.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == ptr for t in _tensors(args, kwargs) if t.layout == torch.strided):
        return False
    if hidden.grad_fn is not None:
        return type(hidden.grad_fn).__name__ in _SAFE_IN_PLACE
    return True


@contextlib.contextmanager
def inject(layers: Sequence[nn.Module], additions: Sequence[torch.Tensor | None],
           in_place: bool = True) -> Iterator[None]:
    """Add ``additions[i]`` to the first positions of layer i's output, inside the block.

    Args:
        layers: the decoder's blocks, ``len(layers) == len(additions)``.
        additions: ``additions[i]: [batch, slots, hidden]`` (or None for none);
            added to output positions ``0 .. slots-1`` of the current forward
            call, so the slots must be at the start of that call's sequence.
        in_place: add into the layer's output when that is safe (see
            :func:`_may_add_in_place`); False always builds a new tensor.

    The hooks are removed on exit, also on an exception. Outside the context
    nothing is injected, so cached decode steps can never be touched.
    """
    assert len(layers) == len(additions), (len(layers), len(additions))
    handles = []

    def make_hook(add: torch.Tensor):
        def hook(_module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            n = add.shape[1]
            if hidden.shape[1] < n:
                raise RuntimeError(f"injection of {n} slots into a {hidden.shape[1]}-token call")
            if in_place and _may_add_in_place(hidden, args, kwargs):
                hidden[:, :n] += add.to(hidden.dtype)
                return output
            new = torch.cat([hidden[:, :n] + add.to(hidden.dtype), hidden[:, n:]], dim=1)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return new

        return hook

    try:
        for layer, add in zip(layers, additions):
            if add is not None:
                handles.append(layer.register_forward_hook(make_hook(add), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(layers: Sequence[nn.Module], levels: Sequence[int],
            keep: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[dict[int, torch.Tensor]]:
    """Record ``keep(level j)`` for each ``j`` in ``levels`` during a forward pass of the body.

    Level 0 is the input of ``layers[0]`` (the embeddings, as
    ``output_hidden_states`` reports them) and level j the output of
    ``layers[j-1]``; the final level after the final norm is the body's
    ``last_hidden_state``, which the caller reads itself.

    Args:
        layers: the backbone's blocks.
        levels: which levels to record, each in ``0 .. len(layers)``.
        keep: ``[batch, tokens, hidden] -> `` what to hold (e.g. the slot
            positions); it must return a tensor that does not view the level,
            or the whole level stays alive.
    Yields:
        ``{level: keep(level)}``, filled as the forward pass runs.
    """
    found: dict[int, torch.Tensor] = {}
    handles = []

    def first(_module, args, kwargs):
        found[0] = keep(args[0] if args else kwargs["hidden_states"])

    def after(j: int):
        def hook(_module, _args, output):
            found[j] = keep(output[0] if isinstance(output, tuple) else output)

        return hook

    try:
        for j in sorted(set(levels)):
            if j == 0:
                handles.append(layers[0].register_forward_pre_hook(first, with_kwargs=True))
            else:
                handles.append(layers[j - 1].register_forward_hook(after(j)))
        yield found
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
