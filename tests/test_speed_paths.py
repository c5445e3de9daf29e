"""The faster paths of the model give what the plain ones give: encoder levels
captured by hooks, A_i as one batched matmul, in-place slot additions, and a
frozen backbone shared by encoder and decoder."""

import pytest
import torch
from torch import nn

from rcc import RCCError, RCCModel, adapters, hooks
from rcc.backbones import shared_copy, shares_weights
from rcc.windows import pool_slots
from tests.conftest import tiny_backbone, tiny_rcc

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(n, batch=1, seed=0, vocab=300):
    return torch.randint(1, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_captured_levels_are_the_reported_hidden_states_at_slot_positions(arch, pooling):
    model = tiny_rcc(arch, window=32, ratio=4, dtype=torch.float64)
    model.config.pooling = pooling
    windows = ids(64).reshape(2, 32)
    level0, sources = model._encode_levels(windows)
    hs = model.encoder.base_model(input_ids=windows, output_hidden_states=True).hidden_states
    assert torch.equal(level0, pool_slots(hs[0], 4, pooling))
    for i, lv in enumerate(model.level_map):
        assert torch.equal(sources[i], pool_slots(hs[lv[0]], 4, pooling))
    assert not level0._base is not None and level0.is_contiguous()  # a copy: the level itself is freed


def test_batched_projections_equal_each_linear_and_mean_level_maps():
    enc = tiny_backbone("llama", num_hidden_layers=4)
    model = RCCModel.from_backbones(enc, tiny_backbone("llama", seed=1), window=32, ratio=4)
    assert model.level_map == [[1, 2], [3, 4]]
    with torch.no_grad():
        for a in model.A:
            a.weight.normal_()
    window = ids(32)
    embeds, adds = model.encode_windows(window)
    hs = model.encoder.base_model(input_ids=window, output_hidden_states=True).hidden_states
    torch.testing.assert_close(embeds, model.G(hs[0][:, 3::4]))
    for i, (a, b) in enumerate(model.level_map):
        torch.testing.assert_close(adds[i], model.A[i]((hs[a][:, 3::4] + hs[b][:, 3::4]) / 2))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_in_place_slot_adds_give_the_same_outputs_and_gradients(arch, checkpointing):
    model = tiny_rcc(arch, window=32, ratio=4).train()
    if checkpointing:
        model.decoder.activation_checkpointing_enable({"use_reentrant": False})
    layers = hooks.decoder_layers(model.decoder)
    ctx, prompt = ids(64), ids(7, seed=1)
    decided = []
    real = hooks._may_add_in_place

    def spy(*a):
        decided.append(real(*a))
        return decided[-1]

    results = []
    for in_place in (True, False):
        torch.manual_seed(0)  # the same dropout masks (GPT-2 has dropout)
        model.zero_grad(set_to_none=True)
        embeds, adds = model.encode_windows(ids(64).reshape(2, 32))
        embeds, adds = embeds.reshape(1, 16, -1), [a.reshape(1, 16, -1) for a in adds]
        tok = model.decoder.get_input_embeddings()(prompt)
        hooks._may_add_in_place = spy
        try:
            with hooks.inject(layers, adds, in_place=in_place):
                logits = model.decoder(inputs_embeds=torch.cat([embeds, tok], 1)).logits
        finally:
            hooks._may_add_in_place = real
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert decided == [True] * len(layers)  # every layer's output was added to in place
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    assert g1.keys() == g2.keys() and any(n.startswith("A.") for n in g1)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-6, atol=1e-7, msg=n)
    del ctx


def test_in_place_add_is_refused_for_views_inputs_and_unknown_autograd_nodes():
    x = torch.randn(1, 5, 4)
    assert hooks._may_add_in_place(x + 1, (x,), {})
    assert not hooks._may_add_in_place(x, (x,), {})  # a layer that returns its input
    assert not hooks._may_add_in_place((x + 1)[:, 1:], (x,), {})  # a view
    w = torch.randn(4, 4, requires_grad=True)
    assert hooks._may_add_in_place(x + w.sum(), (x,), {})  # a residual add
    assert not hooks._may_add_in_place(torch.tanh(x @ w), (x,), {})  # tanh's backward reads its output
    assert not hooks._may_add_in_place(w, (x,), {})  # a leaf that requires grad


