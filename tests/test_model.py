"""Properties of RCCModel on tiny random backbones (GPT-NeoX, Llama, Qwen2, Mistral)."""

import logging

import pytest
import torch

from rcc import CompressedContext, RCCConfig, RCCError, RCCModel
from rcc.hooks import decoder_layers, inject
from rcc.windows import pad_to_windows, window_of
from tests.conftest import tiny_backbone, tiny_rcc

ARCHS = ["gpt_neox", "llama", "qwen2", "mistral"]


def ids(n, batch=1, seed=0, vocab=300):
    return torch.randint(1, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def prompt_logits(model, memory, prompt):
    """Decoder logits over the prompt, reading the slots from a memory's cache."""
    cache = memory.cache(prompt.shape[0])
    out = model.decoder(input_ids=prompt, use_cache=True, **{model._cache_kw: cache})
    return out.logits


# ----------------------------------------------------------------- windows
def test_padding_follows_the_spec_and_not_the_original_bugs():
    W = 8
    a = torch.arange(1, 5).unsqueeze(0)  # n=4, W mod n == 0: tile, do not multiply
    assert pad_to_windows(a, W).tolist() == [[1, 2, 3, 4, 1, 2, 3, 4]]
    b = torch.arange(1, 4).unsqueeze(0)  # n=3: tile twice, prepend last 2 of the tiled sequence
    assert pad_to_windows(b, W).tolist() == [[2, 3, 1, 2, 3, 1, 2, 3]]
    c = torch.arange(1, 12).unsqueeze(0)  # n=11 > W: prepend last 5 tokens
    assert pad_to_windows(c, W).tolist() == [[7, 8, 9, 10, 11] + list(range(1, 12))]
    d = torch.arange(1, 17).unsqueeze(0)  # n = 2W: unchanged, no extra window
    assert pad_to_windows(d, W).tolist() == d.tolist()


@pytest.mark.parametrize("n", [1, 5, 8, 11, 16, 23, 40])
def test_window_of_finds_each_token_at_its_own_place_after_padding(n):
    W = 8
    padded = pad_to_windows(torch.arange(100, 100 + n).unsqueeze(0), W)[0]
    extra = padded.numel() - n if n > W else 0
    for p in range(n):
        w = window_of(p, n, W)
        assert 0 <= w < padded.numel() // W
        assert int(padded[w * W + (p + extra) % W]) == 100 + p if n > W else 100 + p in padded[:W].tolist()


def test_window_must_be_divisible_by_ratio():
    with pytest.raises(RCCError, match="not divisible"):
        RCCConfig(window=100, ratio=32)


def test_level_mapping():
    cfg = RCCConfig()
    assert cfg.levels_for_layers(3, 3) == [[1], [2], [3]]
    assert cfg.levels_for_layers(6, 3) == [[1, 2], [3, 4], [5, 6]]  # the original's L_E = 2 L_D case
    assert cfg.levels_for_layers(2, 4) == [[1], [1], [2], [2]]
    with pytest.raises(RCCError, match="level_map"):
        RCCConfig(level_map=[[1], [9]]).levels_for_layers(2, 2)


# ------------------------------------------------------------------ slots
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_slots_are_exact_positions_of_the_encoder_states(pooling):
    model = tiny_rcc("llama", window=32, ratio=4)
    model.config.pooling = pooling
    window = ids(32)
    embeds, adds = model.encode_windows(window)
    hs = model.encoder.base_model(input_ids=window, output_hidden_states=True).hidden_states
    pick = (lambda h: h[:, 3::4]) if pooling == "last" else (lambda h: h.reshape(1, 8, 4, -1).mean(2))
    assert embeds.shape == (1, 8, 64)
    torch.testing.assert_close(embeds, model.G(pick(hs[0])))
    for i, lv in enumerate(model.level_map):
        torch.testing.assert_close(adds[i], model.A[i](pick(hs[lv[0]])))
    assert torch.equal(pick(hs[-1]), pick(model.encoder.base_model(input_ids=window).last_hidden_state))


def test_zero_projections_leave_the_decoder_unchanged_and_nonzero_change_it():
    model = tiny_rcc("llama", window=32, ratio=4)
    ctx, prompt = ids(40), ids(5, seed=1)
    embeds, _ = model.encode_windows(pad_to_windows(ctx, 32).reshape(-1, 32))
    embeds = embeds.reshape(1, -1, 64)
    plain = model.decoder(inputs_embeds=torch.cat([embeds, model.decoder.get_input_embeddings()(prompt)], 1)).logits
    with_a = model(context_ids=ctx, input_ids=prompt).logits
    assert not torch.allclose(with_a, plain[:, -5:], atol=1e-4)
    with torch.no_grad():
        for a in model.A:
            a.weight.zero_()
    torch.testing.assert_close(model(context_ids=ctx, input_ids=prompt).logits, plain[:, -5:])


def test_hooks_are_removed_even_on_exception():
    model = tiny_rcc("llama")
    layers = decoder_layers(model.decoder)
    with pytest.raises(ZeroDivisionError):
        with inject(layers, [torch.zeros(1, 2, 64)] * len(layers)):
            assert all(len(layer._forward_hooks) == 1 for layer in layers)
            raise ZeroDivisionError
    assert all(len(layer._forward_hooks) == 0 for layer in layers)
    model.generate(ids(70), ids(3), max_new_tokens=3)
    assert all(len(layer._forward_hooks) == 0 for layer in layers)


def test_decode_steps_are_not_injected():
    """Generation after compression equals plain cached decoding over the memory."""
    model = tiny_rcc("llama")
    mem = model.compress(ids(100))
    prompt = ids(4, seed=3)
    new = model.generate(mem, prompt, max_new_tokens=6, eos_token_id=None)
    seq = prompt
    cache = mem.cache()
    logits = model.decoder(input_ids=seq, use_cache=True, **{model._cache_kw: cache}).logits
    manual = []
    for _ in range(6):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        manual.append(nxt.item())
        logits = model.decoder(input_ids=nxt, use_cache=True, **{model._cache_kw: cache}).logits
    assert new[0].tolist() == manual


# -------------------------------------------------------- per architecture
@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_equals_one_shot_for_window_batch_sizes(arch):
    model = tiny_rcc(arch, window=32, ratio=4, dtype=torch.float64)
    ctx, prompt = ids(150), ids(6, seed=1)  # 5 windows
    one_shot = model(context_ids=ctx, input_ids=prompt).logits
    for b in (1, 2, None):
        torch.testing.assert_close(model(context_ids=ctx, input_ids=prompt, window_batch_size=b).logits, one_shot,
                                   rtol=0, atol=1e-10)
        mem = model.compress(ctx, window_batch_size=b)
        assert mem.num_slots == 5 * 8 and mem.num_tokens == 150
        torch.testing.assert_close(prompt_logits(model, mem, prompt), one_shot, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_generate_and_save_load_roundtrip(arch, tmp_path):
    model = tiny_rcc(arch)
    ctx, prompt = ids(150), ids(5, seed=2)
    mem = model.compress(ctx)
    out = model.generate(mem, prompt, max_new_tokens=8, eos_token_id=None)
    assert out.shape == (1, 8)
    assert torch.equal(out, model.generate(ctx, prompt, max_new_tokens=8, eos_token_id=None))  # raw ids path
    model.save_pretrained(str(tmp_path / "m"))
    loaded = RCCModel.from_pretrained(str(tmp_path / "m"))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert loaded.fingerprint() == model.fingerprint()
    assert torch.equal(loaded.generate(mem, prompt, max_new_tokens=8, eos_token_id=None), out)
    mem.save(tmp_path / "doc.rcc")
    again = CompressedContext.load(tmp_path / "doc.rcc")
    assert again.content_hash == mem.content_hash and again.num_slots == mem.num_slots
    assert torch.equal(loaded.generate(again, prompt, max_new_tokens=8, eos_token_id=None), out)


def test_different_depths_and_hidden_sizes():
    enc = tiny_backbone("llama", num_hidden_layers=4, hidden_size=48, num_attention_heads=4)
    dec = tiny_backbone("qwen2", seed=1)
    model = RCCModel.from_backbones(enc, dec, window=32, ratio=4)
    assert model.level_map == [[1, 2], [3, 4]]
    assert model.G.weight.shape == (64, 48)
    out = model(context_ids=ids(40), input_ids=ids(3), labels=ids(3))
    assert out.logits.shape == (1, 3, 300) and torch.isfinite(out.loss)


def test_fresh_model_is_marked_untrained_and_starts_as_the_backbone():
    model = RCCModel.from_backbones(tiny_backbone("llama"), tiny_backbone("llama", seed=1), window=32, ratio=4)
    assert "UNTRAINED" in repr(model) and not model.config.trained
    assert all(torch.count_nonzero(a.weight) == 0 for a in model.A)
    assert torch.equal(model.G.weight, torch.eye(64))
    with pytest.raises(RCCError, match="separate"):
        enc = tiny_backbone("llama")
        RCCModel.from_backbones(enc, enc)


def test_batched_questions_against_one_memory_match_single_questions():
    model = tiny_rcc("llama")
    mem = model.compress(ids(90))
    q1, q2 = ids(3, seed=5), ids(6, seed=6)
    single = [model.generate(mem, q, max_new_tokens=5, eos_token_id=None)[0].tolist() for q in (q1, q2)]
    batch = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    batch[0, 3:], mask[0, 3:] = q1[0], 1  # left padding
    batch[1], mask[1] = q2[0], 1
    both = model.generate(mem, batch, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    assert both.tolist() == single


def test_generation_options_pass_through():
    model = tiny_rcc("llama")
    mem = model.compress(ids(64))
    prompt = ids(3)
    torch.manual_seed(0)
    s1 = model.generate(mem, prompt, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=None)
    torch.manual_seed(0)
    s2 = model.generate(mem, prompt, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=None)
    greedy = model.generate(mem, prompt, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(s1, s2) and not torch.equal(s1, greedy)
    eos = greedy[0, 2].item()
    stopped = model.generate(mem, prompt, max_new_tokens=10, eos_token_id=eos)
    assert stopped[0, :3].tolist() == greedy[0, :3].tolist() and stopped.shape[1] == 3
    pen = model.generate(mem, prompt, max_new_tokens=10, repetition_penalty=5.0, eos_token_id=None)
    assert len(set(pen[0].tolist())) == 10

    class Collect:
        def __init__(self):
            self.seen = []

        def put(self, value):
            self.seen.append(value.reshape(-1).tolist())

        def end(self):
            self.seen.append("end")

    streamer = Collect()
    model.generate(mem, prompt, max_new_tokens=4, eos_token_id=None, streamer=streamer)
    assert streamer.seen[-1] == "end" and [s[0] for s in streamer.seen[1:-1]] == greedy[0, :4].tolist()


def test_prefix_extension_equals_compressing_both_windows():
    model = tiny_rcc("llama", window=32, ratio=4, dtype=torch.float64)
    a, b = ids(32, seed=1), ids(32, seed=2)
    whole = model.compress(torch.cat([a, b], 1))
    ext = model.compress(b, prefix=model.compress(a))
    assert ext.num_slots == whole.num_slots == 16 and ext.num_tokens == 64
    for (k1, v1), (k2, v2) in zip(ext.kv, whole.kv):
        torch.testing.assert_close(k1, k2, rtol=0, atol=1e-10)
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-10)


# ------------------------------------------------------------- bad input
def test_memory_from_another_model_is_refused(tmp_path):
    a, b = tiny_rcc("llama", seed=0), tiny_rcc("llama", seed=10)
    mem = a.compress(ids(70))
    mem.save(tmp_path / "a.rcc")
    with pytest.raises(RCCError, match="another model"):
        b.generate(CompressedContext.load(tmp_path / "a.rcc"), ids(3), max_new_tokens=2)


def test_corrupt_and_truncated_memory_files(tmp_path):
    model = tiny_rcc("llama")
    path = model.compress(ids(70)).save(tmp_path / "m.rcc")
    data = bytearray(path.read_bytes())
    (tmp_path / "trunc.rcc").write_bytes(data[: len(data) - 100])
    with pytest.raises(RCCError):
        CompressedContext.load(tmp_path / "trunc.rcc")
    data[-5] ^= 0xFF
    (tmp_path / "flip.rcc").write_bytes(bytes(data))
    with pytest.raises(RCCError, match="corrupt"):
        CompressedContext.load(tmp_path / "flip.rcc")
    (tmp_path / "junk.rcc").write_bytes(b"hello")
    with pytest.raises(RCCError, match="not an RCC memory"):
        CompressedContext.load(tmp_path / "junk.rcc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flip.rcc", "junk.rcc", "m.rcc", "trunc.rcc"]


def test_empty_context_and_prompt():
    model = tiny_rcc("llama")
    with pytest.raises(RCCError, match="empty"):
        model.compress(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(RCCError, match="empty"):
        model.generate(ids(10), torch.zeros(1, 0, dtype=torch.long))


def test_absolute_positions_refuse_and_rotary_warns(caplog):
    model = tiny_rcc("gpt2", window=32, ratio=4)  # learned positions: 128
    assert model.position_limit == 128
    model.generate(ids(200), ids(3), max_new_tokens=2)  # 56 slots: fine
    with pytest.raises(RCCError, match="at most about 512 context tokens"):
        model.compress(ids(600))
    rotary = tiny_rcc("llama", window=32, ratio=4, max_position_embeddings=64)
    with caplog.at_level(logging.WARNING, logger="rcc"):
        rotary.generate(ids(600), ids(3), max_new_tokens=2)  # 152 slots > 64 trained positions
    assert "extrapolate" in caplog.text


def test_grad_windows_keeps_outputs_and_truncates_the_gradient_to_chosen_windows():
    # window w of row r uses only tokens [10 + 10j, 20 + 10j), j = 4r + w: the rows
    # of the encoder's embedding gradient tell which windows carried gradient
    model = tiny_rcc("llama", window=16, ratio=4).train()
    g = torch.Generator().manual_seed(3)
    ctx = torch.stack([torch.cat([torch.randint(10 + 10 * (4 * r + w), 20 + 10 * (4 * r + w), (16,), generator=g)
                                  for w in range(4)]) for r in range(2)])
    prompt = ids(6, batch=2, seed=4)
    table = model.encoder.get_input_embeddings().weight

    def run(grad_windows):
        model.zero_grad(set_to_none=True)
        out = model(ctx, prompt, labels=prompt, grad_windows=grad_windows)
        out.loss.backward()
        rows = table.grad.abs().sum(1)
        used = [[bool(rows[10 + 10 * (4 * r + w): 20 + 10 * (4 * r + w)].sum() > 0) for w in range(4)]
                for r in range(2)]
        return out, used, model.G.weight.grad.clone()

    full, used, g_full = run(None)
    assert used == [[True] * 4] * 2
    for k in (1, 3):
        torch.manual_seed(k)
        part, used, g_part = run(k)
        assert torch.equal(part.logits, full.logits) and torch.equal(part.loss, full.loss)
        assert [sum(u) for u in used] == [k, k]  # k windows of each row
        assert g_part.abs().sum() > 0 and not torch.allclose(g_part, g_full)
    same, used, g_same = run(4)  # as many as there are: the full gradient
    assert used == [[True] * 4] * 2 and torch.allclose(g_same, g_full, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: the plain path
        assert torch.equal(model(ctx, prompt, grad_windows=1).logits, full.logits)
    for seed in range(4):  # a focus window is always among them; -1 leaves the row's draw alone
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        out = model(ctx, prompt, labels=prompt, grad_windows=2, focus_windows=torch.tensor([2, -1]))
        assert torch.equal(out.logits, full.logits)
        out.loss.backward()
        rows = table.grad.abs().sum(1)
        used = [[bool(rows[10 + 10 * (4 * r + w): 20 + 10 * (4 * r + w)].sum() > 0) for w in range(4)]
                for r in range(2)]
        assert used[0][2] and [sum(u) for u in used] == [2, 2]
