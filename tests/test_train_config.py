"""`TrainConfig`: the nested form, the old flat form (still loads, with a
deprecation warning naming the new keys), nested overrides, close-match hints
for unknown keys, one default per fact, and the shipped YAML files."""

import dataclasses
import inspect
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from rcc import RCCError
from rcc.config import RCCConfig
from rcc.data import write_token_folder
from tests.conftest import REPO
from rcc.train import train
from rcc.train_model import build_model
from rcc.train_config import SECTION_OF, TrainConfig, dotted

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FLAT_YAML = """\
backbone: {model_type: llama, hidden_size: 64}
window: 64
ratio: 8
train_data: d
target_tokens: 32
cue_min: 2
cue_max: 4
output_dir: o
max_steps: 10
lr: 1e-4
lr_glue: 1.0e-3
seed: 3
"""
NESTED_YAML = """\
model:
  backbone: {model_type: llama, hidden_size: 64}
  window: 64
  ratio: 8
data:
  train_data: d
  target_tokens: 32
  cue_min: 2
  cue_max: 4
optim:
  max_steps: 10
  lr: 1e-4
  lr_glue: 1.0e-3
run:
  output_dir: o
  seed: 3
"""


def default(name: str):
    """RCCConfig's default for one of its fields, read from the dataclass."""
    return next(f.default for f in dataclasses.fields(RCCConfig) if f.name == name)


def deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_an_old_flat_file_loads_with_one_warning_and_equals_the_nested_one(tmp_path, caplog):
    (tmp_path / "flat.yaml").write_text(FLAT_YAML)
    (tmp_path / "nested.yaml").write_text(NESTED_YAML)
    with caplog.at_level(logging.WARNING, logger="rcc.train_config"):
        nested = TrainConfig.load(tmp_path / "nested.yaml")
    assert deprecations(caplog) == []
    with caplog.at_level(logging.WARNING, logger="rcc.train_config"):
        flat = TrainConfig.load(tmp_path / "flat.yaml")
    (line,) = deprecations(caplog)
    assert "\n" not in line and "flat.yaml" in line
    assert "lr as optim.lr" in line and "window as model.window" in line and "output_dir as run.output_dir" in line
    assert flat == nested and flat.optim.lr == 1e-4 and flat.model.window == 64 and flat.run.seed == 3
    # a flat dict (the Python API) too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rcc.train_config"):
        assert TrainConfig.load({k: v for k, v in flat.to_dict()["model"].items()} | {
            "train_data": "d", "target_tokens": 32, "cue_min": 2, "cue_max": 4, "output_dir": "o", "max_steps": 10,
            "lr": 1e-4, "lr_glue": 1e-3, "seed": 3}) == nested
    assert len(deprecations(caplog)) == 1


def test_nested_and_flat_overrides(tmp_path, caplog):
    (tmp_path / "nested.yaml").write_text(NESTED_YAML)
    with caplog.at_level(logging.WARNING, logger="rcc.train_config"):
        cfg = TrainConfig.load(tmp_path / "nested.yaml", ["optim.lr=3e-4", "model.backbone.hidden_size=32",
                                                           "run.resume=never", "model.lora_target_modules=[q, v]"])
    assert deprecations(caplog) == []
    assert cfg.optim.lr == 3e-4 and cfg.model.backbone == {"model_type": "llama", "hidden_size": 32}
    assert cfg.run.resume == "never" and cfg.model.lora_target_modules == ["q", "v"]
    with caplog.at_level(logging.WARNING, logger="rcc.train_config"):
        old = TrainConfig.load(tmp_path / "nested.yaml", ["lr=3e-4", "backbone.hidden_size=32", "resume=never",
                                                           "lora_target_modules=[q, v]"])
    (line,) = deprecations(caplog)
    assert "lr as optim.lr" in line and "backbone as model.backbone" in line
    assert old == cfg
    # the same option given both ways in one mapping is refused, not silently resolved
    with pytest.raises(RCCError, match="lr is given twice, as lr and optim.lr; keep only optim.lr"):
        TrainConfig.load({"lr": 1e-3, "optim": {"lr": 1e-4, "max_steps": 1}, "model": {"backbone": "x"},
                          "data": {"train_data": "d", "target_tokens": 32, "cue_min": 2, "cue_max": 4},
                          "run": {"output_dir": "o"}})


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown training option 'optim.lrr'; did you mean 'optim.lr'?"),
    ("optim.window=64", "unknown training option 'optim.window'; did you mean 'model.window'?"),
    ("data.max_window=2", "unknown training option 'data.max_window'; did you mean 'data.max_windows'?"),
    ("max_step=1", "unknown training option 'max_step'; did you mean 'optim.max_steps'?"),
    ("modle.window=64", "unknown training option 'modle'; did you mean 'model'?"),
    ("run.zzz=1", "unknown training option 'run.zzz'; known keys of run: output_dir, seed"),
    ("model=3", "model must be a mapping of option: value; got 3"),
    ("model.ratio=7", "model: window \\(64\\) is not divisible by ratio \\(7\\)"),
    ("model.pooling=max", "model.pooling must be 'last' or 'mean'; got 'max'"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must not be negative; got -1"),
])
def test_bad_options_name_the_nested_key(tmp_path, override, message):
    (tmp_path / "nested.yaml").write_text(NESTED_YAML)
    with pytest.raises(RCCError, match=message):
        TrainConfig.load(tmp_path / "nested.yaml", [override])


