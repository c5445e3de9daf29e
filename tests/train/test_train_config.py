"""`TrainConfig`: the nested form (an option outside its section is refused with
the key it belongs under), nested overrides, close-match hints for unknown keys,
one default per fact, and the shipped YAML files."""

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from rcc import RCCError
from rcc.config import RCCConfig
from tests.conftest import REPO
from rcc.train.setup import build_model
from rcc.train.config import SECTION_OF, TrainConfig, dotted

ROOT = Path(__file__).resolve().parents[2]
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


def test_an_option_outside_its_section_is_refused_with_its_key(tmp_path):
    (tmp_path / "flat.yaml").write_text(FLAT_YAML)
    (tmp_path / "nested.yaml").write_text(NESTED_YAML)
    assert TrainConfig.load(tmp_path / "nested.yaml").optim.lr == 1e-4
    with pytest.raises(RCCError, match="unknown training option '.*'; did you mean '(model|data|optim|run)\\."):
        TrainConfig.load(tmp_path / "flat.yaml")
    with pytest.raises(RCCError, match="unknown training option 'lr'; did you mean 'optim.lr'"):
        TrainConfig.load({"lr": 1e-3})


def test_nested_overrides(tmp_path):
    (tmp_path / "nested.yaml").write_text(NESTED_YAML)
    cfg = TrainConfig.load(tmp_path / "nested.yaml", ["optim.lr=3e-4", "model.backbone.hidden_size=32",
                                                       "run.resume=never", "model.lora_target_modules=[q, v]"])
    assert cfg.optim.lr == 3e-4 and cfg.model.backbone == {"model_type": "llama", "hidden_size": 32}
    assert cfg.run.resume == "never" and cfg.model.lora_target_modules == ["q", "v"]
    with pytest.raises(RCCError, match="unknown training option 'lr'; did you mean 'optim.lr'"):
        TrainConfig.load(tmp_path / "nested.yaml", ["lr=3e-4"])


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


SHIPPED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("recipes/*/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_configs_are_nested_and_valid(path):
    TrainConfig.load(path)


def test_the_bundled_models_train_config_is_nested_and_valid():
    saved = json.loads((REPO / "rcc" / "models" / "rcc-smollm2-135m" / "train_config.json").read_text())
    assert set(saved) == {"task", "model", "data", "optim", "run"}
    cfg = TrainConfig.load(saved)
    assert cfg.data.instruction_mode == saved["data"]["instruction_mode"] and cfg.model.ratio == saved["model"]["ratio"]
    assert dotted(saved)["data.instruction_mode"] == saved["data"]["instruction_mode"]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_a_valid_config(recipe):
    """A recipe with a misspelt option or a contradiction fails here, not hours into a run."""
    cfg = TrainConfig.load(recipe)
    assert cfg.task in ("pretrain", "finetune") and cfg.run.output_dir
