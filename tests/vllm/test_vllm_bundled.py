"""The README's example through vLLM with the bundled model (float32): the same tokens
as `rcc ask` (it prints 68215) and log-probabilities within 1e-3 of RCCModel's.
Runs in .venv-vllm (bash scripts/vllm_env.sh); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import tests.vllm_helpers  # noqa: E402,F401  (sets VLLM_CPU_KVCACHE_SPACE)
from tests.conftest import REPO  # noqa: E402

QUESTION = "What is the pass key? The pass key is"
LOGPROB_TOL = 1e-3  # float32 through 30 layers; the measured value is printed (-s)


@pytest.mark.slow  # loads the bundled model, compresses twice, starts a vLLM engine (about 2 min)
def test_readme_example_through_vllm_equals_rcc_ask(tmp_path):
    from rcc.ask import ask
    from rcc.loading import load_model
    from rcc.memory import CompressedContext
    from rcc.prompts import CHATML
    from rcc.vllm import generate as vg
    from rcc.vllm.export import export_decoder
    from rcc.vllm.slot_memory import compress_slots

    model = load_model("rcc-smollm2-135m", dtype=torch.float32)
    assert model.config.instruction_mode == "manual"  # so `rcc ask` compresses the context alone
    tok = model.tokenizer
    text, prompt = CHATML.build((REPO / "examples" / "passkey.txt").read_text(), QUESTION, "manual")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    memory = model.compress(ids)
    ref = ask(model, memory, QUESTION, mode="manual")  # what `rcc ask` does after compressing
    assert ref.answer == "68215"

    llm = vg.load_llm(export_decoder(model, tmp_path / "bundled"), max_model_len=2048)
    slots = compress_slots(model, ids)
    assert slots.num_slots == memory.num_slots == 192
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    out = llm.generate([vg.prompt_for(slots, prompt_ids)],
                       vg.sampling_for(32, CHATML.stop_token_id(tok, "manual"), logprobs=5), use_tqdm=False)[0].outputs[0]
    new = list(out.token_ids)[: CHATML.answer_length(tok, list(out.token_ids), "manual")]
    assert new == ref.token_ids
    assert CHATML.split_answer(tok.decode(new, skip_special_tokens=False), "manual", tok.eos_token)[1] == "68215"

    # log-probabilities of each step's top 5 against the decoder's own, read from the KV memory
    full = torch.tensor([prompt_ids + ref.token_ids[:-1]])
    assert isinstance(memory, CompressedContext)
    with torch.no_grad():
        logits = model.decoder(input_ids=full, use_cache=True, **{model._cache_kw: memory.cache(1)}).logits[0]
    ref_lp = torch.log_softmax(logits[len(prompt_ids) - 1 :].double(), -1)
    worst = max(abs(lp.logprob - ref_lp[step, tid].item()) for step, top in enumerate(out.logprobs)
                for tid, lp in top.items())
    print(f"bundled model: largest log-prob difference vLLM vs RCCModel {worst:.2e}")
    assert worst < LOGPROB_TOL