def test_to_json_writes_the_nested_form_and_reads_back(tmp_path):
    (tmp_path / "nested.yaml").write_text(NESTED_YAML)
    cfg = TrainConfig.load(tmp_path / "nested.yaml")
    saved = json.loads(cfg.to_json())
    assert set(saved) == {"task", "model", "data", "optim", "run"} and saved["optim"]["lr"] == 1e-4
    assert TrainConfig.from_dict(saved) == cfg
    assert set(dotted(saved)) == {"task"} | {f"{section}.{name}" for name, section in SECTION_OF.items()}
    # the Python API takes a dict per section, checked like a file
    assert TrainConfig(model=saved["model"], data=saved["data"], optim=saved["optim"], run=saved["run"]) == cfg
    with pytest.raises(RCCError, match="did you mean 'optim.lr'"):
        TrainConfig(model=saved["model"], data=saved["data"], optim={"lrr": 1}, run=saved["run"])


def test_one_default_per_fact_a_fresh_model_takes_rccconfig_defaults():
    base = {"model": {"backbone": dict(BACKBONE)}, "data": {"train_data": "d", "target_tokens": 32, "cue_min": 2,
                                                              "cue_max": 4},
            "optim": {"max_steps": 1}, "run": {"output_dir": "o"}}
    cfg = TrainConfig.load(base)
    assert cfg.model.window is None and cfg.model.ratio is None and cfg.model.pooling is None  # unset
    model = build_model(cfg)
    for name in ("window", "ratio", "pooling"):
        assert getattr(model.config, name) == default(name), name
    # the config's own check of the span against the window reads the same default
    TrainConfig.load(base, [f"data.target_tokens={default('window')}"])
    with pytest.raises(RCCError, match=f"model.window={default('window')} tokens"):
        TrainConfig.load(base, [f"data.target_tokens={default('window') + 1}"])
    # the library's other entry points for a fresh model state no default of their own
    from rcc.model import RCCModel

    params = inspect.signature(RCCModel.from_backbones).parameters
    assert all(params[name].default == default(name) for name in ("window", "ratio", "pooling"))
    # a set value wins over the default
    assert build_model(TrainConfig.load(base, ["model.window=64", "model.ratio=8"])).config.slots_per_window == 8


def test_a_checkpoint_with_an_old_flat_train_config_resumes(tmp_path, caplog):
    rng = np.random.default_rng(0)
    write_token_folder(tmp_path / "tokens", {"train": [rng.integers(1, 64, 80) for _ in range(16)]}, 64)
    cfg = {"model": {"backbone": dict(BACKBONE), "window": 16, "ratio": 4},
           "data": {"train_data": str(tmp_path / "tokens"), "target_tokens": 8, "cue_min": 2, "cue_max": 3},
           "optim": {"max_steps": 2, "batch_size": 2, "warmup_steps": 1},
           "run": {"output_dir": str(tmp_path / "run"), "save_every": 1, "eval_batches": 0, "progress": False,
                   "tensorboard": False}}

    def stop_after_step_1(step, _metrics):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop_after_step_1)
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    saved = json.loads((checkpoint / "train_config.json").read_text())
    assert set(saved) == {"task", "model", "data", "optim", "run"}  # written nested
    flat = {"task": saved["task"]} | {k: v for part in ("model", "data", "optim", "run")
                                      for k, v in saved[part].items()}
    (checkpoint / "train_config.json").write_text(json.dumps(flat))  # as an older version wrote it
    with caplog.at_level(logging.WARNING, logger="rcc.train"):
        result = train(dict(cfg, optim=dict(cfg["optim"], lr=5e-4)))
    assert result.step == 2
    changed = [r.getMessage() for r in caplog.records if "changed options" in r.getMessage()]
    assert len(changed) == 1 and "changed options optim.lr;" in changed[0]  # the one difference, by its new key


SHIPPED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("recipes/*/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_configs_are_nested_and_valid(path, caplog):
    with caplog.at_level(logging.WARNING, logger="rcc.train_config"):
        TrainConfig.load(path)
    assert deprecations(caplog) == []


def test_the_bundled_models_flat_train_config_still_loads(caplog):
    """The shipped model's train_config.json was written in the flat form."""
    path = ROOT / "rcc/models/rcc-smollm2-135m/train_config.json"
    saved = json.loads(path.read_text())
    assert "instruction_mode" in saved and "data" not in saved  # the old form
    with caplog.at_level(logging.WARNING, logger="rcc.train_config"):
        cfg = TrainConfig.load(path)
    assert len(deprecations(caplog)) == 1
    assert cfg.data.instruction_mode == saved["instruction_mode"] and cfg.model.ratio == saved["ratio"]
    assert dotted(saved)["data.instruction_mode"] == saved["instruction_mode"]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_a_valid_config(recipe):
    """A recipe with a misspelt option or a contradiction fails here, not hours into a run."""
    cfg = TrainConfig.load(recipe)
    assert cfg.task in ("pretrain", "finetune") and cfg.run.output_dir
