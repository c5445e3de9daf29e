"""`rcc train`: the fixture's loss through the training path, config handling,
exact resume, what is trained and saved (full, frozen, LoRA), gradient
checkpointing, and a 2-process DDP launch."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rcc import RCCError, RCCModel
from rcc.cli import main
from rcc.train.loop import checkpoints, lr_factor, train, training_loss
from rcc.train.setup import build_model, param_groups
from rcc.train.config import SECTION_OF, TrainConfig
from tests.conftest import tiny_backbone

VOCAB = 64
BACKBONE = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tokens, out, **over):
    """A tiny run's config in the nested form; ``over`` names options by field (placed in their section)."""
    options = dict(backbone=dict(BACKBONE), window=16, ratio=4, train_data=tokens, output_dir=str(out), max_steps=4,
                   min_windows=1, max_windows=2, target_tokens=8, cue_min=2, cue_max=3, reconstruct_fraction=0.5,
                   batch_size=3, lr=3e-3, lr_glue=1e-2, warmup_steps=2, log_every=1, eval_every=2, eval_batches=2,
                   save_every=0, progress=False, resume="never")
    options.update(over)
    cfg: dict = {}
    for key, value in options.items():
        cfg.setdefault(SECTION_OF[key], {})[key] = value
    return cfg


def state_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ fixture
def test_fixture_training_loss_equals_the_original(tmp_path, fixture_dir):
    """train[0] of the reference fixture through `rcc train`'s own path: a
    pre-tokenized fine-tuning record set, one step at lr 0, the logged loss."""
    ref = RCCModel.from_original(str(fixture_dir / "model.safetensors"), base_model=str(fixture_dir / "config.json"),
                                 dtype=torch.float64)
    ref.save_pretrained(str(tmp_path / "ref"))
    case = json.loads((fixture_dir / "cases.json").read_text())["train"][0]
    with open(tmp_path / "train.jsonl", "w") as fh:
        for ids, labels in zip(case["input_ids"], case["labels"]):
            assert all(t == -100 for t in labels[:64])  # the 64 slot positions are never counted
            fh.write(json.dumps({"context_ids": ids[:2048], "input_ids": ids[2048:], "labels": labels[64:]}) + "\n")
    result = train(dict(task="finetune", model=dict(init_from=str(tmp_path / "ref"), dtype="float64"),
                        data=dict(train_data=str(tmp_path / "train.jsonl"), max_decoder_tokens=256),
                        optim=dict(lr=0.0, max_steps=1, batch_size=2, warmup_steps=0),
                        run=dict(log_every=1, eval_every=0, save_every=0, output_dir=str(tmp_path / "run"),
                                 progress=False)))
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    print(f"fixture loss: recorded {case['loss']!r}, rcc train {logged['loss']!r}")
    assert abs(logged["loss"] - case["loss"]) < 1e-9
    # and the function the loop calls, on the batch the loop saw
    batch = {"context_ids": torch.tensor(case["input_ids"])[:, :2048], "input_ids": torch.tensor(case["input_ids"])[:, 2048:],
             "labels": torch.tensor(case["labels"])[:, 64:]}
    assert abs(training_loss(result.model, batch).item() - case["loss"]) < 1e-9


