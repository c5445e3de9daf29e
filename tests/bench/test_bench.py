"""`rcc bench`: the slope fit, one in-process measurement, and the command end
to end (one child process per point) on a tiny model."""

import json

import pytest

from rcc.bench.memory import BenchConfig, fit_slope, measure, prompt_ids, summarize
from rcc.errors import RCCError
from tests.conftest import tiny_rcc, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    m = tiny_rcc("llama", window=64, ratio=8)
    m.tokenizer = tiny_tokenizer()
    return m


def cli(*args):
    from rcc.cli import main

    return main([str(a) for a in args])


def test_slope_fit_and_summary_on_known_points():
    assert fit_slope([(1, 3.0), (2, 5.0), (4, 9.0)]) == pytest.approx((2.0, 1.0))
    assert fit_slope([(2, 1.0), (2, 3.0)]) is None
    points = [
        {"kind": "rcc", "length": 2048, "ok": True, "peak_mib": 1000.0},
        {"kind": "backbone", "length": 2048, "ok": True, "peak_mib": 600.0},
        {"kind": "rcc", "length": 4096, "ok": True, "peak_mib": 1002.0},
        {"kind": "backbone", "length": 4096, "ok": True, "peak_mib": 700.0},
        {"kind": "rcc", "length": 8192, "ok": True, "peak_mib": 1006.0},
        {"kind": "backbone", "length": 8192, "ok": False, "error": "killed"},
    ]
    s = summarize(points)
    assert s["common_lengths"] == [2048, 4096]  # the failed backbone point leaves 8k out of both fits
    assert s["rcc"]["slope_mib_per_1k"] == pytest.approx(1.0) and s["backbone"]["slope_mib_per_1k"] == pytest.approx(50.0)
    assert s["slope_ratio"] == pytest.approx(50.0)
    with pytest.raises(RCCError):
        BenchConfig(model="m", kinds=["gpu"])
    with pytest.raises(RCCError):
        BenchConfig(model="m", new_tokens=1)


def test_one_measurement_in_process(model):
    r = measure(model, "rcc", 640, new_tokens=3, window_batch_size=1)
    assert r["ok"] and r["kv_positions"] == model.config.slots_for(640) == 80 and r["generated"] == 3
    assert r["compress_s"] > 0 and r["ttft_s"] >= r["compress_s"] and r["decode_tok_s"] > 0
    assert r["peak_mib"] >= r["loaded_mib"] > 0
    b = measure(model, "backbone", 640, new_tokens=3)
    assert b["kv_positions"] == 640 and b["generated"] == 3 and b["compress_s"] is None
    m = prompt_ids(model.tokenizer, 300).shape[1]  # the cache holds context (or slots) + prompt + new tokens
    assert b["kv_cache_mib"] / r["kv_cache_mib"] == pytest.approx((640 + m + 3) / (80 + m + 3), rel=0.01)


