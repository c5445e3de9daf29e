"""Training checkpoints load nothing by pickle (rcc/train/state.py), and a
checkpoint naming an unknown architecture stops with one line.

The reliability audit (issue 12, defects 1 and 7): a pickle planted in
``checkpoints/step-*/`` ran ``os.system`` on ``rcc train`` (accelerate's
``load_state``); an unknown ``model_type`` gave a ValueError traceback."""

import ast
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rcc import RCCError, RCCModel
from rcc.cli import main
from rcc.train.loop import checkpoints, train
from rcc.train.config import SECTION_OF
from rcc.train.state import MANIFEST

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64
BACKBONE = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# the files accelerate's save_state wrote and its load_state unpickled
ACCELERATE_PICKLES = ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "scheduler.bin")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tokens, out, **over):
    """A tiny run's config in the nested form; ``over`` names options by field (placed in their section)."""
    options = dict(backbone=dict(BACKBONE, attention_dropout=0.1), window=16, ratio=4, train_data=tokens,
                   output_dir=str(out), max_steps=3, min_windows=1, max_windows=2, target_tokens=8, cue_min=2,
                   cue_max=3, reconstruct_fraction=0.5, batch_size=3, lr=3e-3, lr_glue=1e-2, warmup_steps=1,
                   log_every=1, eval_every=0, eval_batches=0, save_every=1, progress=False, resume="auto")
    options.update(over)
    cfg: dict = {}
    for key, value in options.items():
        cfg.setdefault(SECTION_OF[key], {})[key] = value
    return cfg


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(folder: Path, marker: Path) -> None:
    """Write accelerate's pickle file names into ``folder``, each one live."""
    data = pickle.dumps(_Payload(marker))
    for name in ACCELERATE_PICKLES:
        (folder / name).write_bytes(data)


def test_the_planted_pickle_is_live(tmp_path):
    """The payload the next tests plant does run when unpickled (else they prove nothing)."""
    marker = tmp_path / "ran"
    plant(tmp_path, marker)
    pickle.loads((tmp_path / "optimizer.bin").read_bytes())
    assert marker.exists()


def test_resume_ignores_pickles_planted_in_a_checkpoint(tokens, tmp_path):
    common = dict(max_steps=3)
    straight = train(tiny(tokens, tmp_path / "a", **common))
    train(tiny(tokens, tmp_path / "b", max_steps=3, max_minutes=1e-9))  # stops after step 1, with a checkpoint
    newest = checkpoints(tmp_path / "b")[-1]
    assert newest.name == "step-00000001" and (newest / MANIFEST).is_file()
    marker = tmp_path / "ran"
    plant(newest, marker)
    resumed = train(tiny(tokens, tmp_path / "b", **common))
    assert not marker.exists()
    assert resumed.step == 3
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert not [k for k in a if not torch.equal(a[k], b[k])]  # and it resumed exactly


