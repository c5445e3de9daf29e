"""The model ``rcc train`` trains: built from a config, frozen weights cast,
layers compiled, AdamW groups, and FSDP / DeepSpeed wrapping and gathering.

:mod:`rcc.train` runs the loop over what this module builds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from rcc import adapters
from rcc.backbones import shared_copy
from rcc.data import load_tokenizer
from rcc.errors import RCCError
from rcc.loading import quiet_gc
from rcc.model import RCCModel
from rcc.train.config import TrainConfig

# its lines are rcc train's: one logger, whose level `rcc train` (rcc.cli) raises to INFO
log = logging.getLogger("rcc.train")

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _backbone(spec, dtype: torch.dtype, seed: int):
    """``(causal LM, tokenizer or None, source or None)`` from a backbone spec."""
    from rcc.backbones import EMBEDDED, load_backbone, model_from_config

    if isinstance(spec, dict):  # inline config: random weights (tests, toy runs)
        torch.manual_seed(seed)
        return model_from_config(spec, dtype, "the inline backbone config").train(), None, None
    source = spec if spec == EMBEDDED or not Path(spec).exists() else str(Path(spec).resolve())
    model, tok = load_backbone(source, dtype)
    return model, tok, source


@quiet_gc()  # the collector held off while the backbones load (rcc.loading.quiet_gc)
def build_model(cfg: TrainConfig, share_backbone: bool | None = None) -> RCCModel:
    """The model a config describes, with LoRA added and parameters frozen as asked.

    When both sides come from the same backbone and neither trains in full,
    they share its frozen weights (:func:`rcc.backbones.shared_copy`; the
    model's weights in memory halve; checkpoints are unchanged).

    A side trained in full no longer equals its source backbone, so its
    ``encoder_source``/``decoder_source`` is cleared (the saved model then
    carries the weights); frozen and LoRA sides keep it (the saved model
    carries only adapters, G and A_i).

    Raises:
        RCCError: on unloadable backbones or settings that contradict ``init_from``.
    """
    dtype = getattr(torch, cfg.model.dtype)
    # one backbone for both sides when neither trains in full (its weights are never
    # written); FSDP / DeepSpeed shard each side's layers apart, so they get two copies
    # (share_backbone=False: whoever shards the layers without accelerate's variables)
    share = share_backbone if share_backbone is not None else "full" not in (
        cfg.model.train_encoder, cfg.model.train_decoder) and not any(
        os.environ.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    share = share and "full" not in (cfg.model.train_encoder, cfg.model.train_decoder)
    if cfg.model.init_from:
        model = RCCModel.from_pretrained(cfg.model.init_from, dtype=dtype, share_backbone=share)
        if cfg.model.window is not None and cfg.model.window != model.config.window:
            raise RCCError(f"init_from {cfg.model.init_from} has window={model.config.window} but the config asks "
                           f"for {cfg.model.window}; remove model.window from the config or start from fresh backbones")
        # no parameter depends on the ratio or the pooling: a later stage may change them
        changes = {k: v for k, v in cfg.model.rcc_fields().items() if v != getattr(model.config, k)}
        if changes:
            model.config = cfg.model.rcc_config(model.config)  # validated (window % ratio)
            log.info("init_from %s: continuing with %s", cfg.model.init_from,
                     ", ".join(f"{k}={v!r}" for k, v in changes.items()))
    else:
        enc_spec = cfg.model.encoder_backbone or cfg.model.backbone
        dec_spec = cfg.model.decoder_backbone or cfg.model.backbone
        enc, tok, enc_src = _backbone(enc_spec, dtype, cfg.run.seed)
        if share and dec_spec == enc_spec:  # same source (or inline config and seed): same weights
            dec, tok_d, dec_src = shared_copy(enc), tok, enc_src
        else:
            dec, tok_d, dec_src = _backbone(dec_spec, dtype, cfg.run.seed)
        rcc = cfg.model.rcc_config()  # unset window / ratio / pooling: RCCConfig's defaults
        model = RCCModel.from_backbones(enc, dec, window=rcc.window, ratio=rcc.ratio, pooling=rcc.pooling,
                                        tokenizer=tok or tok_d, encoder_source=enc_src, decoder_source=dec_src)
    if cfg.model.tokenizer:
        model.tokenizer = load_tokenizer(cfg.model.tokenizer)
    for side, mode in (("encoder", cfg.model.train_encoder), ("decoder", cfg.model.train_decoder)):
        lm = getattr(model, side)
        if mode == "full" and adapters.has_lora(lm):
            adapters.merge_lora(lm)  # adapters of an earlier stage become part of the weights
        if mode == "lora" and not adapters.has_lora(lm):
            m = cfg.model
            adapters.add_lora(lm, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
        for name, p in lm.named_parameters():
            p.requires_grad_(mode == "full" or (mode == "lora" and "lora_" in name))
        if mode == "full":
            setattr(model.config, f"{side}_source", None)
        if cfg.model.gradient_checkpointing and mode != "frozen":
            # non-reentrant: the hooks' additions reach the layers by closure, not as inputs
            enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.2x
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head, emb = model.encoder.get_output_embeddings(), model.encoder.get_input_embeddings()
    if head is not None and head.weight is not emb.weight:
        head.weight.requires_grad_(False)  # the encoder's LM head never runs (DDP would wait for its gradient)
    for p in [*model.G.parameters(), *model.A.parameters()]:
        p.requires_grad_(True)
    return model


def resolve_precision(cfg: TrainConfig, cuda: bool) -> str:
    """The run's ``mixed_precision`` with ``auto`` resolved (:func:`rcc.precision.auto_precision`):
    bf16 on a GPU that has it, fp16 on an older GPU; on a CPU bf16 where it has native
    bf16 matrix units, else ``"no"`` (float32)."""
    if cfg.run.mixed_precision != "auto":
        return cfg.run.mixed_precision
    from rcc.precision import auto_precision

    return auto_precision(cuda)


def resolve_frozen_dtype(cfg: TrainConfig, precision: str, sharded: bool = False) -> torch.dtype:
    """The dtype frozen backbone weights are stored in (``cfg.model.frozen_dtype`` resolved).

    ``auto``: the compute dtype (``precision``'s autocast dtype, else ``cfg.model.dtype``),
    so that autocast finds them already cast; ``cfg.model.dtype`` under FSDP / DeepSpeed.

    Raises:
        RCCError: for a value that is neither ``cfg.model.dtype`` nor the compute dtype,
            or a reduced one under FSDP / DeepSpeed.
    """
    base = getattr(torch, cfg.model.dtype)
    compute = _AUTOCAST.get(precision, base)
    if cfg.model.frozen_dtype == "auto":
        return base if sharded else compute
    frozen = getattr(torch, cfg.model.frozen_dtype)
    if frozen not in (base, compute):
        raise RCCError(f"model.frozen_dtype={cfg.model.frozen_dtype} is neither model.dtype ({cfg.model.dtype}) nor "
                       f"the compute dtype of run.mixed_precision={precision}; set model.frozen_dtype=auto")
    if sharded and frozen != base:
        raise RCCError(f"model.frozen_dtype={cfg.model.frozen_dtype} under FSDP / DeepSpeed: their shards hold one "
                       "dtype; leave model.frozen_dtype=auto and let their mixed precision cast")
    return frozen


def store_frozen(model: RCCModel, cfg: TrainConfig, dtype: torch.dtype) -> int:
    """Cast the frozen floating-point weights of the sides not trained in full
    to ``dtype``, in place (once, so that autocast does not re-cast them on
    every forward). Trainable parameters (LoRA, G, A_i) keep their dtype; a
    side trained in full is left whole. Returns the number of tensors cast."""
    cast = 0
    for side, mode in (("encoder", cfg.model.train_encoder), ("decoder", cfg.model.train_decoder)):
        if mode == "full":
            continue
        for p in getattr(model, side).parameters():  # tied weights are listed once
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += 1
    return cast


def compile_layers(model: RCCModel) -> int:
    """``torch.compile`` the own ``forward`` of every decoder layer of both sides.

    Module hooks (RCC's injections, :mod:`rcc.hooks`; FSDP's) run in
    ``Module.__call__``, which stays eager, so they fire outside the compiled
    region and a new context never forces a recompilation. Returns the number
    of layers compiled.
    """
    from rcc import hooks

    count = 0
    for side in (model.encoder, model.decoder):
        for layer in hooks.decoder_layers(side):
            layer.forward = torch.compile(layer.forward)
            count += 1
    return count


def make_optimizer(model: RCCModel, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`: one fused kernel on a GPU, multi-tensor
    (``foreach``) updates on a CPU, never a Python loop over tensors."""
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg), betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), **kind)


