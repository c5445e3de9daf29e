"""The fused head + cross-entropy (rcc/loss.py) equals the plain loss, in values
and gradients, and RCCModel.forward's loss equals the one from full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rcc import loss as fused
from tests.conftest import tiny_rcc

pytestmark = pytest.mark.usefixtures("one_thread")


def plain(hidden, head, targets):
    logits = head(hidden)
    return F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, targets, ignore_index=-100)


def grads(fn, hidden, head, targets):
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    value = fn(hidden, head, targets)
    value.backward()
    return value.detach(), hidden.grad, [p.grad.clone() for p in head.parameters()]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_equals_plain_in_value_and_gradients(dtype, tol, bias, monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 7 * 97)  # 7 rows a chunk: several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(24, 97, bias=bias).to(dtype)
    hidden = torch.randn(40, 24, generator=g, dtype=dtype) * 3
    targets = torch.randint(0, 97, (40,), generator=g)
    targets[::3] = -100
    want = grads(plain, hidden, head, targets)
    got = grads(fused.linear_cross_entropy, hidden, head, targets)
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol)
    assert got[1][::3].abs().max() == 0  # ignored rows get no gradient
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_frozen_head_and_no_grad_need_no_gradient_buffers():
    head = nn.Linear(8, 50).requires_grad_(False)
    hidden = torch.randn(6, 8, requires_grad=True)
    targets = torch.randint(0, 50, (6,))
    value = fused.linear_cross_entropy(hidden, head, targets)
    value.backward()
    torch.testing.assert_close(value, plain(hidden, head, targets))
    assert head.weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(fused.linear_cross_entropy(hidden, head, targets), plain(hidden, head, targets))


def test_a_head_that_is_not_a_linear_runs_chunked_under_checkpointing(monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 5 * 30)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 30))
    head.out_features = 30
    hidden = torch.randn(23, 8)
    targets = torch.randint(0, 30, (23,))
    targets[4] = -100
    want, got = grads(plain, hidden, head, targets), grads(fused.linear_cross_entropy, hidden, head, targets)
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def rcc_plain_loss(model, ctx, prompt, labels):
    """The loss from the decoder's full logits (the original path)."""
    from rcc import hooks

    parts = list(model.iter_slots(ctx))
    embeds = torch.cat([p[0] for p in parts], 1)
    adds = [torch.cat([p[1][i] for p in parts], 1) for i in range(len(model.A))]
    tok = model.decoder.get_input_embeddings()(prompt)
    with hooks.inject(hooks.decoder_layers(model.decoder), adds, in_place=False):
        logits = model.decoder(inputs_embeds=torch.cat([embeds, tok], 1)).logits
    P, m = embeds.shape[1], prompt.shape[1]
    kept = logits[:, P - 1 : P + m - 1]
    return F.cross_entropy(kept.reshape(-1, kept.shape[-1]), labels.reshape(-1), ignore_index=-100), logits[:, P:]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_model_loss_equals_the_loss_from_full_logits(arch):
    model = tiny_rcc(arch, window=32, ratio=4, dtype=torch.float64).train()
    g = torch.Generator().manual_seed(1)
    ctx, prompt = torch.randint(1, 300, (2, 70), generator=g), torch.randint(1, 300, (2, 9), generator=g)
    labels = prompt.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(ctx, prompt, labels=labels)
    assert out._logits is None  # the loss did not need them
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want_loss, want_logits = rcc_plain_loss(model, ctx, prompt, labels)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-12, atol=1e-12)
    assert [a is None for a in got] == [b is None for b in want] and sum(a is not None for a in got) > 20
    for a, b in zip(got, want):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-12, atol=1e-12)  # computed when read


def test_logit_softcapping_falls_back_to_the_decoders_own_logits():
    model = tiny_rcc("llama", window=32, ratio=4, dtype=torch.float64)
    assert fused.plain_head(model.decoder) is model.decoder.lm_head
    ctx, prompt = torch.randint(1, 300, (1, 40)), torch.randint(1, 300, (1, 6))
    model.decoder.config.final_logit_softcapping = 30.0
    assert fused.plain_head(model.decoder) is None
    out = model(ctx, prompt, labels=prompt)
    assert out._logits is not None  # the decoder's forward made them
    torch.testing.assert_close(out.loss, rcc_plain_loss(model, ctx, prompt, prompt)[0], rtol=1e-12, atol=1e-12)