@pytest.mark.slow  # a child process per point
def test_bench_cli_end_to_end_in_child_processes(model, tmp_path, capsys):
    ckpt = tmp_path / "model"
    model.save_pretrained(str(ckpt))
    out = tmp_path / "bench.json"
    assert cli("bench", "--model", ckpt, "--device", "cpu", "--lengths", "256,1k,2k", "--new-tokens", "3",
               "--backbone-max-length", "1k", "-o", out, "--quiet") == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    pts = {(p["kind"], p["length"]): p for p in res["points"]}
    assert set(pts) == {(k, n) for k in ("rcc", "backbone") for n in (256, 1024, 2048)}
    assert not pts[("backbone", 2048)]["ok"] and "skipped" in pts[("backbone", 2048)]["error"]
    for (kind, n), p in pts.items():
        if p["ok"]:
            assert p["generated"] == 3 and p["peak_mib"] > 0 and p["memory_measure"].startswith("peak RSS")
            assert p["kv_positions"] == (n if kind == "backbone" else n // 8)
    assert res["summary"]["common_lengths"] == [256, 1024]
    assert res["summary"] == summarize(res["points"])  # the summary is the fit of the recorded points
    assert res["summary"]["rcc"]["points"] == 2 and "slope_ratio" in res["summary"]
    assert "memory slope RCC" in text and "memory slope backbone" in text and "skipped" in text
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # a child process per point
def test_a_failing_point_is_recorded_not_fatal(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli("bench", "--model", tmp_path / "missing", "--device", "cpu", "--lengths", "256", "--kinds", "rcc",
               "-o", out, "--quiet") == 0
    res = json.loads(out.read_text())
    assert res["points"][0]["ok"] is False and "missing" in res["points"][0]["error"]
    assert not out.with_suffix(".png").exists()


def test_compression_is_split_into_the_slot_prefill_and_the_rest(model):
    """The decoder's pre-fill of the slots is timed by hooks on the decoder: part of the
    compression time, never more; the floor reported beside the measured ratio adds it to
    the forward pass's time."""
    r = measure(model, "rcc", 640, new_tokens=3, window_batch_size=1)
    assert 0 < r["slot_prefill_s"] <= r["compress_s"]
    assert r["encoder_s"] == pytest.approx(r["compress_s"] - r["slot_prefill_s"], abs=2e-3)
    f = measure(model, "forward", 640, window_batch_size=1)
    s = summarize([r, f])
    assert s["compress_floor_vs_forward"][640] == pytest.approx((f["compress_s"] + r["slot_prefill_s"]) / f["compress_s"],
                                                                rel=1e-2)
    assert s["compress_vs_forward"][640] == pytest.approx(r["compress_s"] / f["compress_s"], rel=1e-2)


def test_two_dtypes_are_summarised_each_and_against_the_first():
    def pt(kind, dtype, compress, ttft, decode, peak):
        return {"kind": kind, "length": 2048, "dtype": dtype, "ok": True, "peak_mib": peak, "compress_s": compress,
                "compress_tok_s": 2048 / compress if compress else None, "ttft_s": ttft, "decode_tok_s": decode,
                "slot_prefill_s": 0.5 if kind == "rcc" else None}

    points = [pt("rcc", "float32", 4.0, 4.5, 10.0, 900.0), pt("rcc", "bfloat16", 2.0, 2.5, 8.0, 500.0),
              pt("forward", "float32", 3.0, None, None, 800.0), pt("forward", "bfloat16", 1.0, None, None, 450.0)]
    s = summarize(points)
    assert s["compress_vs_forward"] == {2048: pytest.approx(4 / 3, abs=1e-3)}  # the top level is the first dtype's
    assert s["by_dtype"]["bfloat16"]["compress_vs_forward"] == {2048: 2.0}
    assert s["by_dtype"]["bfloat16"]["compress_floor_vs_forward"] == {2048: 1.5}
    rcc = next(r for r in s["vs_first_dtype"]["bfloat16"] if r["kind"] == "rcc")
    assert rcc == {"kind": "rcc", "length": 2048, "compress_tok_s": 2.0, "ttft_s": 1.8, "decode_tok_s": 0.8}
    with pytest.raises(RCCError, match="dtypes"):
        BenchConfig(model="m", dtypes=["float64"])
    assert BenchConfig(model="m", dtypes=["float32", "bfloat16", "float32"]).dtypes == ["float32", "bfloat16"]


def test_generate_from_context_ids_moves_its_slots_and_matches_a_memory(model):
    """The one-off path (no copy of the slots) decodes exactly what a reusable memory does."""
    import torch

    ids = torch.randint(1, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[5, 6, 7]])
    memory = model.compress(ids)
    before = [k.clone() for k, _ in memory.kv]
    a = model.generate(memory, prompt, max_new_tokens=6, eos_token_id=None)
    b = model.generate(ids, prompt, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(a, b) and a.shape == (1, 6)
    assert all(torch.equal(k, k0) for (k, _), k0 in zip(memory.kv, before))  # the memory stays reusable
    assert torch.equal(model.generate(memory, prompt, max_new_tokens=6, eos_token_id=None), a)


def test_decoding_reads_the_cache_one_new_position_per_step(model):
    """generate after the slots: one decoder pass over the prompt with the slots cached, then
    one pass of one token per new token at the next position; the encoder runs once."""
    import torch

    from rcc.hooks import backbone_body

    calls, encoder_calls = [], []

    def seen(module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        cache = kwargs.get(model._cache_kw)
        pos = kwargs.get("position_ids")
        calls.append((x.shape[1], 0 if cache is None else cache.get_seq_length(),
                      None if pos is None else pos[0].tolist()))

    ids = torch.randint(1, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[5, 6, 7]])
    hooks = [model.decoder.register_forward_pre_hook(seen, with_kwargs=True),
             backbone_body(model.encoder).register_forward_pre_hook(lambda *a: encoder_calls.append(1))]
    try:
        model.generate(ids, prompt, max_new_tokens=6, eos_token_id=None)
    finally:
        for h in hooks:
            h.remove()
    P = model.config.slots_for(200)
    assert len(encoder_calls) == 1  # 4 windows, encoded in one batch, once
    assert calls[0][:2] == (P, 0)  # the slots, pre-filled once
    assert calls[1] == (3, P, [P, P + 1, P + 2])  # the prompt after them
    assert calls[2:] == [(1, P + 3 + i, [P + 3 + i]) for i in range(5)]  # then one token per step


def test_repeats_time_every_decode_and_record_threads_and_load(model):
    import torch

    for kind in ("rcc", "backbone"):
        r = measure(model, kind, 300, new_tokens=4, repeats=3)
        assert len(r["decode_tok_s_runs"]) == 3 and r["repeats_same_tokens"] is True
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["threads"] == torch.get_num_threads() and len(r["loadavg_before"]) == 3
    with pytest.raises(RCCError, match="repeats"):
        BenchConfig(model="m", repeats=0)


def test_random_pythia_has_pythia_1_4b_parameter_count():
    """random:pythia-1.4b is Pythia-1.4B's architecture (1,414,647,808 parameters, as
    EleutherAI report it); :layers=N keeps width, heads and vocabulary."""
    import torch

    from rcc.backbones import parse_random, random_backbone

    with torch.device("meta"):
        full = random_backbone("random:pythia-1.4b")
        one = random_backbone("random:pythia-1.4b:layers=1")
    assert sum(p.numel() for p in full.parameters()) == 1_414_647_808
    per_layer = (sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in one.parameters())) / 23
    assert per_layer == sum(p.numel() for p in full.gpt_neox.layers[0].parameters())
    assert parse_random("random:pythia-1.4b:layers=2") == ("pythia-1.4b", 2)
    for bad in ("random:pythia-9b", "random:pythia-1.4b:layers=0", "random:pythia-1.4b:depth=2"):
        with pytest.raises(RCCError, match="random:pythia-1.4b"):
            parse_random(bad)


@pytest.mark.slow  # a child process per point
def test_bench_cli_two_dtypes_side_by_side(model, tmp_path, capsys):
    ckpt = tmp_path / "model"
    model.save_pretrained(str(ckpt))
    out = tmp_path / "bench.json"
    assert cli("bench", "--model", ckpt, "--device", "cpu", "--lengths", "256", "--new-tokens", "3", "--kinds",
               "rcc,forward", "--dtypes", "float32,bfloat16", "-o", out, "--quiet", "--no-plot") == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [(p["kind"], p["dtype"]) for p in res["points"]] == [
        ("rcc", "float32"), ("rcc", "bfloat16"), ("forward", "float32"), ("forward", "bfloat16")]
    assert all(p["ok"] for p in res["points"]), res["points"]
    assert res["machine"]["cpu"] and isinstance(res["machine"]["bf16_flags"], list) and res["machine"]["cores"]
    assert set(res["summary"]["by_dtype"]) == {"float32", "bfloat16"}
    assert "bfloat16 over float32, rcc at 256 tokens: compress" in text and "slot pre-fill s" in text