def param_groups(model: RCCModel, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: encoder / decoder / glue (G, A_i), each with its learning
    rate; weight decay on matrices only.

    Raises:
        RCCError: when nothing is trainable.
    """
    lrs = {"encoder": cfg.optim.lr_encoder, "decoder": cfg.optim.lr_decoder, "glue": cfg.optim.lr_glue}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "glue" if name.startswith(("G.", "A.")) else name.split(".", 1)[0]
        decay = p.ndim >= 2 and cfg.optim.weight_decay > 0
        group = groups.setdefault((part, decay), {
            "name": part if decay or cfg.optim.weight_decay == 0 else f"{part}/no_decay", "params": [],
            "lr": cfg.optim.lr if lrs[part] is None else lrs[part],
            "weight_decay": cfg.optim.weight_decay if decay else 0.0})
        group["params"].append(p)
    if not groups:
        raise RCCError("nothing to train: every parameter is frozen")
    return list(groups.values())


def wrap_by_layer_class(accelerator, model: RCCModel) -> None:
    """Make FSDP's transformer auto-wrap shard each decoder layer of both
    backbones: the plugin's class names come from the backbones themselves
    when the accelerate config leaves them unset.

    Raises:
        RCCError: when the config names a layer class this model does not have.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from rcc import hooks

    plugin = accelerator.state.fsdp_plugin
    if plugin is None or plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return  # size-based, none, or already resolved
    own = sorted({type(layer).__name__ for side in (model.encoder, model.decoder)
                  for layer in hooks.decoder_layers(side)})
    named = plugin.transformer_cls_names_to_wrap
    if not named:
        plugin.transformer_cls_names_to_wrap = own
        log.info("FSDP wraps each %s", " / ".join(own))
        return
    present = {type(m).__name__ for m in model.modules()}
    absent = [n for n in named if n not in present]
    if absent:
        raise RCCError(f"the accelerate config's fsdp_transformer_layer_cls_to_wrap names {', '.join(absent)}, which "
                       f"this model does not have; its decoder layers are {', '.join(own)} (or leave it unset)")


def gathered_model(state: dict[str, torch.Tensor], like: RCCModel) -> RCCModel:
    """An ordinary :class:`RCCModel` holding the gathered full ``state`` (FSDP /
    DeepSpeed), built on the meta device from ``like``'s backbone configs:
    nothing is read from disk and no weight is allocated a second time.

    Raises:
        RuntimeError: when ``state`` does not fill the model (an internal error).
    """
    from transformers import AutoModelForCausalLM

    sides = {}
    with torch.device("meta"):
        for side in ("encoder", "decoder"):
            source = getattr(like, side)
            lm = AutoModelForCausalLM.from_config(source.config)
            lora = adapters.lora_config(source)
            if lora is not None:
                adapters.add_lora(lm, lora["r"], lora["lora_alpha"], lora["lora_dropout"], lora["target_modules"])
            sides[side] = lm
        plain = RCCModel(sides["encoder"], sides["decoder"], like.config, tokenizer=like.tokenizer)
    _, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    for lm in sides.values():
        lm.tie_weights()  # assign=True replaced tied parameters one by one
    empty = [k for k, v in plain.state_dict().items() if v.is_meta]
    if empty or unexpected:
        raise RuntimeError(f"gathered state does not fit the model: unfilled {empty[:3]}, unexpected {unexpected[:3]}")
    return plain


def final_model(accelerator, model) -> RCCModel:
    """The trained model as one ordinary module (FSDP / DeepSpeed gather their shards)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state = accelerator.get_state_dict(model)  # full weights on the main process
        if not accelerator.is_main_process:
            return accelerator.unwrap_model(model)
        return gathered_model(state, accelerator.unwrap_model(model))
    return accelerator.unwrap_model(model)


def trainable_summary(model: RCCModel) -> str:
    parts = {}
    for name, p in model.named_parameters():
        part = "glue" if name.startswith(("G.", "A.")) else name.split(".", 1)[0]
        total, train = parts.get(part, (0, 0))
        parts[part] = (total + p.numel(), train + (p.numel() if p.requires_grad else 0))
    return ", ".join(f"{k} {t / 1e6:.2f}M of {n / 1e6:.2f}M" for k, (n, t) in parts.items())
