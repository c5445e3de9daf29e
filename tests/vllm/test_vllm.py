"""The RCC decoder in vLLM (rcc/vllm/) against RCCModel on a tiny random Llama-shaped
model in float32: greedy tokens equal, log-probabilities within 1e-4, the additions
really applied, the prefix cache reused across questions, bad input refused while the
engine keeps serving. Runs in .venv-vllm (bash scripts/vllm_env.sh); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from tests.vllm_helpers import tiny_vllm_rcc  # noqa: E402  (sets VLLM_CPU_KVCACHE_SPACE first)

LOGPROB_TOL = 1e-4  # float32; measured differences are printed by the test (-s)
MAX_LEN = 512


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rcc.vllm.export import export_decoder
    from rcc.vllm.generate import load_llm

    model = tiny_vllm_rcc()
    folder = export_decoder(model, tmp_path_factory.mktemp("vllm") / "tiny")
    llm = load_llm(folder, max_model_len=MAX_LEN)
    yield model, llm
    del llm


def cases(n: int = 3):
    g = torch.Generator().manual_seed(7)
    # one window, several windows, a short context that is tiled to one window
    return [(torch.randint(3, 300, (1, length), generator=g), torch.randint(3, 300, (1, m), generator=g))
            for length, m in [(150, 12), (400, 5), (20, 30)][:n]]


def reference(model, ctx, prompt, new: int = 16):
    """RCCModel.generate's greedy ids and, per generated token, the log-softmax over the vocabulary."""
    ids = model.generate(ctx, prompt, max_new_tokens=new, eos_token_id=None)[0]
    full = torch.cat([prompt[0], ids[:-1]]).unsqueeze(0)
    with torch.no_grad():
        logits = model(context_ids=ctx, input_ids=full).logits[0]  # logits[t] predicts full[t + 1]
    m = prompt.shape[1]
    return ids.tolist(), torch.log_softmax(logits[m - 1 :].double(), dim=-1)


def run(llm, memories, prompts, new: int = 16, logprobs: int | None = 5):
    from rcc.vllm.generate import prompt_for, sampling_for

    reqs = [prompt_for(mem, p[0].tolist()) for mem, p in zip(memories, prompts)]
    return llm.generate(reqs, sampling_for(new, None, logprobs=logprobs), use_tqdm=False)


@pytest.mark.slow  # starts a vLLM engine (about 40 s on the 2-core CI machine)
def test_greedy_tokens_equal_rcc_generate_and_logprobs_within_tolerance(setup):
    from rcc.vllm.slot_memory import compress_slots

    model, llm = setup
    cs = cases()
    memories = [compress_slots(model, ctx) for ctx, _ in cs]
    assert [m.num_slots for m in memories] == [24, 56, 8]
    outs = run(llm, memories, [p for _, p in cs])  # three memories in one batch
    worst = 0.0
    for (ctx, prompt), out in zip(cs, outs):
        ids, ref_lp = reference(model, ctx, prompt)
        got = out.outputs[0]
        assert list(got.token_ids) == ids
        for step, top in enumerate(got.logprobs):
            for tid, lp in top.items():
                worst = max(worst, abs(lp.logprob - ref_lp[step, tid].item()))
    print(f"largest log-prob difference vLLM vs RCCModel: {worst:.2e}")
    assert worst < LOGPROB_TOL


@pytest.mark.slow
def test_additions_are_applied_at_the_slots(setup):
    """Zeroed A_i in the memory: vLLM's tokens change, and equal RCCModel's with A_i zeroed."""
    import copy

    from rcc.vllm.slot_memory import SlotMemory, compress_slots

    model, llm = setup
    ctx, prompt = cases(1)[0]
    mem = compress_slots(model, ctx)
    no_add = SlotMemory(slots=torch.cat([mem.slots[:, :1], torch.zeros_like(mem.slots[:, 1:])], dim=1),
                        num_tokens=mem.num_tokens, window=mem.window, ratio=mem.ratio, model_id=mem.model_id,
                        content_hash="zeroed-" + mem.content_hash)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for a in zeroed.A:
            a.weight.zero_()
    with_adds, without = run(llm, [mem, no_add], [prompt, prompt], logprobs=None)
    assert list(with_adds.outputs[0].token_ids) == reference(model, ctx, prompt)[0]
    assert list(without.outputs[0].token_ids) == reference(zeroed, ctx, prompt)[0]
    assert list(without.outputs[0].token_ids) != list(with_adds.outputs[0].token_ids)


@pytest.mark.slow
def test_second_question_reuses_the_slots_from_the_prefix_cache(setup):
    from rcc.vllm.generate import BLOCK_SIZE
    from rcc.vllm.slot_memory import compress_slots

    model, llm = setup
    ctx, _ = cases(2)[1]
    mem = compress_slots(model, ctx)  # 56 slots
    g = torch.Generator().manual_seed(3)
    first, second = (torch.randint(3, 300, (1, 9), generator=g) for _ in range(2))
    out1 = run(llm, [mem], [first], logprobs=None)[0]
    out2 = run(llm, [mem], [second], logprobs=None)[0]
    assert out2.num_cached_tokens >= mem.num_slots // BLOCK_SIZE * BLOCK_SIZE > 0
    assert list(out2.outputs[0].token_ids) == reference(model, ctx, second)[0]
    assert list(out1.outputs[0].token_ids) == reference(model, ctx, first)[0]


