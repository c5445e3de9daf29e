"""`rcc bench train`: the FLOPs it counts against torch's own counter, and a
run of the CLI comparing the step before and after the speed work."""

import json

import numpy as np
import pytest
import yaml
from torch.utils.flop_counter import FlopCounterMode

from rcc.bench.train import step_flops
from rcc.cli import main
from rcc.data import PretrainBatches, TokenFile, write_token_folder
from rcc.train.loop import training_loss
from rcc.train.setup import build_model
from rcc.train.config import SECTION_OF, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
BACKBONE = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tokens")
    write_token_folder(path, {"train": [rng.integers(1, 300, 400) for _ in range(16)]}, 300)
    return path


def config(folder, out, task="pretrain", **over) -> dict:
    """A tiny run's config in the nested form; ``over`` names options by field."""
    options = dict(backbone=BACKBONE, window=32, ratio=4, train_data=str(folder), output_dir=str(out), max_steps=1,
                   min_windows=2, max_windows=2, target_tokens=16, cue_min=2, cue_max=3, batch_size=2, lora_r=4)
    options.update(over)
    cfg: dict = {"task": task}
    for key, value in options.items():
        cfg.setdefault(SECTION_OF[key], {})[key] = value
    return cfg


@pytest.mark.parametrize("encoder,decoder,grad_windows", [("lora", "lora", 0), ("full", "full", 0),
                                                          ("frozen", "lora", 0), ("lora", "full", 1)])
def test_counted_flops_match_torchs_flop_counter(folder, tmp_path, encoder, decoder, grad_windows):
    cfg = TrainConfig.load(config(folder, tmp_path, train_encoder=encoder, train_decoder=decoder,
                                  grad_windows=grad_windows))
    model = build_model(cfg).train()
    batch = PretrainBatches(TokenFile(str(folder)), window=32, batch_size=2, min_windows=2, max_windows=2,
                            target_tokens=16, cue_min=2, cue_max=3, reconstruct_fraction=1.0)[0]
    with FlopCounterMode(display=False) as counter:
        training_loss(model, batch, grad_windows).backward()
    ratio = step_flops(model, cfg, batch) / counter.get_total_flops()
    # an upper bound: the first layer's input gradients are counted even where autograd skips them
    assert 1.0 <= ratio < 1.15, ratio


def test_the_cli_writes_json_and_a_table(folder, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(folder, tmp_path / "run", train_encoder="lora",
                                                           train_decoder="lora", train_data="nowhere")))
    out = tmp_path / "bench.json"
    code = main(["bench", "train", str(tmp_path / "c.yaml"), "run.mixed_precision=bf16", "--random-data",
                 "--steps", "1", "--warmup", "0", "--peak-tflops", "1", "-q", "-o", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    (v,) = result["variants"]
    assert (v["mixed_precision"], v["frozen_dtype"]) == ("bf16", "bfloat16") and "ratio" not in result
    assert v["samples_per_s"] == pytest.approx(2 / v["seconds_per_step"])
    assert 0 < sum(v["phases_s"].values()) <= v["seconds_per_step"] * 1.01
    assert v["flops_per_step"] > 0 and v["mfu"] == pytest.approx(v["tflops_per_s"] / 1.0)
    assert v["peak_gib"] >= v["resident_gib"] > 0
    assert "| new | bf16 | bfloat16 |" in capsys.readouterr().out
    assert out.with_suffix(".md").read_text().startswith(result["device"])


def test_two_dtypes_side_by_side_with_the_machine(folder, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(folder, tmp_path / "run", train_data="nowhere")))
    out = tmp_path / "bench.json"
    assert main(["bench", "train", str(tmp_path / "c.yaml"), "--random-data", "--dtypes", "float32,bfloat16",
                 "--steps", "1", "--warmup", "0", "--peak-tflops", "1", "-q", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    f32, bf16 = result["variants"]
    assert (f32["name"], f32["mixed_precision"], f32["frozen_dtype"]) == ("float32", "no", "float32")
    assert (bf16["name"], bf16["mixed_precision"], bf16["frozen_dtype"]) == ("bfloat16", "bf16", "bfloat16")
    assert result["ratio"] == pytest.approx(bf16["samples_per_s"] / f32["samples_per_s"])
    assert result["machine"]["cpu"] and isinstance(result["machine"]["bf16_flags"], list)
    assert "bfloat16 / float32 samples/s" in capsys.readouterr().out
    assert main(["bench", "train", str(tmp_path / "c.yaml"), "--random-data", "--dtypes", "float64"]) == 2
    assert "--dtypes: unknown float64" in capsys.readouterr().err


def test_bad_bench_input_is_one_line(folder, tmp_path, capsys):
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(config(folder, tmp_path / "run", task="finetune")))
    assert main(["bench", "train", str(tmp_path / "f.yaml"), "--random-data"]) == 2
    assert capsys.readouterr().err.strip().startswith("rcc: error: --random-data builds pretraining tokens")
