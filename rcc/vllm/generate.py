"""Questions through vLLM, equal to :func:`rcc.ask.ask` / :meth:`rcc.RCCModel.generate`:
the prompt (the memory's slots, then the decoder prompt), greedy sampling, the same
stopping (eos, and :class:`rcc.ask.AnswerDone`'s rule), the same answer split.
Needs vLLM (``.venv-vllm``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rcc.ask import Answer, choose_mode
from rcc.errors import RCCError
from rcc.generation import check_max_new_tokens, check_sampling
from rcc.prompts import CHATML
from rcc.vllm.export import rcc_section
from rcc.vllm.slot_memory import SlotMemory, check_slots, compress_slots

#: prefix-cache block size: small blocks let a question reuse every whole block of
#: slots (192 slots = 6 blocks of 32); 32 is the CPU attention backend's smallest
BLOCK_SIZE = 32


def engine_args(folder: str | Path, **overrides) -> dict:
    """Keyword arguments of ``vllm.LLM`` / ``EngineArgs`` for an exported RCC decoder:
    memories on (``enable_mm_embeds``: they are precomputed embeddings), prefix
    caching with :data:`BLOCK_SIZE` blocks, eager mode (no torch.compile: minutes on
    a small CPU for no gain at these sizes; pass ``enforce_eager=False`` to try it).

    Raises:
        RCCError: when ``folder`` is not an exported RCC decoder.
    """
    cfg_path = Path(folder) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        raise RCCError(f"{folder}: no readable config.json ({err}); export the model with `rcc export-vllm`") from None
    rcc_section(cfg)
    args = dict(model=str(folder), tokenizer=str(folder), dtype=cfg.get("dtype", "auto"), enable_mm_embeds=True,
                limit_mm_per_prompt={"image": 1}, enable_prefix_caching=True, block_size=BLOCK_SIZE,
                enforce_eager=True, generation_config="vllm")
    args.update(overrides)
    return args


def load_llm(folder: str | Path, **overrides):
    """A ``vllm.LLM`` serving the exported decoder (call it under ``if __name__ == "__main__":``
    in a script: vLLM spawns its workers)."""
    from vllm import LLM

    return LLM(**engine_args(folder, **overrides))


def prompt_for(memory: SlotMemory, prompt_ids: list[int]) -> dict:
    """A vLLM prompt: the decoder prompt's token ids and the memory as its one multimodal
    item; the item's uuid keys the prefix cache (same memory: slots computed once)."""
    return {"prompt_token_ids": list(prompt_ids), "multi_modal_data": {"image": memory.payload()},
            "multi_modal_uuids": {"image": [memory.uuid()]}}


def sampling_for(max_new_tokens: int, eos_token_id: int | None, logprobs: int | None = None, **options):
    """``SamplingParams`` matching :meth:`rcc.RCCModel.generate`: greedy unless
    ``temperature`` / ``top_p`` / ``top_k`` are given; ``eos_token_id`` None: no eos stop.

    Raises:
        RCCError: for values outside :func:`rcc.generation.check_sampling`'s ranges (the
            rules of the CLI and of the transformers engine).
    """
    check_max_new_tokens(max_new_tokens, name=str)
    check_sampling(**{k: options.get(k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")}, name=str)
    from vllm import SamplingParams

    opts = {"temperature": 0.0}
    opts.update({k: v for k, v in options.items() if v is not None})
    if "stop" in opts:
        opts["stop"] = list(opts["stop"])
    return SamplingParams(max_tokens=max_new_tokens, ignore_eos=eos_token_id is None,
                          stop_token_ids=[] if eos_token_id is None else [eos_token_id], logprobs=logprobs, **opts)


def ask(llm, model, context: str | SlotMemory, question: str, mode: str | None = None, max_new_tokens: int = 128,
        window_batch_size: int | None = 8, **options) -> Answer:
    """:func:`rcc.ask.ask` with the decoder in vLLM: ``model`` (the :class:`~rcc.RCCModel`)
    compresses, ``llm`` (serving its exported decoder) answers.

    Raises:
        RCCError: as :func:`rcc.ask.ask` does.
    """
    tok = model.tokenizer
    if not question.strip():
        raise RCCError("the question is empty")
    is_memory = isinstance(context, SlotMemory)
    if not is_memory and not (isinstance(context, str) and context.strip()):
        raise RCCError("the context is empty; give some text to compress")
    mode = mode or ("manual" if is_memory else choose_mode(model, context))
    prompt = CHATML.build("", question, mode)[1]
    ids, prefix = None, None
    if is_memory:
        check_slots(model, context)
        if mode == "reconstruct":
            ids, prefix = tok("\n\n" + question, add_special_tokens=False, return_tensors="pt").input_ids, context
    else:
        ids = tok(CHATML.build(context, question, mode)[0], add_special_tokens=False, return_tensors="pt").input_ids
    t, memory = time.perf_counter(), context
    if ids is not None:
        memory = compress_slots(model, ids, window_batch_size, prefix=prefix)
    secs = time.perf_counter() - t if ids is not None else 0.0
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    out = llm.generate([prompt_for(memory, prompt_ids)], sampling_for(max_new_tokens, CHATML.stop_token_id(tok, mode), **options),
                       use_tqdm=False)
    new = list(out[0].outputs[0].token_ids)
    n = CHATML.answer_length(tok, new, mode)
    new = new[:n] if n is not None else new
    question_back, answer = CHATML.split_answer(tok.decode(new, skip_special_tokens=False), mode, tok.eos_token)
    return Answer(answer=answer, reconstructed_question=question_back, token_ids=new, mode=mode,
                  num_slots=memory.num_slots, compressed_tokens=0 if ids is None else int(ids.shape[1]),
                  compress_seconds=secs)