@pytest.mark.slow
def test_bad_memories_are_refused_and_the_engine_keeps_serving(setup):
    from rcc.vllm.slot_memory import SlotMemory, compress_slots

    model, llm = setup
    ctx, prompt = cases(1)[0]
    mem = compress_slots(model, ctx)
    other = compress_slots(tiny_vllm_rcc(seed=5), ctx)  # same shapes, another model
    with pytest.raises(ValueError, match=r"made by another RCC model .* compress the context again"):
        run(llm, [other], [prompt])
    too_long = SlotMemory(slots=torch.randn(MAX_LEN + 8, mem.slots.shape[1], mem.slots.shape[2]), num_tokens=4160,
                          window=64, ratio=8, model_id=mem.model_id, content_hash="long")
    with pytest.raises(ValueError, match=r"more than this engine's max_model_len leaves room for"):
        run(llm, [too_long], [prompt])
    wrong_width = SlotMemory(slots=mem.slots[:, :2], num_tokens=150, window=64, ratio=8, model_id=mem.model_id,
                             content_hash="narrow")
    with pytest.raises(ValueError, match=r"must be one float tensor"):
        run(llm, [wrong_width], [prompt])
    # still serving, and still right
    assert list(run(llm, [mem], [prompt], logprobs=None)[0].outputs[0].token_ids) == reference(model, ctx, prompt)[0]


@pytest.mark.slow
def test_appended_and_combined_slot_memories_answer_as_the_whole_text(setup):
    """compress_slots(B, prefix=slots(A)) and combine_slots([slots(A), slots(B)]) (A and B
    whole windows; a partial window is padded at the front of its own text) hold the slots
    of compress_slots(A + B) (within float32 rounding: the windows are batched differently), and vLLM's greedy tokens over each equal RCCModel's over
    A + B and over model.combine; memories of another model or window/ratio are refused."""
    from rcc.errors import RCCError
    from rcc.vllm.slot_memory import SlotMemory, combine_slots, compress_slots

    model, llm = setup
    g = torch.Generator().manual_seed(11)
    a, b, c = (torch.randint(3, 300, (1, n), generator=g) for n in (128, 128, 40))  # 2 windows, 2, a short one
    whole = compress_slots(model, torch.cat([a, b], dim=1))
    ma, mb, mc = (compress_slots(model, x) for x in (a, b, c))
    appended = compress_slots(model, b, prefix=ma)
    combined = combine_slots(model, [ma, mb])
    for mem in (appended, combined):
        assert mem.num_slots == whole.num_slots == 16 + 16 and mem.num_tokens == 256
        torch.testing.assert_close(mem.slots, whole.slots, rtol=1e-5, atol=1e-5)
    assert combined.content_hash != whole.content_hash != appended.content_hash  # the cut is part of the content
    prompt = torch.randint(3, 300, (1, 7), generator=g)
    ref_ids, _ = reference(model, torch.cat([a, b], dim=1), prompt)
    lib = model.generate(model.combine([model.compress(a), model.compress(b)]), prompt, max_new_tokens=16,
                         eos_token_id=None)[0].tolist()
    three = combine_slots(model, [ma, mb, mc])  # three memories as one item, the last a short text
    outs = run(llm, [whole, appended, combined, three], [prompt] * 4, logprobs=None)
    assert [list(o.outputs[0].token_ids) for o in outs[:3]] == [ref_ids] * 3 and ref_ids == lib
    lib3 = model.generate(model.combine([model.compress(x) for x in (a, b, c)]), prompt, max_new_tokens=16,
                          eos_token_id=None)[0].tolist()
    assert list(outs[3].outputs[0].token_ids) == lib3 != ref_ids  # c's slots were read

    other = compress_slots(tiny_vllm_rcc(seed=5), c)
    with pytest.raises(RCCError, match=r"made by another model"):
        combine_slots(model, [ma, other])
    with pytest.raises(RCCError, match=r"made by another model"):
        compress_slots(model, b, prefix=other)
    limit = model.decoder.config.max_position_embeddings
    too_many = SlotMemory(slots=torch.zeros(limit, *ma.slots.shape[1:]), num_tokens=limit * 8, window=64, ratio=8,
                          model_id=ma.model_id, content_hash="big")
    with pytest.raises(RCCError, match=rf"hold {limit + 16} slots \(16 \+ {limit}\), more than the {limit} positions"):
        combine_slots(model, [ma, too_many])


def test_unsupported_decoder_is_refused_at_export(tmp_path):
    from rcc.errors import RCCError
    from rcc.vllm.export import export_decoder

    with pytest.raises(RCCError, match=r"serves RCC decoders of type llama, mistral, qwen2; this decoder is 'gpt_neox'"):
        export_decoder(tiny_vllm_rcc("gpt_neox"), tmp_path / "neox")
    assert not (tmp_path / "neox" / "config.json").exists()
