"""Checkpoint formats: ours (``rcc_config.json`` + ``model.safetensors``) and
the authors' released layout (docs/method.md section 5).

Reading returns the parts of a model (:class:`Parts`: backbones, config,
tokenizer, the G and A_i weights); :meth:`rcc.RCCModel.from_parts` assembles
them. This module never imports :mod:`rcc.model`: the model reads checkpoints,
not the reverse (:func:`save_pretrained` takes any object with the model's
attributes).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rcc.adapters import apply_lora, has_lora, lora_config, lora_state, merged_state
from rcc.backbones import load_backbone, model_from_config, resolve_local_or_hub, shared_copy
from rcc.bundled import resolve_bundled
from rcc.config import CONFIG_FILE, RCCConfig
from rcc.errors import RCCError
from rcc.files import atomic_save_file, atomic_write_text

log = logging.getLogger(__name__)

CONFIG_NAME = CONFIG_FILE
WEIGHTS_NAME = "model.safetensors"
_IGNORABLE_BUFFERS = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
_HEADS = ("embed_out.weight", "lm_head.weight")


@dataclass
class Parts:
    """A checkpoint read from disk, before :meth:`rcc.RCCModel.from_parts` assembles it.

    Attributes:
        encoder, decoder: the backbones (causal LMs) with their weights loaded.
        config: the model's :class:`RCCConfig`.
        tokenizer: the tokenizer found with the checkpoint, or None.
        glue: the projections' weights, ``G.weight [H_D, H_E]`` and
            ``A.{i}.weight [H_D, H_E]`` per decoder layer.
        dtype: the dtype the model is cast to once assembled (None: as built).
        source: what was read (for error messages).
    """

    encoder: torch.nn.Module
    decoder: torch.nn.Module
    config: RCCConfig
    tokenizer: object | None
    glue: dict[str, torch.Tensor]
    dtype: torch.dtype | None
    source: str


def load_glue(model, glue: dict[str, torch.Tensor], what: str) -> None:
    """Load G and A_i of ``model`` (an :class:`~rcc.RCCModel`) from ``glue``, strictly.

    Raises:
        RCCError: on missing, unexpected or mis-shaped weights.
    """
    _load_strict(torch.nn.ModuleDict({"G": model.G, "A": model.A}), glue, what)


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read tensors from files sorted by name; a tensor in several files is
    concatenated along dim 0 in that order (the original loader's rule)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for f in sorted(files, key=lambda p: p.name):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    parts.setdefault(k, []).append(fh.get_tensor(k))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise RCCError(f"{f}: cannot read weights ({err}); the file is truncated or corrupt, download it again") from None
    return {k: v[0] if len(v) == 1 else torch.cat(v, dim=0) for k, v in parts.items()}


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:4])})")
        raise RCCError(f"{what}: {'; '.join(msg)}; these weights do not belong to this architecture")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise RCCError(f"{what}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=True)


def _fix_head_name(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map the GPT-NeoX head between ``embed_out`` (old transformers) and ``lm_head`` (new)."""
    own = module.state_dict()
    out = dict(state)
    for a, b in (_HEADS, _HEADS[::-1]):
        if a in out and a not in own and b in own and b not in out:
            out[b] = out.pop(a)
    return out


