"""An RCC model's decoder as a folder vLLM loads (``config.json``, ``model.safetensors``,
tokenizer, chat template): the decoder's own transformers config with the architecture
:data:`ARCHITECTURE` (served by :mod:`rcc.vllm.model`) and an ``rcc`` section naming the
RCC model it belongs to. The encoder, G and A_i are not exported: they stay in rcc-llm,
which makes the slots (:mod:`rcc.vllm.slot_memory`). Imports no vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rcc import adapters
from rcc.errors import RCCError
from rcc.files import atomic_save_file, atomic_write_text, write_json
from rcc.prompts import ASSISTANT, END, HEADER

ARCHITECTURE = "RCCDecoderForCausalLM"
FORMAT = "rcc-vllm/1"
#: decoder model types the plugin serves, with the vLLM 0.32 class it wraps. GPT-NeoX
#: is missing: vLLM 0.32 has no GPT-NeoX class of its own (its registry sends it to the
#: generic Transformers backend, whose layers this plugin does not drive).
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def unsupported(model_type: str) -> RCCError:
    return RCCError(f"the vLLM plugin serves RCC decoders of type {', '.join(SUPPORTED)}; this decoder is "
                    f"{model_type!r}; serve it with the transformers engine (rcc serve --engine transformers)")


def chat_template() -> str:
    """Manual mode (docs/method.md section 2) as a chat template: the fixed header, the last user
    message, the assistant header. The slots are inserted before it by the plugin."""
    last_user = ("{%- for m in messages if m.role == 'user' -%}{%- if loop.last -%}"
                 "{%- if m.content is string -%}{{ m.content }}{%- else -%}"
                 "{%- for p in m.content if p.type == 'text' -%}{{ p.text }}{%- endfor -%}"
                 "{%- endif -%}{%- endif -%}{%- endfor -%}")
    return "{{- " + json.dumps(HEADER) + " -}}" + last_user + "{{- " + json.dumps(ASSISTANT) + " -}}"


def placeholder_token_id(tokenizer) -> int:
    """The token id the slot positions carry in vLLM's prompt (its embedding is replaced
    by the slot's, so any id in the vocabulary does): pad, else eos, else 0."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0


def rcc_section(cfg: dict) -> dict:
    """The ``rcc`` section of an exported config.

    Raises:
        RCCError: when the config is not an exported RCC decoder.
    """
    section = cfg.get("rcc")
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise RCCError(f"this is not an RCC decoder exported for vLLM (no 'rcc' section of format {FORMAT}); "
                       "make one with `rcc export-vllm`")
    return section


def export_decoder(model, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s decoder (an :class:`~rcc.RCCModel`'s, LoRA merged) to ``path`` for vLLM.

    Args:
        dtype: weight dtype of the folder (default: the model's).
    Returns:
        the folder.
    Raises:
        RCCError: for a decoder type the plugin does not serve, or a model without tokenizer.
    """
    decoder, tok = model.decoder, model.tokenizer
    model_type = decoder.config.model_type
    if model_type not in SUPPORTED:
        raise unsupported(model_type)
    if tok is None:
        raise RCCError("this RCC model has no tokenizer; vLLM needs one (load the model with its tokenizer)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.dtype
    state = adapters.merged_state(decoder) if adapters.has_lora(decoder) else decoder.state_dict()
    tied = bool(getattr(decoder.config, "tie_word_embeddings", False))
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state.items()
               if not (tied and k == "lm_head.weight")}
    atomic_save_file(tensors, path / "model.safetensors", {"format": "pt"})
    cfg = decoder.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "auto_map"):
        cfg.pop(key, None)  # the GGUF origin of the embedded backbone is not this folder's
    cfg["architectures"] = [ARCHITECTURE]
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["rcc"] = {"format": FORMAT, "model_id": model.fingerprint(), "window": model.config.window,
                  "ratio": model.config.ratio, "slots_per_window": model.config.slots_per_window,
                  "layers": len(model.A), "hidden_size": model.G.out_features,
                  "placeholder_token_id": placeholder_token_id(tok), "wraps": SUPPORTED[model_type],
                  "instruction_mode": getattr(model.config, "instruction_mode", None)}
    write_json(path / "config.json", cfg)
    gen = {k: getattr(decoder.generation_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    # plain `vllm serve` answers in manual mode, which ends at <|im_end|> (rcc.ask.AnswerDone) or eos
    end = tok.convert_tokens_to_ids(END)
    stops = [t for t in (tok.eos_token_id, end if end != tok.unk_token_id else None) if isinstance(t, int)]
    if stops:
        gen["eos_token_id"] = sorted(set(stops)) if len(set(stops)) > 1 else stops[0]
    write_json(path / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    tok.save_pretrained(str(path))
    atomic_write_text(path / "chat_template.jinja", chat_template())
    return path
