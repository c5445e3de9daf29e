"""The kvpress baselines: the child's pre-fill and decoding plumbing (stand-in
presses, this environment), and real kvpress presses run in kvpress's own
environment (.venv-kvpress, made by scripts/kvpress_env.sh, which
scripts/install.sh and so CI run) on a tiny model. Without that environment
the real test fails, unless RCC_ALLOW_SKIP is set."""

import contextlib
import math
import os

import pytest

from rcc.eval import EvalConfig, baselines, kvpress, passkey, run_eval
from rcc.eval.kvpress_child import compression_ratio, run_presses
from rcc.hooks import decoder_layers
from tests.conftest import REPO

DOC = REPO / "examples" / "lighthouse.txt"
POSITIONS = 512


class _Press:
    """A stand-in press with kvpress's interface: ``forward_hook`` prunes the
    layer's cache it is handed; ``with press(model):`` hooks every attention layer."""

    def prune(self, keys):
        return keys

    def forward_hook(self, module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = cache.layers[module.layer_idx]
        layer.keys, layer.values = self.prune(layer.keys), self.prune(layer.values)
        return output

    @contextlib.contextmanager
    def __call__(self, model):
        handles = [lyr.self_attn.register_forward_hook(self.forward_hook, with_kwargs=True)
                   for lyr in decoder_layers(model)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class _DropHalf(_Press):
    """Keeps the second half of every layer's pre-filled keys and values."""

    def prune(self, keys):
        return keys[:, :, keys.shape[2] // 2:]


class _Fails(_Press):
    def prune(self, keys):
        raise ValueError("this press does not like\nthis model")


def test_child_plumbing_continues_pressed_caches_at_the_right_positions(model, tok):
    from rcc.prompts import ASSISTANT, HEADER

    kv = kvpress.KVPressBaselines(model.decoder, tok, [kvpress.parse_spec("kvpress:x@4")], 8)
    context, question = DOC.read_text()[:600], "Who kept the lamp?"
    pre, post = baselines.encode_text(tok, HEADER), baselines.encode_text(tok, "\n\n" + question + ASSISTANT)
    item, info = kv.item("a", pre, baselines.encode_text(tok, context), post, 8, baselines.stop_ids(tok))
    full = baselines.FullContext(model.decoder, tok).answer(context, question, 8)
    presses = {"none": _Press(), "half": _DropHalf(), "fails": _Fails()}
    shared = run_presses(model.decoder, presses, item)  # one pre-fill for all three
    assert shared["none"]["token_ids"] == full.token_ids and len(full.token_ids) > 0
    assert shared["none"]["kv_positions"] == len(item["prefill"]) == len(pre) + info["kept_tokens"]
    half = len(item["prefill"]) // 2
    assert shared["half"]["kv_positions"] == len(item["prefill"]) - half == shared["half"]["kv_positions_min"]
    assert shared["half"]["token_ids"] != full.token_ids
    assert shared["fails"] == {"error": "ValueError: this press does not like this model"}
    separate = run_presses(model.decoder, presses, item, separate=True)  # kvpress's way: `with press(model)`
    mixed = run_presses(model.decoder, presses, item, alone={"half"})  # a press with its own __call__ runs alone
    assert mixed["half"]["shared_prefill"] is False and mixed["none"]["shared_prefill"] is True
    for name in ("none", "half"):
        assert separate[name]["token_ids"] == shared[name]["token_ids"] == mixed[name]["token_ids"]
        assert separate[name]["kv_positions"] == shared[name]["kv_positions"] == mixed[name]["kv_positions"]
    ids = baselines.encode_text(tok, DOC.read_text())[:200]
    item, _ = kv.item("b", [], ids, ids[:5], 6, set())
    assert item["budgets"] == {"kvpress:x@4": 50}  # ceil(200 / 4)
    pressed = run_presses(model.decoder, {"half": _DropHalf()}, item)["half"]
    assert pressed["kv_positions"] == 100 and len(pressed["token_ids"]) == 6


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

    # one pre-fill for every press (above) gives what each press gives alone, kvpress's own way
    # (`with press(model)`, one pre-fill per press and sample)
    kv = kvpress.KVPressBaselines(model.decoder, model.tokenizer, [kvpress.parse_spec(p) for p in ran[:4]], 8)
    examples = passkey.examples(cfg, model.tokenizer)
    items, layout = kv.items(examples, ["chat", "continuation"], res["max_new_tokens"])
    separate, skipped = kv.run(items, separate=True)
    assert skipped == {} and set(separate) == set(ran[:4])
    records = {(r["id"], r["method"]): r for r in res["records"]}
    for name, got in separate.items():
        for key, out in got.items():
            i, prompt, _ = layout[key]
            rec = records[(examples[i].id, f"{name}/{prompt}")]
            assert out["shared_prefill"] is False and rec["info"]["shared_prefill"] is True
            assert out["kv_positions"] == rec["info"]["kv_positions"], (name, key)
            assert kv.prediction(prompt, out, {}).text == rec["prediction"], (name, key)
