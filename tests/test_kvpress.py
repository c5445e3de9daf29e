"""The kvpress baselines: the child's pre-fill and decoding plumbing (stand-in
presses, this environment), and real kvpress presses run in kvpress's own
environment (.venv-kvpress, made by scripts/kvpress_env.sh, which
scripts/install.sh and so CI run) on a tiny model. Without that environment
the real test fails, unless RCC_ALLOW_SKIP is set."""

import contextlib
import math
import os

import pytest
import torch

from rcc.eval import EvalConfig, baselines, kvpress, run_eval
from rcc.eval.kvpress_child import compression_ratio, run_item
from rcc.hooks import decoder_layers
from tests.conftest import REPO, tiny_rcc, tiny_tokenizer

DOC = REPO / "examples" / "lighthouse.txt"
POSITIONS = 512


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_rcc("llama", window=64, ratio=8, max_position_embeddings=POSITIONS)
    m.tokenizer = tok
    return m


class _NoPress:
    """Leaves the cache alone: the child's plumbing must then equal the full baseline."""

    def __call__(self, model):
        return contextlib.nullcontext()


class _DropHalf:
    """Keeps the second half of every layer's pre-filled keys and values."""

    def __call__(self, model):
        @contextlib.contextmanager
        def ctx():
            def hook(module, args, kwargs, output):
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                layer = cache.layers[module.layer_idx]
                half = layer.keys.shape[2] // 2
                layer.keys, layer.values = layer.keys[:, :, half:], layer.values[:, :, half:]
                return output

            handles = [lyr.self_attn.register_forward_hook(hook, with_kwargs=True) for lyr in decoder_layers(model)]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()

        return ctx()


def test_child_plumbing_continues_a_pressed_cache_at_the_right_positions(model, tok):
    from rcc.prompts import ASSISTANT, HEADER

    kv = kvpress.KVPressBaselines(model.decoder, tok, [kvpress.parse_spec("kvpress:x@4")], 8)
    context, question = DOC.read_text()[:600], "Who kept the lamp?"
    pre, post = baselines._ids(tok, HEADER), baselines._ids(tok, "\n\n" + question + ASSISTANT)
    item, info = kv.item("a", pre, baselines._ids(tok, context), post, 8, baselines.stop_ids(tok))
    full = baselines.FullContext(model.decoder, tok).answer(context, question, 8)
    same = run_item(model.decoder, _NoPress(), item, 0)
    assert same["token_ids"] == full.token_ids and len(full.token_ids) > 0
    assert same["kv_positions"] == len(item["prefill"]) == len(pre) + info["kept_tokens"]
    ids = baselines._ids(tok, DOC.read_text())[:200]
    item, _ = kv.item("b", [], ids, ids[:5], 6, set())
    pressed = run_item(model.decoder, _DropHalf(), item, 100)
    assert pressed["kv_positions"] == pressed["kv_positions_min"] == 100 and len(pressed["token_ids"]) == 6
    assert item["budgets"] == {"kvpress:x@4": 50}  # ceil(200 / 4)


def test_compression_ratio_lands_on_the_budget_in_kvpress_arithmetic():
    for n in (7, 100, 2048, 8170, 32768):
        for keep in (1, 3, n // 16, n // 2, n - 1):
            keep = max(1, keep)
            assert max(1, int(n * (1 - compression_ratio(n, keep)))) == keep, (n, keep)  # kvpress's compute_n_kept
    assert compression_ratio(10, 10) == 0.0 and compression_ratio(10, 12) == 0.0


def test_a_child_that_dies_is_reported_in_one_line(model, tok, tmp_path):
    kv = kvpress.KVPressBaselines(model.decoder, tok, [kvpress.parse_spec("kvpress:snapkv@4")], 8, python="/bin/false")
    item, _ = kv.item("a", [], list(range(3, 40)), [5, 6], 2, set())
    outputs, skipped = kv.run([item])
    assert outputs == {} and skipped == {"kvpress:snapkv@4": "the kvpress child (/bin/false) failed: no output"}


def _kvpress_python() -> str:
    python, why = kvpress.find_python()
    if python is None:
        if os.environ.get("RCC_ALLOW_SKIP"):
            pytest.skip(why)
        pytest.fail(f"{why} (CI makes it in scripts/install.sh; set RCC_ALLOW_SKIP=1 to skip)")
    return python


@pytest.mark.slow  # starts kvpress's environment (imports torch, transformers 5.2, kvpress): ~20 s
def test_kvpress_presses_run_in_their_environment_and_keep_the_budget(model):
    _kvpress_python()
    presses = ["kvpress:snapkv@4", "kvpress:KnormPress@8", "kvpress:streaming_llm@16", "kvpress:expected_attention@4",
               "kvpress:snapkv@1.0001", "kvpress:nosuch@4", "kvpress:composed@4"]
    cfg = EvalConfig(task="passkey", lengths=[300, 700], depths=[0.5], modes="manual",
                     baselines=",".join(["full", *presses]))
    res = run_eval(model, cfg)
    assert res["kvpress"]["versions"]["kvpress"] == "0.5.5"
    assert res["kvpress"]["versions"]["transformers"].startswith("5.2.")
    assert res["kvpress"]["press_classes"]["kvpress:KnormPress@8"] == "KnormPress"
    assert set(res["skipped"]) == {"kvpress:nosuch@4", "kvpress:composed@4"}
    assert "has no press 'nosuch'" in res["skipped"]["kvpress:nosuch@4"]
    assert "takes no compression_ratio" in res["skipped"]["kvpress:composed@4"]
    ran = presses[:5]
    assert res["methods"][-10:] == [f"{n}/{p}" for n in ran for p in ("chat", "continuation")]
    full = {(r["id"], r["prompt"]): r for r in res["records"] if r["family"] == "full"}
    for r in res["records"]:
        if not r["family"].startswith("kvpress:"):
            continue
        info, ratio = r["info"], float(r["family"].split("@")[1])
        n = info["context_tokens"]
        assert info["truncated"] == (n > POSITIONS)  # read as `full` reads: cut to the decoder's positions
        want = min(info["prefill_tokens"], math.ceil(n / ratio))
        assert info["budget"] == want
        # measured in the child, in every layer: the press kept exactly the budget
        assert info["kv_positions"] == info["kv_positions_min"] == want, (r["method"], info)
        if ratio > 2:
            assert info["kv_positions"] < info["prefill_tokens"] // 2
        if info["kv_positions"] == info["prefill_tokens"]:  # nothing pruned (@1.0001, or the header fits)
            # the same backbone, reloaded under transformers 5.2, answers token for token as `full` does here
            assert r["family"] == "kvpress:snapkv@1.0001"
            assert r["prediction"] == full[(r["id"], r["prompt"])]["prediction"]
    # pruned caches change what the decoder writes (a press that kept everything would not)
    pressed = [r for r in res["records"] if r["family"] == "kvpress:snapkv@4" and r["prompt"] == "chat"]
    assert all(r["prediction"] != full[(r["id"], "chat")]["prediction"] for r in pressed)
    assert any(b["method"] == "kvpress:snapkv@4" for b in res["best"])
