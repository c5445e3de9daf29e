"""RCC on vLLM: the decoder as a vLLM model plugin (see docs/vllm.md).

Split (and why): the encoder and the maps G / A_i stay in rcc-llm (transformers),
which compresses a context once into its projected slots (:mod:`.slot_memory`); vLLM
runs only the decoder, reading the slots as one multimodal item whose placeholder
tokens are the slot positions (:mod:`.model`), like Qwen3-VL's deepstack features.

- :mod:`.export`: an RCC model's decoder as a folder vLLM loads (no vLLM import);
- :mod:`.slot_memory`: :class:`SlotMemory`, the slots as vLLM consumes them, and its file;
- :mod:`.plugin`: the ``vllm.general_plugins`` entry point (registers the architecture);
- :mod:`.model`: the vLLM model class and its multimodal processor (imports vLLM);
- :mod:`.generate`: prompts, sampling and stopping equal to :meth:`rcc.RCCModel.generate`;

Nothing here is imported by the library or imports anything but it; :mod:`.model`, :mod:`.generate` and
:mod:`rcc.serve.vllm_engine` (``rcc serve --engine vllm``) need vLLM (``bash scripts/vllm_env.sh`` makes ``.venv-vllm``).
"""