def test_an_accelerate_pickle_checkpoint_is_refused_unopened(tokens, tmp_path, capsys):
    """A checkpoint of the old layout (accelerate's pickles, no manifest): one
    line, non-zero exit, nothing unpickled."""
    train(tiny(tokens, tmp_path / "run", max_steps=1))
    old = checkpoints(tmp_path / "run")[-1]
    for f in old.iterdir():  # keep what the old layout also had: weights and the data position
        if f.name not in ("model.safetensors", "trainer_state.json", "train_config.json"):
            f.unlink()
    marker = tmp_path / "ran"
    plant(old, marker)
    with pytest.raises(RCCError, match="pickle files .* older rcc train"):
        train(tiny(tokens, tmp_path / "run", max_steps=2))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny(tokens, tmp_path / "run", max_steps=2)))
    assert main(["train", str(tmp_path / "run.yaml")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickle" in err[0] and "Traceback" not in err[0], err
    assert not marker.exists()


def test_a_checkpoint_of_another_model_or_corrupt_files_stop_with_one_line(tokens, tmp_path):
    train(tiny(tokens, tmp_path / "run", max_steps=1))
    ckpt = checkpoints(tmp_path / "run")[-1]
    (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(RCCError, match="optimizer.safetensors: cannot read"):
        train(tiny(tokens, tmp_path / "run", max_steps=2))
    shutil.rmtree(tmp_path / "run")
    train(tiny(tokens, tmp_path / "run", max_steps=1, train_decoder="frozen"))
    with pytest.raises(RCCError, match="lacks .* of the parameters this config trains"):
        train(tiny(tokens, tmp_path / "run", max_steps=2))
    shutil.rmtree(tmp_path / "run")
    train(tiny(tokens, tmp_path / "run", max_steps=1))
    with pytest.raises(RCCError, match="optimiser state does not fit this run's optimiser") as err:
        train(tiny(tokens, tmp_path / "run", max_steps=2, train_encoder="frozen"))
    assert "\n" not in str(err.value)


def test_no_module_unpickles():
    """What `grep -rn "load_state\\|pickle\\|torch.load" rcc/` looks for, on the
    syntax tree: no pickle-family import, no accelerate save_state/load_state, no
    torch.load without weights_only=True, no numpy allow_pickle=True."""
    unsafe = []
    for path in sorted((REPO / "rcc").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.append(node.module)
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")
                       for n in names):
                    unsafe.append(f"{where} imports {names}")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            attr, kwargs = node.func.attr, {k.arg: k.value for k in node.keywords}
            if attr in ("load_state", "save_state", "load_checkpoint", "load_checkpoint_in_model"):
                unsafe.append(f"{where} calls {attr}")
            if attr == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                w = kwargs.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    unsafe.append(f"{where} calls torch.load without weights_only=True")
            if isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value is True:
                unsafe.append(f"{where} passes allow_pickle=True")
    assert not unsafe, unsafe


# ------------------------------------------------------------- model_type
@pytest.mark.slow  # an `rcc` process
def test_an_unknown_model_type_is_one_line_in_the_api_and_the_cli(tmp_path, capsys):
    from tests.conftest import tiny_rcc

    tiny_rcc().save_pretrained(str(tmp_path / "m"), include_backbones=True)
    cfg = json.loads((tmp_path / "m" / "rcc_config.json").read_text())
    cfg["encoder_config"]["model_type"] = "llama-from-the-future"
    (tmp_path / "m" / "rcc_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RCCError, match="unknown model_type 'llama-from-the-future'.*upgrade transformers") as err:
        RCCModel.from_pretrained(str(tmp_path / "m"))
    assert "\n" not in str(err.value) and "encoder_config" in str(err.value)
    (tmp_path / "c.txt").write_text("The keeper lit the lamp at dusk.")
    assert main(["ask", "--model", str(tmp_path / "m"), "--context", str(tmp_path / "c.txt"), "-q", "Who?"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown model_type 'llama-from-the-future'" in lines[0], lines
    # the CLI as a user runs it: non-zero exit, no traceback
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "rcc.cli", "ask", "--model", str(tmp_path / "m"), "--context",
                           str(tmp_path / "c.txt"), "-q", "Who?"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "unknown model_type 'llama-from-the-future'" in proc.stderr.strip().splitlines()[-1]


def test_an_unknown_or_invalid_inline_backbone_is_one_line(tokens, tmp_path):
    with pytest.raises(RCCError, match="inline backbone config: unknown model_type 'lama'") as err:
        train(tiny(tokens, tmp_path / "a", backbone=dict(BACKBONE, model_type="lama")))
    assert "\n" not in str(err.value)
    with pytest.raises(RCCError, match="cannot build a llama causal LM from this config .*not a multiple") as err:
        train(tiny(tokens, tmp_path / "b", backbone=dict(BACKBONE, hidden_size=30)))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------- multi-process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "--main_process_port", str(_free_port()), "-m", "rcc.cli", "train", str(config)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_ddp_run_stopped_and_resumed_equals_the_uninterrupted_run(tokens, tmp_path):
    """2 processes on gloo, with dropout: a run stopped after step 1 (time
    budget) and resumed to step 3 ends where the uninterrupted run ends. Each
    process writes its RNG file (set_seed gives both the same stream here, so
    this test cannot tell the files apart; the FSDP test below can)."""
    configs = {"straight": tiny(tokens, tmp_path / "a"), "cut": tiny(tokens, tmp_path / "b", max_minutes=1e-9),
               "rest": tiny(tokens, tmp_path / "b")}
    for name, cfg in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        proc = _launch(tmp_path / f"{name}.yaml")
        assert proc.returncode == 0, proc.stderr[-3000:]
        if name == "cut":
            ckpt = checkpoints(tmp_path / "b")[-1]
            assert ckpt.name == "step-00000001"
            assert {p.name for p in ckpt.glob("rng-*")} == {"rng-0.safetensors", "rng-1.safetensors"}
            assert not [p for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin", ".pt")]
    assert json.loads((checkpoints(tmp_path / "b")[-1] / "trainer_state.json").read_text())["step"] == 3
    a = RCCModel.from_pretrained(str(tmp_path / "a" / "final")).state_dict()
    b = RCCModel.from_pretrained(str(tmp_path / "b" / "final")).state_dict()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert not torch.equal(a["G.weight"], torch.eye(32))  # it did train


@pytest.mark.slow
def test_fsdp2_state_round_trip_resumes_exactly(tmp_path):
    """The FSDP path (full state dicts gathered and set with
    torch.distributed.checkpoint.state_dict) on 2 gloo processes and FSDP2,
    with dropout seeded per process: stopped after 2 steps and resumed to 4
    equals 4 steps straight."""
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    for phase in ("straight", "cut", "resume"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(REPO / "tests" / "fsdp_state_worker.py"), str(tmp_path), phase]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    assert {p.name for p in ckpt.glob("rng-*")} == {"rng-0.safetensors", "rng-1.safetensors"}
    assert set(load_file(str(ckpt / "model.safetensors"))) == {"2.weight", "2.bias", "4.weight", "4.bias"}  # no frozen
    a, b = load_file(str(tmp_path / "straight.safetensors")), load_file(str(tmp_path / "resume.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