def _drop_buffers(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    own = module.state_dict()
    return {k: v for k, v in state.items() if k in own or not k.endswith(_IGNORABLE_BUFFERS)}


def read_original(weights: str, base_model, dtype: torch.dtype | None = None, tokenizer=None) -> Parts:
    """Read the authors' released RCC checkpoint (docs/method.md section 5); see :meth:`rcc.RCCModel.from_original`.

    Args:
        weights: a folder of safetensors files, one file, or a hub id
            (e.g. ``fcyp/RCC_Ins_Reconstruction``).
        base_model: the backbone's config: a ``PretrainedConfig``, a folder or
            hub id (e.g. ``EleutherAI/pythia-1.4b``) or a ``config.json`` path.
        dtype: parameter dtype (default: as stored).
        tokenizer: a tokenizer; by default loaded from ``base_model`` when it is a path or id.
    Raises:
        RCCError: on missing or unexpected keys, unreadable files, or an unknown source.
    """
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

    if isinstance(base_model, PretrainedConfig):
        cfg = base_model.to_dict()
    else:
        p = Path(str(base_model))
        if p.is_file():
            cfg = json.loads(p.read_text())
        else:
            try:
                cfg = AutoConfig.from_pretrained(str(base_model)).to_dict()
            except (OSError, ValueError) as err:
                raise RCCError(f"cannot load the base model config {base_model!r}: {str(err).splitlines()[0]}") from None
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
                except (OSError, ValueError):
                    log.warning("no tokenizer found for %s", base_model)
    src = resolve_local_or_hub(weights, allow_patterns=["*.safetensors", "*.json"])
    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    if not files:
        raise RCCError(f"{weights}: no .safetensors files found")
    state = _read_safetensors(files)
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    enc_state, dec_state, glue = {}, {}, {}
    for k, v in state.items():
        if k.startswith("gpt_neox.rcc_encoder."):
            enc_state[k[len("gpt_neox.rcc_encoder.") :]] = v
        elif k == "gpt_neox.rcc_encoder2gpt_embed.weight":
            glue["G.weight"] = v
        elif m := re.fullmatch(r"gpt_neox\.rcc_encoder2gpt_A_matrix\.(\d+)\.weight", k):
            glue[f"A.{m.group(1)}.weight"] = v
        elif k == "gpt_neox.embed_out.weight":
            continue  # unused by the released model
        else:
            dec_state[k] = v
    encoder = model_from_config(cfg, dtype, f"{base_model} (base model config)")
    decoder = model_from_config(cfg, dtype, f"{base_model} (base model config)")
    _load_strict(encoder, _drop_buffers(_fix_head_name(enc_state, encoder), encoder), f"{weights} (encoder)")
    _load_strict(decoder, _drop_buffers(_fix_head_name(dec_state, decoder), decoder), f"{weights} (decoder)")
    config = RCCConfig(encoder_config=cfg, decoder_config=cfg, trained=True)
    return Parts(encoder, decoder, config, tokenizer, {k: v.to(dtype) for k, v in glue.items()}, dtype, str(weights))


def save_pretrained(model, path, include_backbones: bool | None = None) -> None:
    """Save in our format: ``rcc_config.json``, ``model.safetensors`` (+ ``tokenizer/``).

    With ``include_backbones=False`` only G and A_i are written and the
    backbones are reloaded from ``config.encoder_source``/``decoder_source``.

    Raises:
        RCCError: when backbones are left out but their source is unknown.
    """
    path = Path(path)
    cfg = model.config
    if include_backbones is None:
        include_backbones = not (cfg.encoder_source and cfg.decoder_source)
    if not include_backbones and not (cfg.encoder_source and cfg.decoder_source):
        raise RCCError("cannot leave the backbones out: the config names no encoder_source/decoder_source to reload them from")
    state = {f"G.{k}": v for k, v in model.G.state_dict().items()}
    state.update({f"A.{k}": v for k, v in model.A.state_dict().items()})
    adapters = {}
    for side in ("encoder", "decoder"):
        module = getattr(model, side)
        if include_backbones:  # LoRA adapters are merged: plain backbone weights
            state.update({f"{side}.{k}": v for k, v in (merged_state(module) if has_lora(module) else module.state_dict()).items()})
        elif has_lora(module):  # only the adapters; load re-applies them to the source backbone
            adapters[side] = lora_config(module)
            state.update({f"{side}.{k}": v for k, v in lora_state(module).items()})
    tensors, aliases, seen = {}, {}, {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            aliases[k] = seen[ptr]  # tied weights are stored once
            continue
        seen[ptr] = k
        tensors[k] = v.detach().cpu().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "rcc/1", "aliases": json.dumps(aliases), "backbones": str(include_backbones)}
    if adapters:
        meta["adapters"] = json.dumps(adapters)
    atomic_save_file(tensors, path / WEIGHTS_NAME, meta)
    atomic_write_text(path / CONFIG_NAME, cfg.to_json())
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path / "tokenizer"))