def lora_checkpoint(tmp_path, arch="llama"):
    """A saved RCC model whose sides are LoRA on one backbone folder (like the bundled model)."""
    base = tiny_backbone(arch)
    base.save_pretrained(str(tmp_path / "base"))
    src = str(tmp_path / "base")
    enc = RCCModel.from_backbones(base, tiny_backbone(arch), window=32, ratio=4, encoder_source=src,
                                  decoder_source=src)
    for side in (enc.encoder, enc.decoder):
        adapters.add_lora(side, r=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_" in name or name.startswith(("G.", "A.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    enc.save_pretrained(str(tmp_path / "rcc"))
    return str(tmp_path / "rcc")


def unique_numel(module: nn.Module) -> int:
    seen = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[(t.data_ptr(), t.numel())] = t.numel()
    return sum(seen.values())


def test_shared_backbone_loads_once_and_computes_what_two_copies_compute(tmp_path):
    path = lora_checkpoint(tmp_path)
    shared = RCCModel.from_pretrained(path)
    apart = RCCModel.from_pretrained(path, share_backbone=False)
    assert shares_weights(shared.encoder, shared.decoder) and not shares_weights(apart.encoder, apart.decoder)
    assert unique_numel(shared) < 0.6 * unique_numel(apart)  # the frozen weights are held once
    assert shared.fingerprint() == apart.fingerprint()
    for (n1, p1), (n2, p2) in zip(shared.state_dict().items(), apart.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ctx, prompt = ids(80), ids(6, seed=2)
    torch.testing.assert_close(shared(ctx, prompt).logits, apart(ctx, prompt).logits, rtol=0, atol=0)
    mem = shared.compress(ctx)
    apart.check_memory(mem)  # the same model identity
    assert torch.equal(shared.generate(mem, prompt, max_new_tokens=5, eos_token_id=None),
                       apart.generate(ctx, prompt, max_new_tokens=5, eos_token_id=None))
    with pytest.raises(RCCError, match="share"):
        adapters.merge_lora(shared.decoder)
    shared.save_pretrained(str(tmp_path / "again"))  # the format is unchanged: only adapters, G and A_i
    again = RCCModel.from_pretrained(str(tmp_path / "again"), share_backbone=False)
    for (n1, p1), (n2, p2) in zip(again.state_dict().items(), apart.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_shared_copy_is_a_separate_module_over_the_same_tensors():
    base = tiny_backbone("gpt_neox")
    twin = shared_copy(base)
    assert twin is not base and shares_weights(base, twin)
    assert all(a is b for a, b in zip(base.parameters(), twin.parameters()))
    adapters.add_lora(twin, r=2)
    assert adapters.has_lora(twin) and not adapters.has_lora(base)


def test_training_builds_one_backbone_unless_a_side_trains_in_full(tmp_path):
    from rcc.train.setup import build_model
    from rcc.train.config import SECTION_OF, TrainConfig

    def config(**options):
        options = dict(train_data="unused", output_dir=str(tmp_path), max_steps=1, target_tokens=16, cue_min=2,
                       cue_max=3, **options)
        nested: dict = {}
        for key, value in options.items():
            nested.setdefault(SECTION_OF[key], {})[key] = value
        return TrainConfig.from_dict(nested)

    base = tiny_backbone("llama")
    base.save_pretrained(str(tmp_path / "base"))
    opts = dict(backbone=str(tmp_path / "base"), window=32, ratio=4)
    lora = build_model(config(train_encoder="lora", train_decoder="lora", **opts))
    assert shares_weights(lora.encoder, lora.decoder)
    assert all(not p.requires_grad for n, p in lora.decoder.named_parameters() if "lora_" not in n)
    full = build_model(config(train_encoder="frozen", train_decoder="full", **opts))
    assert not shares_weights(full.encoder, full.decoder)
    again = build_model(config(init_from=lora_checkpoint(tmp_path / "ck"), train_encoder="lora", train_decoder="full"))
    assert not shares_weights(again.encoder, again.decoder) and not adapters.has_lora(again.decoder)


def test_bench_times_the_plain_forward_pass_over_rccs_windows():
    from rcc.bench.memory import format_table, measure, summarize

    model = tiny_rcc("llama", window=64, ratio=8)
    f = measure(model, "forward", 640, new_tokens=3, window_batch_size=2)
    r = measure(model, "rcc", 640, new_tokens=3, window_batch_size=2)
    assert f["ok"] and f["compress_s"] > 0 and f["compress_tok_s"] > 0 and f["ttft_s"] is None
    assert f["kv_positions"] == 0 and r["compress_tok_s"] > 0
    summary = summarize([f, r])
    assert summary["compress_vs_forward"][640] == pytest.approx(r["compress_s"] / f["compress_s"], rel=1e-2)
    assert "plain forward pass" in format_table({"points": [f, r], "summary": summary})


def test_fast_lora_inference_equals_peft_and_leaves_training_alone():
    model = tiny_rcc("llama", window=32, ratio=4)
    for side in (model.encoder, model.decoder):
        adapters.add_lora(side, r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ctx, prompt = ids(70), ids(5, seed=3)
    with torch.no_grad():
        want = model(ctx, prompt).logits  # forward: peft's own LoRA forward
        with adapters.fast_inference(model.encoder, model.decoder):
            layer = next(iter(adapters.lora_layers(model.decoder).values()))
            assert "forward" in vars(layer)
            got = model(ctx, prompt).logits
        assert "forward" not in vars(layer)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mem = model.compress(ctx)  # compress uses the fast path: same slots as peft's forward
    torch.testing.assert_close(model.decoder(input_ids=prompt, **{model._cache_kw: mem.cache()}).logits, want,
                               rtol=1e-5, atol=1e-5)
    with adapters.fast_inference(model.decoder):  # with gradients: peft's forward, gradients flow to LoRA
        model(ctx, prompt, labels=prompt).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)


def test_a_load_holds_the_collector_off_and_freezes_the_process_once(tmp_path, monkeypatch):
    import gc

    from rcc import loading

    path = tmp_path / "m"
    tiny_rcc("llama", window=32, ratio=4).save_pretrained(str(path))
    monkeypatch.setattr(loading, "_FROZEN", [False])
    during, real = [], loading._load_model
    monkeypatch.setattr(loading, "_load_model", lambda *a: (during.append(gc.isenabled()), real(*a))[1])
    before = gc.get_freeze_count()
    try:
        with pytest.raises(RCCError):  # an error: the collector back on, nothing frozen
            loading.load_model(str(tmp_path / "nothing"))
        assert gc.isenabled() and not loading._FROZEN[0] and gc.get_freeze_count() == before
        model = loading.load_model(str(path))
        assert isinstance(model, RCCModel) and during == [False, False]  # off while loading, on after
        assert gc.isenabled() and loading._FROZEN[0] and gc.get_freeze_count() > before
        gc.disable()  # a caller that holds the collector off keeps it off
        loading.load_model(str(path))
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_the_objects_a_load_froze_are_still_collected_at_exit(tmp_path):
    """Frozen garbage left at exit is what native modules' leak checks report (triton's
    nanobind printed hundreds of lines after `rcc serve --engine vllm`'s error)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "m"
    tiny_rcc("llama", window=32, ratio=4).save_pretrained(str(path))
    script = (
        "import gc, sys\n"
        "class Cycle:\n"
        "    def __del__(self): sys.stdout.write('collected\\n')\n"
        "from rcc.loading import load_model\n"
        "gc.collect()\n"
        "c = Cycle(); c.me = c; del c\n"  # cyclic garbage, alive when the load freezes
        f"load_model({str(path)!r})\n"
        "assert gc.get_freeze_count() > 0\n"
        "print('loaded', flush=True)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["loaded", "collected"], res.stdout
