"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every
process it starts, before it resolves a model's architecture."""

from __future__ import annotations

from rcc.vllm.export import ARCHITECTURE


def register() -> None:
    """Register :data:`~rcc.vllm.export.ARCHITECTURE` with vLLM's ``ModelRegistry`` (lazily:
    the model module is imported only when such a model is loaded)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "rcc.vllm.model:RCCDecoderForCausalLM")
