"""The RCC decoder inside vLLM 0.32: a model class that wraps vLLM's own Llama /
Mistral / Qwen2 class by composition, and its multimodal processor.

How the memory travels (docs/method.md section 1, decoder): one multimodal item per prompt,
``{"rcc_slots": [1, P, (L_D + 1) H_D], "rcc_model_id": [1, 16] uint8}``
(:meth:`rcc.vllm.slot_memory.SlotMemory.payload`). The processor checks it against the
served model and inserts P placeholder tokens at the start of the prompt, so the slots
sit at positions 0..P-1 as in :meth:`rcc.RCCModel.generate`. vLLM hands each slot's row
to :meth:`RCCDecoderForCausalLM.embed_input_ids`, which puts G(level 0) in as the input
embedding and keeps the L_D additions for :meth:`~RCCDecoderForCausalLM.forward`, which
adds A_i to the residual stream after layer i at those positions (Qwen3-VL's deepstack
does the same with visual features). Steps without slots (decode, prompts whose slots
are in the prefix cache) run the wrapped model's own forward unchanged.

The item is vLLM's ``image`` modality, because that is the one modality whose
precomputed embeddings vLLM's OpenAI chat API carries (``{"type": "image_embeds",
"image_embeds": {...}, "uuid": ...}``, with ``--enable-mm-embeds``); the processor
accepts nothing but RCC memories on it. The item's uuid
(:meth:`~rcc.vllm.slot_memory.SlotMemory.uuid`) keys vLLM's prefix cache, so the slots'
KV is computed once per memory, not once per question.

Parallelism (not run: no GPU here): under tensor parallelism the residual stream is
replicated on every rank, and every rank receives the multimodal item, so each adds
the full-width A_i to its copy; nothing else changes. Pipeline parallelism is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataParser
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptIndexTargets, PromptInsertion)

from rcc.vllm.export import SUPPORTED, rcc_section, unsupported
from rcc.vllm.slot_memory import MODEL_FIELD, SLOTS_FIELD, model_id_of, model_id_tensor

MODALITY = "image"
_MODULES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def _section(hf_config) -> dict:
    return rcc_section(hf_config.to_dict())


def _fields(_data: Mapping[str, torch.Tensor]) -> Mapping[str, MultiModalFieldConfig]:
    return {SLOTS_FIELD: MultiModalFieldConfig.batched(MODALITY),
            MODEL_FIELD: MultiModalFieldConfig.batched(MODALITY, keep_on_cpu=True)}


def check_payload(data: Mapping[str, object], rcc: dict, max_slots: int | None = None) -> dict[str, torch.Tensor]:
    """The item as ``{rcc_slots: [1, P, D], rcc_model_id: [1, n]}`` after checking it
    against the served model's ``rcc`` section.

    Raises:
        ValueError: naming what is wrong (vLLM answers 400 / raises it to the caller).
    """
    if not isinstance(data, Mapping) or SLOTS_FIELD not in data or MODEL_FIELD not in data:
        got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"this RCC decoder reads RCC memories only: send the item {{'{SLOTS_FIELD}': "
                         f"[slots, (layers + 1) * hidden], '{MODEL_FIELD}': [16] uint8}} (SlotMemory.payload()); "
                         f"got {got}")
    slots, mid = data[SLOTS_FIELD], data[MODEL_FIELD]
    if not isinstance(slots, torch.Tensor) or not isinstance(mid, torch.Tensor):
        raise ValueError(f"'{SLOTS_FIELD}' and '{MODEL_FIELD}' must be tensors")
    if slots.dim() == 2:
        slots = slots.unsqueeze(0)
    mid = mid.reshape(slots.shape[0] if slots.dim() == 3 else 1, -1)
    served = rcc["model_id"]
    for row in mid:
        if model_id_of(row) != served:
            raise ValueError(f"this memory was made by another RCC model (model id {model_id_of(row)}) than the "
                             f"one served here (model id {served}); compress the context again with this model")
    width = (rcc["layers"] + 1) * rcc["hidden_size"]
    k = rcc["slots_per_window"]
    if slots.dim() != 3 or slots.shape[0] != 1 or slots.shape[2] != width or not slots.is_floating_point():
        raise ValueError(f"'{SLOTS_FIELD}' must be one float tensor [slots, {width}] ((layers + 1) * hidden of "
                         f"this model); got {tuple(slots.shape)} {slots.dtype}")
    P = slots.shape[1]
    if P == 0 or P % k:
        raise ValueError(f"a memory holds whole windows of {k} slots; got {P} slots")
    if max_slots is not None and P > max_slots:
        raise ValueError(f"the memory has {P} slots, more than this engine's max_model_len leaves room for "
                         f"({max_slots}); start vLLM with a larger --max-model-len or ask about a shorter context")
    return {SLOTS_FIELD: slots, MODEL_FIELD: mid}


class RCCDataParser(MultiModalDataParser):
    """Parses the ``image`` item as an RCC memory (and nothing else)."""

    def __init__(self, rcc: dict, **kwargs):
        super().__init__(**kwargs)
        self.rcc = rcc

    def _parse_image_data(self, data):
        if data is None:
            return None
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        if isinstance(data, list) and all(d is None for d in data):
            return None
        return DictEmbeddingItems(check_payload(data, self.rcc), modality=MODALITY,
                                  required_fields={SLOTS_FIELD, MODEL_FIELD}, fields_factory=_fields)


class RCCProcessingInfo(BaseProcessingInfo):
    @property
    def rcc(self) -> dict:
        return _section(self.get_hf_config())

    def get_data_parser(self) -> MultiModalDataParser:
        return RCCDataParser(self.rcc, allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: 1}

    def max_slots(self, seq_len: int) -> int:
        """The most slots a prompt can hold: whole windows, one position left for the prompt."""
        k = self.rcc["slots_per_window"]
        return max(k, (seq_len - 1) // k * k)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {MODALITY: self.max_slots(seq_len)}


class RCCDummyInputsBuilder(BaseDummyInputsBuilder[RCCProcessingInfo]):
    """vLLM's memory profiling: the largest memory that fits (all zeros, a broadcast view)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        if not mm_counts.get(MODALITY):
            return {}
        rcc = self.info.rcc
        width = (rcc["layers"] + 1) * rcc["hidden_size"]
        P = self.info.max_slots(seq_len)
        dtype = self.info.ctx.model_config.dtype
        return {MODALITY: {SLOTS_FIELD: torch.zeros(1, 1, width, dtype=dtype).expand(1, P, width),
                           MODEL_FIELD: model_id_tensor(rcc["model_id"]).unsqueeze(0)}}