def read_pretrained(name_or_path: str, dtype: torch.dtype | None = None, share_backbone: bool = True) -> Parts:
    """Read a model saved by :func:`save_pretrained` from a folder, hub id or
    bundled model name (``rcc-smollm2-135m``, see :mod:`rcc.bundled`); see
    :meth:`rcc.RCCModel.from_pretrained`.

    ``share_backbone``: when the checkpoint stores no backbone weights and both
    sides come from the same source (the bundled model: one SmolLM2, two LoRA
    adapters), the source is loaded once and both sides hold the same frozen
    tensors (:func:`rcc.backbones.shared_copy`); False loads two copies (needed
    to train a side in full or to merge its adapters).

    Raises:
        RCCError: when the folder is not an RCC checkpoint, files are corrupt or
            mismatched, or a bundled model's weights are missing.
    """
    from transformers import AutoTokenizer

    root = resolve_local_or_hub(resolve_bundled(name_or_path))
    if not (root / CONFIG_NAME).is_file():
        raise RCCError(
            f"{name_or_path}: no {CONFIG_NAME}; not an rcc-llm checkpoint (for the authors' released "
            "weights use from_original / --base-model)"
        )
    try:
        config = RCCConfig.from_dict(json.loads((root / CONFIG_NAME).read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise RCCError(f"{root / CONFIG_NAME}: unreadable config ({err})") from None
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise RCCError(f"{name_or_path}: {WEIGHTS_NAME} is missing")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise RCCError(f"{weights}: cannot read weights ({err}); the file is truncated or corrupt") from None
    state = _read_safetensors([weights])
    for alias, target in json.loads(meta.get("aliases", "{}")).items():
        state[alias] = state[target]
    if dtype is None:  # keep the stored precision (e.g. float64 checkpoints stay float64) ...
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
        if dtype in (torch.bfloat16, torch.float16) and meta.get("backbones") == "False":
            dtype = torch.float32  # ... but half-precision maps over a full-precision backbone are storage only
    tokenizer = None
    if (root / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    if meta.get("backbones") == "False":
        encoder, tok = load_backbone(config.encoder_source, dtype)
        if share_backbone and config.decoder_source == config.encoder_source:
            decoder = shared_copy(encoder)
        else:
            decoder, _ = load_backbone(config.decoder_source, dtype)
        tokenizer = tokenizer or tok
        for side, module in (("encoder", encoder), ("decoder", decoder)):
            lora = json.loads(meta.get("adapters", "{}")).get(side)
            if lora is not None:
                mine = {k[len(side) + 1 :]: v for k, v in state.items() if k.startswith(side + ".")}
                apply_lora(module, lora, mine, f"{weights} ({side} adapters)")
    else:
        encoder = model_from_config(config.encoder_config, dtype, f"{root / CONFIG_NAME} (encoder_config)")
        decoder = model_from_config(config.decoder_config, dtype, f"{root / CONFIG_NAME} (decoder_config)")
        _load_strict(encoder, {k[8:]: v for k, v in state.items() if k.startswith("encoder.")}, f"{weights} (encoder)")
        _load_strict(decoder, {k[8:]: v for k, v in state.items() if k.startswith("decoder.")}, f"{weights} (decoder)")
    glue = {k: v for k, v in state.items() if k.startswith(("G.", "A."))}
    return Parts(encoder, decoder, config, tokenizer, glue, dtype, str(weights))
