"""`rcc train`'s speed options: frozen weights stored in the compute dtype
(never re-cast per step), per-layer ``torch.compile`` with RCC's hooks outside,
and the final model gathered without reloading the backbones."""

import json
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rcc import RCCError, RCCModel
from rcc.train.loop import train, training_loss
from rcc.train.setup import gathered_model, build_model, compile_layers, resolve_frozen_dtype, store_frozen
from rcc.train.config import TrainConfig
from tests.train.test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def losses(folder) -> list[float]:
    return [r["loss"] for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines()) if "loss" in r]


def a_batch(tokens_folder, windows=2):
    from rcc.data import PretrainBatches, TokenFile

    return PretrainBatches(TokenFile(tokens_folder), window=16, batch_size=2, min_windows=windows,
                           max_windows=windows, target_tokens=8, cue_min=2, cue_max=2, reconstruct_fraction=0.5)[0]


def lora_model(tokens_folder, tmp_path, **over):
    options = {"train_encoder": "lora", "train_decoder": "lora", "lora_r": 4, **over}
    cfg = TrainConfig.load(tiny(tokens_folder, tmp_path, **options))
    model = build_model(cfg).train()
    with torch.no_grad():  # A_i start at zero; non-zero ones make the hooks matter
        for i, a in enumerate(model.A):
            a.weight.copy_(torch.randn(a.weight.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return cfg, model


class CountCasts(TorchDispatchMode):
    """Records the storage of every tensor a dtype conversion reads."""

    def __init__(self):
        super().__init__()
        self.sources = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and "dtype" in kwargs:
            self.sources.append(args[0].untyped_storage().data_ptr())
        return func(*args, **kwargs)


# ----------------------------------------------------------- frozen dtype
def test_frozen_weights_in_bf16_are_not_recast_and_trained_ones_stay_fp32(tokens, tmp_path):
    batch = a_batch(tokens)
    cfg, model = lora_model(tokens, tmp_path)
    counts = {}
    for label in ("float32 storage", "bf16 storage"):
        if label == "bf16 storage":
            assert store_frozen(model, cfg, torch.bfloat16) > 0
        frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
        with CountCasts() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = training_loss(model, batch)
        loss.backward()
        counts[label] = sum(ptr in frozen for ptr in casts.sources)
        model.zero_grad(set_to_none=True)
    # fp32 storage: autocast casts every frozen matrix on every forward; bf16 storage: none
    assert counts["float32 storage"] > 0 and counts["bf16 storage"] == 0, counts
    dtypes = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}  # shared backbone: both sides
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or n.startswith(("G.", "A.")))
    assert dtypes["decoder.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["decoder.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes["encoder.model.embed_tokens.weight"] == torch.bfloat16


def test_frozen_dtype_resolution_and_refusals(tokens, tmp_path):
    cfg = TrainConfig.load(tiny(tokens, tmp_path))
    assert resolve_frozen_dtype(cfg, "no") == torch.float32
    assert resolve_frozen_dtype(cfg, "bf16") == torch.bfloat16
    assert resolve_frozen_dtype(cfg, "fp16") == torch.float16
    assert resolve_frozen_dtype(cfg, "bf16", sharded=True) == torch.float32
    legacy = TrainConfig.load(tiny(tokens, tmp_path, frozen_dtype="float32"))
    assert resolve_frozen_dtype(legacy, "bf16") == torch.float32
    with pytest.raises(RCCError, match="neither model.dtype"):
        resolve_frozen_dtype(TrainConfig.load(tiny(tokens, tmp_path, frozen_dtype="float16")), "bf16")
    with pytest.raises(RCCError, match="FSDP"):
        resolve_frozen_dtype(TrainConfig.load(tiny(tokens, tmp_path, frozen_dtype="bfloat16")), "bf16", sharded=True)
    with pytest.raises(RCCError, match="model.frozen_dtype must be one of"):
        TrainConfig.load(tiny(tokens, tmp_path, frozen_dtype="int8"))


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state whose mixed precision cannot change; a run with
    another precision in this test process needs it cleared (a real run is one process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_a_bf16_run_stores_frozen_weights_in_bf16_and_tracks_the_fp32_losses(tokens, tmp_path, fresh_accelerate):
    common = dict(train_encoder="lora", train_decoder="lora", lora_r=4, max_steps=3, eval_every=0, eval_batches=0)
    train(tiny(tokens, tmp_path / "fp32", **common))
    fresh_accelerate_state()
    half = train(tiny(tokens, tmp_path / "bf16", mixed_precision="bf16", **common))
    base = half.model.decoder.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.dtype == torch.bfloat16 and half.model.G.weight.dtype == torch.float32
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(a) == len(b) == 3
    # bf16 rounds weights and activations (8 bits of mantissa): losses agree to about 1%
    assert all(abs(x - y) / x < 2e-2 for x, y in zip(a, b)), (a, b)
    reloaded = RCCModel.from_pretrained(str(half.final_dir))  # adapters and maps only, in float32
    assert reloaded.G.weight.dtype == torch.float32


def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


# --------------------------------------------------------------- compile
needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                              reason="torch.compile on CPU needs a C compiler (cc)")


@pytest.mark.slow  # torch.compile (12 s)
@needs_cc
def test_compiled_layers_give_the_eager_loss_and_gradients_with_hooks_firing(tokens, tmp_path):
    batch = a_batch(tokens)
    _, model = lora_model(tokens, tmp_path)
    runs = []
    for compiled in (False, True):
        if compiled:
            assert compile_layers(model) == 4
        loss = training_loss(model, batch)
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    assert runs[0][1].keys() == runs[1][1].keys()
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    for name, grad in runs[0][1].items():
        assert torch.allclose(runs[1][1][name], grad, rtol=1e-4, atol=1e-6), name
    # the hooks still fire around the compiled layers: zero A_i change the loss
    with torch.no_grad():
        for a in model.A:
            a.weight.zero_()
        assert training_loss(model, batch).item() != pytest.approx(runs[0][0], rel=1e-5)


@needs_cc
@pytest.mark.slow
def test_a_compiled_run_logs_the_eager_losses(tokens, tmp_path):
    common = dict(max_steps=3, min_windows=1, max_windows=1, eval_every=0, eval_batches=0)
    train(tiny(tokens, tmp_path / "eager", **common))
    train(tiny(tokens, tmp_path / "compiled", compile=True, **common))
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-5)