class RCCMultiModalProcessor(BaseMultiModalProcessor[RCCProcessingInfo]):
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return _fields(hf_inputs)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptInsertion]:
        pid = self.info.rcc["placeholder_token_id"]
        max_slots = self.info.max_slots(self.info.ctx.model_config.max_model_len)
        items = mm_items.get_items(MODALITY, DictEmbeddingItems) if MODALITY in mm_items else None

        def insertion(item_idx: int) -> list[int]:
            P = items.get(item_idx)[SLOTS_FIELD].shape[0]
            if P > max_slots:
                raise ValueError(f"the memory has {P} slots, more than this engine's max_model_len leaves room for "
                                 f"({max_slots}); start vLLM with a larger --max-model-len or ask about a shorter "
                                 "context")
            return [pid] * P

        return [PromptInsertion(MODALITY, target=PromptIndexTargets.start(), insertion=insertion)]


@MULTIMODAL_REGISTRY.register_processor(RCCMultiModalProcessor, info=RCCProcessingInfo,
                                        dummy_inputs=RCCDummyInputsBuilder)
class RCCDecoderForCausalLM(nn.Module, SupportsMultiModal):
    """vLLM's own causal LM class for the decoder (``self.decoder``), plus the slots.

    Raises:
        ValueError: for a config that is not an exported RCC decoder, a decoder type
            the plugin does not serve, or pipeline parallelism.
    """

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith(MODALITY):  # "image", or "image_embeds" from the chat API
            return None  # the processor inserts the slots at the prompt's start
        raise ValueError(f"an RCC decoder reads RCC memories (sent as {MODALITY!r} items) only, not {modality!r}")

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.rcc = _section(config)
        if config.model_type not in SUPPORTED:
            raise unsupported(config.model_type)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("the RCC vLLM plugin does not support pipeline parallelism (the slot additions span "
                             "every layer); use tensor parallelism or one device")
        wraps = SUPPORTED[config.model_type]
        cls = getattr(importlib.import_module(f"vllm.model_executor.models.{_MODULES[wraps]}"), wraps)
        with self._mark_language_model(vllm_config):
            self.decoder = cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "decoder"))
        body = self.decoder.model
        if len(body.layers) != self.rcc["layers"] or config.hidden_size != self.rcc["hidden_size"]:
            raise ValueError(f"the config's rcc section ({self.rcc['layers']} layers, hidden "
                             f"{self.rcc['hidden_size']}) does not fit the decoder ({len(body.layers)} layers, "
                             f"hidden {config.hidden_size}); export the model again")
        self.num_layers, self.hidden = len(body.layers), config.hidden_size
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.make_empty_intermediate_tensors = self.decoder.make_empty_intermediate_tensors

    # --------------------------------------------------------------- slots
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Each memory's rows as they are: ``[P, (L_D + 1) H_D]`` per item (the
        projection ran in rcc-llm, so there is no encoder to run here)."""
        slots = kwargs.get(SLOTS_FIELD)
        if slots is None:
            return []
        return list(slots) if isinstance(slots, torch.Tensor) else [s.reshape(s.shape[-2], -1) for s in slots]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: MultiModalEmbeddings | None = None,
                        *, is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[tokens, H_D]`` with G(level 0) at the slot positions; the
        slots' additions ``[slots, L_D, H_D]`` are kept for the next :meth:`forward`."""
        embeds = self.decoder.embed_input_ids(input_ids)
        self._pending = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0 or is_multimodal is None:
            return embeds
        rows = torch.cat([m.reshape(m.shape[0], -1) for m in multimodal_embeddings])
        rows = rows.to(embeds.device, embeds.dtype).view(rows.shape[0], self.num_layers + 1, self.hidden)
        idx = is_multimodal.to(embeds.device).nonzero().squeeze(1)
        assert idx.numel() == rows.shape[0], (idx.numel(), rows.shape)
        self._pending = (idx, rows[:, 1:])
        return embeds.index_copy(0, idx, rows[:, 0])

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        pending, self._pending = self._pending, None
        body = self.decoder.model
        if pending is None or inputs_embeds is None:
            return body(input_ids, positions, intermediate_tensors, inputs_embeds)
        idx, additions = pending
        hidden, residual = inputs_embeds, None
        for i, layer in enumerate(body.layers):
            hidden, residual = layer(positions, hidden, residual)
            # the residual stream after layer i is hidden + residual (vLLM defers the add
            # into the next norm); + A_i at the slot rows, in transformers' order
            hidden, residual = (residual + hidden).index_add(0, idx, additions[:, i]), None
        return body.norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.decoder.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return {f"decoder.{name}" for name in self.decoder.load_weights(weights)}