# ------------------------------------------------------------------- config
def test_config_file_overrides_and_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: {model_type: llama, hidden_size: 64}\ndata:\n  train_data: d\n"
                    "run:\n  output_dir: o\noptim:\n  max_steps: 10\n  lr: 1e-4\n")
    cfg = TrainConfig.load(path, ["model.backbone.hidden_size=32", "optim.lr_glue=1e-3",
                                  "model.lora_target_modules=[q_proj, v_proj]"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-4 as text
    assert cfg.model.backbone == {"model_type": "llama", "hidden_size": 32} and cfg.optim.lr_glue == 1e-3
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RCCError, match="unknown training option 'learning_rate'"):
        TrainConfig.load(path, ["learning_rate=1"])
    with pytest.raises(RCCError, match="did you mean 'optim.max_steps'"):
        TrainConfig.load(path, ["optim.max_step=1"])
    with pytest.raises(RCCError, match="train_encoder must be one of full, frozen, lora"):
        TrainConfig.load(path, ["model.train_encoder=partly"])
    with pytest.raises(RCCError, match="batch_size must be int"):
        TrainConfig.load(path, ["optim.batch_size=two"])
    with pytest.raises(RCCError, match="pretrain needs optim.max_steps"):
        TrainConfig.load(path, ["optim.max_steps=null"])
    with pytest.raises(RCCError, match="does not fit in a context"):
        TrainConfig.load(path, ["data.target_tokens=4096"])
    with pytest.raises(RCCError, match="grad_windows must not be negative"):
        TrainConfig.load(path, ["data.grad_windows=-1"])


def test_print_config_and_a_missing_file_from_the_cli(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: {backbone: embedded:smollm2}\ndata: {train_data: d}\nrun: {output_dir: o}\n"
                    "optim: {max_steps: 10}\n")
    assert main(["train", "--print-config", str(path), "model.ratio=16"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["ratio"] == 16
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such config file" in capsys.readouterr().err


def test_warmup_then_cosine():
    f = [lr_factor(s, 10, 110, 0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # the first step already learns
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)


def test_eval_at_start_logs_the_starting_models_held_out_loss(tokens, tmp_path):
    """run.eval_at_start: a step-0 evaluation of the model before any update; at lr 0
    nothing changes, so the final evaluation repeats it, while a trained run's differs."""
    def evals(run, **over):
        train(tiny(tokens, tmp_path / run, max_steps=2, eval_every=0, eval_at_start=True, **over))
        logged = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        return [(e["step"], e["eval_loss"]) for e in logged if "eval_loss" in e]

    frozen = evals("lr0", lr=0.0, lr_glue=0.0)
    assert [s for s, _ in frozen] == [0, 2] and frozen[0][1] == pytest.approx(frozen[1][1], abs=1e-6)
    trained = evals("lr", lr=3e-2, lr_glue=3e-2)
    assert trained[0] == frozen[0] and abs(trained[1][1] - trained[0][1]) > 1e-4


def test_param_groups_give_g_and_a_their_own_learning_rate(tokens, tmp_path):
    cfg = TrainConfig.load(tiny(tokens, tmp_path, train_encoder="frozen", weight_decay=0.1, pooling="mean"))
    model = build_model(cfg)
    assert model.config.pooling == "mean" and model.config.ratio == 4
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"decoder", "decoder/no_decay", "glue"}  # frozen encoder: no group
    assert groups["glue"]["lr"] == 1e-2 and groups["decoder"]["lr"] == 3e-3
    assert groups["decoder/no_decay"]["weight_decay"] == 0.0 and groups["decoder"]["weight_decay"] == 0.1
    glue = {id(p) for p in [model.G.weight, *(a.weight for a in model.A)]}
    assert {id(p) for p in groups["glue"]["params"]} == glue


# ------------------------------------------------------------------- resume
@pytest.mark.parametrize("encoder, decoder, grad_windows", [("full", "full", 0), ("frozen", "lora", 0),
                                                              ("lora", "lora", 1)])
def test_kill_and_resume_reaches_the_same_parameters(tokens, tmp_path, encoder, decoder, grad_windows):
    backbone = dict(BACKBONE, attention_dropout=0.1)  # dropout: the RNG state must be restored too
    # grad_windows draws its windows from the RNG as well
    common = dict(max_steps=6, save_every=3, grad_accum=2, backbone=backbone, resume="auto", train_encoder=encoder,
                  train_decoder=decoder, grad_windows=grad_windows)
    straight = train(tiny(tokens, tmp_path / "a", **common))

    class Killed(Exception):
        pass

    def kill_after_step_4(step, _metrics):
        if step == 4:  # the last checkpoint is step 3; step 4's update is lost
            raise Killed

    with pytest.raises(Killed):
        train(tiny(tokens, tmp_path / "b", **common), on_step=kill_after_step_4)
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-00000003"]
    with safe_open(str(checkpoints(tmp_path / "b")[0] / "model.safetensors"), "pt") as fh:
        stored = set(fh.keys())
    trained = {n for n, p in straight.model.named_parameters() if p.requires_grad}
    assert stored == trained  # a checkpoint holds what is trained, not frozen weights
    resumed = train(tiny(tokens, tmp_path / "b", **common))
    a, b = state_of(straight.model), state_of(resumed.model)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    assert not torch.equal(a["G.weight"], torch.eye(32))  # it did train
    if decoder == "lora":
        assert any("lora_B" in k and a[k].abs().max() > 0 for k in a)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
               if "loss" in r} for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 6  # b's step 4 was logged twice: before the kill and after
    with pytest.raises(RCCError, match="already holds checkpoints"):
        train(tiny(tokens, tmp_path / "b", **dict(common, resume="never")))


def test_a_spent_time_budget_stops_saves_and_resumes_exactly(tokens, tmp_path):
    common = dict(max_steps=4, save_every=0, resume="auto")
    straight = train(tiny(tokens, tmp_path / "a", **common))
    cut = train(tiny(tokens, tmp_path / "b", max_minutes=1e-9, **common))  # spent after the first step
    assert cut.step == 1 and (tmp_path / "b" / "final" / "rcc_config.json").is_file()
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-00000001"]
    resumed = train(tiny(tokens, tmp_path / "b", **common))
    assert resumed.step == 4
    a, b = state_of(straight.model), state_of(resumed.model)
    assert not [k for k in a if not torch.equal(a[k], b[k])]


# ------------------------------------------------------------ what trains
def test_full_training_saves_backbones_and_the_curriculum_freezes_the_encoder(tokens, tmp_path):
    stage1 = train(tiny(tokens, tmp_path / "s1", max_windows=1))
    loaded = RCCModel.from_pretrained(str(stage1.final_dir))
    assert loaded.config.trained and loaded.config.encoder_source is None
    trained = state_of(stage1.model)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    # stage 2: longer contexts, frozen encoder, starting from stage 1
    stage2 = train(tiny(tokens, tmp_path / "s2", backbone=None, init_from=str(stage1.final_dir), window=None,
                        ratio=None, min_windows=2, max_windows=2, train_encoder="frozen"))
    after = state_of(stage2.model)
    enc = [k for k in after if k.startswith("encoder.")]
    assert all(torch.equal(after[k], trained[k]) for k in enc)
    assert not torch.equal(after["decoder.model.layers.0.mlp.up_proj.weight"],
                           trained["decoder.model.layers.0.mlp.up_proj.weight"])
    # a later stage may change the ratio (no parameter depends on it) but not the window
    stage3 = train(tiny(tokens, tmp_path / "s3", backbone=None, init_from=str(stage1.final_dir), window=None, ratio=2,
                        max_steps=1))
    assert stage3.model.config.ratio == 2 and RCCModel.from_pretrained(str(stage3.final_dir)).config.ratio == 2
    with pytest.raises(RCCError, match="has window=16 but the config asks for 32"):
        train(tiny(tokens, tmp_path / "s4", backbone=None, init_from=str(stage1.final_dir), window=32))
    with pytest.raises(RCCError, match="not divisible by ratio"):
        train(tiny(tokens, tmp_path / "s5", backbone=None, init_from=str(stage1.final_dir), window=None, ratio=5))


def test_lora_run_saves_only_adapters_and_maps_and_reloads(tokens, tmp_path):
    base = tiny_backbone("llama", vocab=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2)
    base.save_pretrained(str(tmp_path / "base"))
    result = train(tiny(tokens, tmp_path / "run", backbone=str(tmp_path / "base"), train_encoder="frozen",
                        train_decoder="lora", lora_r=4, lora_target_modules=["q_proj", "v_proj", "down_proj"],
                        lr=1e-2))
    with safe_open(str(result.final_dir / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
    assert meta["backbones"] == "False" and json.loads(meta["adapters"])["decoder"]["r"] == 4
    assert all(k.startswith(("G.", "A.")) or (k.startswith("decoder.") and ".lora_" in k) for k in keys), keys
    assert any(".lora_B." in k for k in keys)
    size = (result.final_dir / "model.safetensors").stat().st_size
    assert size < 0.3 * (tmp_path / "base" / "model.safetensors").stat().st_size
    # LoRA B starts at zero: it moved, and the base weights did not
    lora_b = result.model.decoder.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().max() > 0
    base_w = base.state_dict()
    assert torch.equal(result.model.decoder.model.layers[0].mlp.up_proj.weight, base_w["model.layers.0.mlp.up_proj.weight"])
    # reload from the small checkpoint: same function
    loaded = RCCModel.from_pretrained(str(result.final_dir))
    batch = {"context_ids": torch.randint(1, VOCAB, (2, 32)), "input_ids": torch.randint(1, VOCAB, (2, 8))}
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(**batch).logits, loaded(**batch).logits, atol=1e-6)
    # saving with backbones merges the adapters into plain weights
    result.model.save_pretrained(str(tmp_path / "merged"), include_backbones=True)
    merged = RCCModel.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, loaded(**batch).logits, atol=1e-5)


def test_finetune_on_qa_text_records_in_both_modes(tmp_path):
    from rcc.data import FinetuneBatches, load_examples, split_examples
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    rng = np.random.default_rng(0)
    words = "the keeper lit the lamp at dusk and the ships saw it far out at sea".split()
    records = [{"input": " ".join(rng.choice(words, int(rng.integers(5, 40)))), "prompt": "Who lit the lamp?",
                "answer": "the keeper"} for _ in range(12)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = dict(task="finetune",
               model=dict(backbone=dict(BACKBONE, vocab_size=len(tok)), tokenizer=str(tmp_path / "tok"), window=32,
                          ratio=4),
               data=dict(train_data=str(tmp_path / "qa.jsonl"), eval_fraction=0.25, instruction_mode="mixed",
                         max_windows=8),
               optim=dict(batch_size=2, epochs=1, lr=1e-3, warmup_steps=1),
               run=dict(log_every=1, eval_every=0, save_every=0, output_dir=str(tmp_path / "run"), progress=False))
    result = train(cfg)
    examples, report = load_examples(str(tmp_path / "qa.jsonl"), tok, mode="mixed", window=32, max_windows=8,
                                     max_decoder_tokens=1024, answer_suffix="<|im_end|>", progress=False)
    assert report.kept == 12
    modes = {int((e.labels == -100).sum()) for e in examples}  # prompt lengths: header only, or header + question
    assert len(modes) == 2
    kept, held = split_examples(examples, 0.25, seed=0)
    assert len(held) == 3 and result.step == len(FinetuneBatches(kept, window=32, batch_size=2))  # one epoch
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(logged[-1]["eval_loss"]) and logged[-1]["eval_tokens"] > 0
    mixed = RCCModel.from_pretrained(str(result.final_dir))
    assert mixed.tokenizer.get_vocab() == tok.get_vocab() and mixed.config.instruction_mode is None  # both modes: no default of its own
    # a manual-only stage makes manual the model's own mode: ask() without a mode uses it
    manual = train(dict(cfg, model=dict(init_from=str(result.final_dir)),
                        data=dict(cfg["data"], instruction_mode="manual"),
                        optim=dict(cfg["optim"], epochs=None, max_steps=1),
                        run=dict(cfg["run"], output_dir=str(tmp_path / "run2"))))
    loaded = RCCModel.from_pretrained(str(manual.final_dir))
    assert loaded.config.instruction_mode == "manual"
    context = " ".join(words)
    plain = loaded.ask(context, "Who lit the lamp?", max_new_tokens=4)
    assert plain.reconstructed_question is None
    assert plain.token_ids == loaded.ask(context, "Who lit the lamp?", mode="manual", max_new_tokens=4).token_ids


def test_gradient_checkpointing_gives_the_same_gradients(tokens, tmp_path):
    from rcc.data import PretrainBatches, TokenFile

    grads = []
    for checkpointing in (False, True):
        cfg = TrainConfig.load(tiny(tokens, tmp_path, gradient_checkpointing=checkpointing))
        model = build_model(cfg).train()
        with torch.no_grad():  # A_i start at zero (no gradient reaches the encoder layers); make them non-zero
            for i, a in enumerate(model.A):
                a.weight.copy_(torch.randn(a.weight.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        batch = PretrainBatches(TokenFile(tokens), window=16, batch_size=2, min_windows=2, max_windows=2,
                                target_tokens=8, cue_min=2, cue_max=2, reconstruct_fraction=0.5)[0]
        training_loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.decoder.model.gradient_checkpointing and grads[0].keys() == grads[1].keys()
    assert grads[0]["A.1.weight"].abs().max() > 0 and grads[0]["encoder.model.layers.0.mlp.up_proj.weight"].abs().max() > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


# --------------------------------------------------------------- multi-process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes
def test_accelerate_launch_two_cpu_processes_equals_gradient_accumulation(tokens, tmp_path):
    """DDP on gloo: 2 processes x 1 micro-batch average their gradients, which is
    what 1 process with grad_accum=2 computes on the same global batches."""
    import yaml

    cfg = tiny(tokens, tmp_path / "ddp", max_steps=3, eval_every=3)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    # --multi_gpu starts the processes with torchrun; without a GPU they run DDP on gloo
    # (`accelerate launch --cpu` would start a single process)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "--main_process_port", str(_free_port()), "-m", "rcc.cli", "train", str(tmp_path / "ddp.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((checkpoints(tmp_path / "ddp")[-1] / "trainer_state.json").read_text())
    assert state["world"] == 2 and state["step"] == 3 and state["micro_step"] == 3
    assert proc.stderr.count("model saved to") == 1  # only the main process saves and reports
    ddp = RCCModel.from_pretrained(str(tmp_path / "ddp" / "final"))
    single = train(tiny(tokens, tmp_path / "one", max_steps=3, eval_every=3, grad_accum=2))
    ref = single.model.state_dict()
    worst = max((ddp.state_dict()[k] - v).abs().max().item() for k, v in ref.items())
    assert worst < 1e-5, worst
    logged = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(logged[-1]["eval_loss"])
