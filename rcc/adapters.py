"""LoRA adapters (peft) on a backbone, injected in place.

``peft.inject_adapter_in_model`` adds LoRA layers inside the backbone without
wrapping it, so the model keeps its class and :mod:`rcc.hooks` finds its layers
as before. A checkpoint then stores only the adapter weights and their config
(:mod:`rcc.checkpoint`), and loading re-applies them to the base backbone.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from rcc.errors import RCCError

ADAPTER = "default"


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise RCCError("LoRA needs the peft package: pip install 'rcc-llm[train]'") from None
    return LoraLayer


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> LoRA-wrapped layer (empty when peft is absent or nothing is wrapped)."""
    if not hasattr(model, "peft_config"):
        return {}
    layer_type = _lora_layer_type()
    return {name: m for name, m in model.named_modules() if isinstance(m, layer_type)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


@contextmanager
def disabled(model: nn.Module):
    """Run ``model`` as its base backbone: its LoRA adapters are bypassed inside
    the block (a no-op without adapters); which parameters train is restored."""
    layers = lora_layers(model)
    if not layers:
        yield model
        return
    flags = {p: p.requires_grad for p in model.parameters()}
    for layer in layers.values():
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: list[str] | None = None) -> dict:
    """Inject LoRA layers into ``model`` in place; returns their config (see :func:`lora_config`).

    ``target_modules=None`` uses peft's default for the architecture (e.g.
    ``query_key_value`` for GPT-NeoX, ``q_proj``/``v_proj`` for Llama).

    Raises:
        RCCError: when peft is missing or finds no module to adapt.
    """
    _lora_layer_type()
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:
        raise RCCError(f"cannot add LoRA to {type(model).__name__}: {str(err).splitlines()[0]}; "
                       "set lora_target_modules to names of its linear layers") from None
    return lora_config(model)


def lora_config(model: nn.Module) -> dict | None:
    """The JSON-serialisable settings of the adapters in ``model`` (None without any)."""
    if not has_lora(model):
        return None
    c = model.peft_config[ADAPTER]
    targets = c.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {"r": c.r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
            "target_modules": targets, "bias": c.bias}


def lora_state(model: nn.Module) -> dict:
    """The adapter tensors of ``model`` (keys as in its ``state_dict``)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def apply_lora(model: nn.Module, config: dict, state: dict, what: str = "backbone") -> None:
    """Re-create saved adapters on a base ``model`` and load their weights.

    Raises:
        RCCError: when the saved tensors do not match the adapters.
    """
    _lora_layer_type()
    from peft import LoraConfig, inject_adapter_in_model

    # the adapters are made on the meta device (no initialisation: the saved weights replace it,
    # a second of a load on a CPU) and then take the saved tensors, cast to the base weights' dtype
    inject_adapter_in_model(LoraConfig(**config), model, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    own = lora_state(model)
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise RCCError(f"{what}: adapter weights do not match (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise RCCError(f"{what}: adapter weight {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    base = next(p for n, p in model.named_parameters() if "lora_" not in n)
    model.load_state_dict({k: v.to(device=base.device, dtype=base.dtype) for k, v in state.items()},
                          strict=False, assign=True)


def base_state(model: nn.Module) -> dict:
    """``model.state_dict()`` of the base backbone: plain backbone keys, the adapters
    left out (what :func:`disabled` runs). ``model`` is unchanged; tensors are shared."""
    layers = lora_layers(model)
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        prefix, _, leaf = key.rpartition(".base_layer.")
        out[f"{prefix}.{leaf}" if prefix in layers else key] = value
    return out


def merged_state(model: nn.Module) -> dict:
    """``model.state_dict()`` as if the adapters were merged: plain backbone keys,
    base weights plus the LoRA update, no adapter tensors. ``model`` is unchanged."""
    layers = lora_layers(model)
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        prefix, _, leaf = key.rpartition(".base_layer.")
        if prefix in layers:
            if leaf == "weight":
                value = value + layers[prefix].get_delta_weight(ADAPTER).detach().to(value.dtype)
            key = f"{prefix}.{leaf}"
        out[key] = value
    return out


def merge_lora(model: nn.Module) -> None:
    """Merge the adapters into the base weights and remove them, in place.

    Raises:
        RCCError: when the base weights are shared with another model
            (:func:`rcc.backbones.shared_copy`): merging would change both.
    """
    if getattr(model, "rcc_shared_weights", False):
        raise RCCError("cannot merge LoRA adapters into base weights that the encoder and decoder share; "
                       "load the model with share_backbone=False")
    for name, layer in lora_layers(model).items():
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def _fast_forward(layer: nn.Module, peft_forward):
    """``base(x) + scaling * B(A(x))`` with the LoRA term added into the base
    output by one ``addmm_`` (peft computes it as two more full-size tensors:
    ``B(A(x)) * scaling`` and the sum, 20% of an encoder pass at r=16 on all
    linears). Only without gradients, for a plain unmerged LoRA adapter;
    anything else runs peft's own forward."""
    base = layer.get_base_layer()

    def forward(x: torch.Tensor, *args, **kwargs):
        if (torch.is_grad_enabled() or args or kwargs or layer.disable_adapters or layer.merged
                or layer.active_adapters != [ADAPTER] or ADAPTER in getattr(layer, "lora_variant", {})
                or not isinstance(layer.lora_dropout[ADAPTER], nn.Identity)):
            return peft_forward(x, *args, **kwargs)
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        result = base(x)
        if not result.is_contiguous():
            return result + layer.lora_B[ADAPTER](layer.lora_A[ADAPTER](x.to(a.dtype))).to(result.dtype) * layer.scaling[ADAPTER]
        low = F.linear(x.to(a.dtype), a).to(result.dtype)  # [..., r]
        result.view(-1, result.shape[-1]).addmm_(low.view(-1, low.shape[-1]), b.t().to(result.dtype),
                                                 alpha=layer.scaling[ADAPTER])
        return result

    return forward


@contextmanager
def fast_inference(*models: nn.Module):
    """Inside the block, LoRA layers of ``models`` add their update in place when
    no gradient is recorded (see :func:`_fast_forward`); restored on exit. The
    adapters stay unmerged, so base weights that the encoder and decoder share
    (:func:`rcc.backbones.shared_copy`) are never written. Blocks in several
    threads (the server) may overlap: a layer already switched is left to the
    block that switched it, and either forward computes the same function."""
    layers = [layer for m in models for layer in lora_layers(m).values() if "forward" not in vars(layer)]
    for layer in layers:
        layer.forward = _fast_forward(layer, layer.forward)
    try:
        yield
    finally:
        for layer in layers:  # back to the class's forward; pop: another thread's block may have restored it
            vars(layer).pop("forward", None)