# ------------------------------------------------------- gathered model
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_gathered_model_saves_what_the_trained_one_saves(tokens, tmp_path, mode):
    cfg, model = lora_model(tokens, tmp_path, train_decoder=mode)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # what accelerate gathers on rank 0
    plain = gathered_model(state, model)
    assert all(not p.is_meta for p in plain.parameters())
    emb, head = plain.decoder.get_input_embeddings(), plain.decoder.get_output_embeddings()
    assert (emb.weight is head.weight) == (model.decoder.get_input_embeddings().weight
                                           is model.decoder.get_output_embeddings().weight)
    model.save_pretrained(str(tmp_path / "a"), include_backbones=True)
    plain.save_pretrained(str(tmp_path / "b"), include_backbones=True)
    a, b = (RCCModel.from_pretrained(str(tmp_path / x)).state_dict() for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- FSDP
def test_fsdp_wraps_the_backbones_own_layer_class_when_the_config_leaves_it_unset(tokens, tmp_path):
    """The decision rcc train makes before accelerate.prepare, on accelerate's own plugin."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from rcc.train.setup import wrap_by_layer_class

    _, model = lora_model(tokens, tmp_path)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    wrap_by_layer_class(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), model)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    plugin.set_auto_wrap_policy(model)  # what accelerate then does: the class resolves in this model
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {type(model.decoder.model.layers[0])}
    wrong = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                           transformer_cls_names_to_wrap=["GPTNeoXLayer"])
    with pytest.raises(RCCError, match="GPTNeoXLayer.*LlamaDecoderLayer"):
        wrap_by_layer_class(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=wrong)), model)


@pytest.mark.slow  # two processes (22 s)
def test_two_cpu_processes_under_fsdp2_train_and_save_like_one_with_gradient_accumulation(tokens, tmp_path):
    """accelerate 1.15 runs an FSDP config as DDP on a CPU (no FSDP there), so this drives torch's
    fully_shard directly on gloo: every decoder layer of both backbones sharded, two steps, the
    full state gathered and saved on rank 0 without reloading a backbone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tests.train.test_train import _free_port

    cfg = tiny(tokens, tmp_path / "run", train_encoder="lora", train_decoder="lora", lora_r=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(repo / "tests" / "fsdp_worker.py"), str(tmp_path / "cfg.yaml"),
                           str(tmp_path / "fsdp")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same two steps in one process: the two ranks' micro-batches averaged
    from rcc.data import PretrainBatches, TokenFile

    conf = TrainConfig.load(cfg)
    torch.manual_seed(0)
    model = build_model(conf).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    batches = PretrainBatches(TokenFile(tokens), window=16, batch_size=2, min_windows=2, max_windows=2,
                              target_tokens=8, cue_min=2, cue_max=2, reconstruct_fraction=0.5)
    for step in range(2):
        for rank in range(2):
            (model(**batches[step * 2 + rank]).loss / 2).backward()
        opt.step()
        opt.zero_grad()
    from rcc.adapters import merged_state

    saved = RCCModel.from_pretrained(str(tmp_path / "fsdp")).state_dict()
    ref = {f"{side}.{k}": v for side in ("encoder", "decoder") for k, v in merged_state(getattr(model, side)).items()}
    ref.update({k: v for k, v in model.state_dict().items() if k.startswith(("G.", "A."))})
    assert saved.keys() == ref.keys()  # saved with backbones: adapters merged into them
    assert not torch.equal(saved["G.weight"], torch.eye(32))
    worst = max((saved[k] - v).abs().max().item() for k, v in ref.items())
    assert worst < 1e-5, worst
