"""The GPU kit (recipes/smollm2-135m/gpu.sh): sizes from the live tree, the plan's
limits, pieces that stash in any order, weights that come back after a kill, one
fresh run per config. The CPU rehearsal of the whole plan is `gpu.sh rehearse`
(minutes); these tests are its fast part, so the kit cannot rot silently."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from rcc import RCCModel
from rcc.train.loop import checkpoints, train
from tests.conftest import REPO
from tests.train.test_train import tiny

KIT = REPO / "recipes" / "smollm2-135m"
sys.path.insert(0, str(KIT))
pl = importlib.import_module("payload")
gpukit = importlib.import_module("gpukit")
shards = importlib.import_module("shards")
gpu_train = importlib.import_module("gpu_train")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ sizes
def test_the_tree_and_the_largest_committed_piece_fit_one_call():
    """Fails when the tree grew past the margin the last pack left: run `gpu.sh pack` and commit
    recipes/smollm2-135m/gpu-payload.json."""
    manifest = json.loads(gpukit.COMMITTED.read_text())
    tree = pl.tree_bytes(REPO)
    largest = max(p["bytes"] for p in manifest["pieces"])
    man = len(json.dumps(manifest, indent=1)) + 100
    print(f"tree {tree} + largest piece {largest} + manifest {man} = {tree + largest + man} of {pl.CALL_LIMIT}")
    assert tree + largest + man <= pl.CALL_LIMIT, (
        f"a call would send {tree + largest + man - pl.CALL_LIMIT} bytes over 64 MiB: run gpu.sh pack and commit "
        f"{gpukit.COMMITTED.name}")


def test_the_plan_from_the_live_tree_keeps_every_limit():
    manifest = json.loads(gpukit.COMMITTED.read_text())
    plan = gpukit.make_plan(manifest, pl.tree_bytes(REPO))
    print(gpukit.format_plan(plan))
    assert plan.ok, gpukit.format_plan(plan)
    calls = plan.calls
    assert len(calls) - 1 <= gpukit.BEFORE_TRAIN
    assert calls[0].role == "bench" and " bench" in calls[0].command  # useful work while the first piece lands
    assert calls[-1].role == "train" and calls[-1].carry[-1] == f".gpu/{manifest['pieces'][-1]['name']}"
    carried = [c.carry[-1] for c in calls]
    assert carried == [f".gpu/{p['name']}" for p in manifest["pieces"]]  # every piece once, in order
    for c in calls:
        assert c.bytes <= pl.CALL_LIMIT and len(c.command) <= gpukit.COMMAND_CHARS and len(c.carry) <= 8
        assert ".gpu/manifest.json" in c.carry
    assert gpukit.budget(calls) <= gpukit.BUDGET_S


def test_a_plan_that_breaks_a_limit_is_refused():
    manifest = json.loads(gpukit.COMMITTED.read_text())
    tree = pl.tree_bytes(REPO)
    grown = gpukit.make_plan(manifest, tree + 2 * pl.MIB)  # 2 MiB more tracked: the margin is 1 MiB
    assert not grown.ok and all("over the" in c.problems[0] for c in grown.calls if c.carry[-1] != ".gpu/manifest.json")
    many = dict(manifest, pieces=[dict(manifest["pieces"][0], name=f"payload.{i:02d}") for i in range(8)])
    assert any("calls before training" in p for p in gpukit.make_plan(many, tree).problems)
    long = gpukit.make_plan(manifest, tree, overrides=["x=" + "y" * 2000])
    assert any("characters" in p for p in long.calls[-1].problems)
    out = subprocess.run([sys.executable, str(KIT / "gpukit.py"), "plan", "--committed", "--train-s", "900"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "timeout_s 900" in out.stdout and "plan: NOT OK" in out.stdout


# ----------------------------------------------------------------- pieces
@pytest.fixture
def packed(tmp_path):
    """A payload of two members cut into 4 pieces."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(120_000))
    (src / "d" / "b.txt").write_text("b\n")
    members = {"x/a.bin": src / "a.bin", "d": src / "d"}
    pl.compress(members, tmp_path / "blob.xz", {"payload.json": "{}"})
    folder = tmp_path / "gpu"
    folder.mkdir()
    pl.cut(tmp_path / "blob.xz", folder, 32_000, "digest", {}, 0, 0)
    return folder, members


def test_pieces_stash_in_any_order_and_the_payload_unpacks(packed, tmp_path):
    folder, members = packed
    names = [p["name"] for p in pl.read_manifest(folder)["pieces"]]
    assert len(names) == 4
    stash = tmp_path / "machine" / "rcc-gpu"
    line = pl.stash(folder / names[2], folder / pl.MANIFEST, stash)
    assert f"1 of 4 present, missing {names[0]} {names[1]} {names[3]}" in line
    assert "not the machine of the earlier calls" in line  # pieces before it are gone: a new machine
    with pytest.raises(pl.PayloadError, match=f"1 of 4 present, missing {names[0]} {names[1]} {names[3]}"):
        pl.assemble(stash)
    for name in (names[0], names[3], names[1]):
        line = pl.stash(folder / name, folder / pl.MANIFEST, stash)
    assert line.endswith("4 of 4 present, complete")
    out = pl.assemble(stash)
    assert (out / "x" / "a.bin").read_bytes() == members["x/a.bin"].read_bytes()
    assert (out / "d" / "b.txt").read_text() == "b\n" and (out / "payload.json").read_text() == "{}"
    assert pl.assemble(stash) == out  # once


def test_a_damaged_piece_is_refused_and_another_payload_replaces_the_stash(packed, tmp_path):
    folder, _ = packed
    stash = tmp_path / "rcc-gpu"
    pl.stash(folder / "payload.00", folder / pl.MANIFEST, stash)
    damaged = bytearray((folder / "payload.01").read_bytes())
    damaged[100] ^= 1
    (folder / "payload.01").write_bytes(bytes(damaged))
    with pytest.raises(pl.PayloadError, match="payload.01 is damaged"):
        pl.stash(folder / "payload.01", folder / pl.MANIFEST, stash)
    other = json.loads((folder / pl.MANIFEST).read_text())
    other["payload_sha256"] = "0" * 64
    (folder / pl.MANIFEST).write_text(json.dumps(other))
    line = pl.stash(folder / "payload.00", folder / pl.MANIFEST, stash)
    assert "another payload's pieces: dropped" in line and "1 of 4 present" in line


def test_the_same_members_pack_to_the_same_bytes(packed, tmp_path):
    _, members = packed
    pl.compress(members, tmp_path / "again.xz", {"payload.json": "{}"})
    assert (tmp_path / "again.xz").read_bytes() == (tmp_path / "blob.xz").read_bytes()


def test_what_would_not_come_back_is_named(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "bad name.txt").write_text("x")
    for i in range(8):
        (out / f"f{i}").write_text("x")
    problems = gpukit.check_out(out)
    assert any("10 files" in p for p in problems) and any("deep.txt: more than 2" in p for p in problems)
    assert any("bad name.txt" in p for p in problems)


# ----------------------------------------------------------------- shards
def test_shards_refuse_a_torn_set_and_join_rebuilds_the_model(tokens, tmp_path):
    run = tmp_path / "run"
    result = train(tiny(tokens, run, max_steps=3, save_every=1, keep_checkpoints=3, eval_batches=0))
    ckpts = checkpoints(run)
    out = tmp_path / "out"
    files = shards.export(ckpts[1], out, max_mib=0.01)  # many small files: step 2
    assert len(files) > 2 and shards.newest(out)[0] == 2
    shards.export(ckpts[2], out, max_mib=0.01)
    newer = files[1].read_bytes()
    shards.export(ckpts[1], out, max_mib=0.01)
    files[1].write_bytes(newer)  # a kill between two renames: files of steps 2 and 3
    assert shards.newest(out) is None
    files[1].write_bytes(newer[:100])  # a damaged file
    assert shards.newest(out) is None
    (out / "ckpt-00-of-99.safetensors.part").write_bytes(b"partial")  # a kill mid-write leaves this beside
    shards.export(ckpts[2], out)  # step 3 in one file: the smaller set replaces the larger
    assert [p.name for p in out.glob("ckpt-*-of-*.safetensors")] == ["ckpt-00-of-01.safetensors"]
    dest = shards.join(out, tmp_path / "final")
    model = RCCModel.from_pretrained(str(dest))
    with safe_open(str(ckpts[2] / "model.safetensors"), "pt") as fh:
        trained = {k: fh.get_tensor(k) for k in fh.keys()}
    state = dict(model.named_parameters())
    for name, value in trained.items():  # the checkpoint's weights, through bf16
        assert torch.equal(state[name].detach(), value.to(torch.bfloat16).float()), name
    reference = result.model.state_dict()  # and the frozen weights the run had
    frozen = [k for k, v in model.state_dict().items() if k in reference and k not in trained]
    assert frozen and all(torch.equal(model.state_dict()[k], reference[k]) for k in frozen)


# ----------------------------------------------------------------- driver
def _kit_env(monkeypatch, tmp_path, call_s=120):
    monkeypatch.setenv("CALL_START", str(time.time()))
    monkeypatch.setenv("CALL_S", str(call_s))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("STASH", str(tmp_path / "stash"))


def _config(tokens, tmp_path, name, **over):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tiny(tokens, "ignored", eval_batches=0, **over)))
    return str(path)


def test_each_train_call_runs_its_config_fresh_and_returns_its_last_step(tokens, tmp_path, monkeypatch):
    _kit_env(monkeypatch, tmp_path)
    first = _config(tokens, tmp_path, "first", max_steps=3)
    for _ in range(2):  # the same config twice: the second run trains from its own start, not resumed
        assert gpu_train.main([first]) == 0
        status = json.loads((tmp_path / "out" / "status.json").read_text())
        log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
        assert status["done"] and status["step"] == 3 and status["exported_step"] == 3
        assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert status["stop_at"] == pytest.approx(float(os.environ["CALL_START"]) + 120 - gpu_train.TAIL_S)
    assert shards.newest(tmp_path / "out")[0] == 3
    second = _config(tokens, tmp_path, "second", max_steps=2)
    assert gpu_train.main([second, "optim.lr=1e-3"]) == 0
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["run_dir"].endswith("runs/second") and status["step"] == 2
    assert (tmp_path / "stash" / "runs" / "first").is_dir()  # each config its own folder


@pytest.mark.slow
def test_a_terminated_train_still_returns_its_last_checkpoint(tokens, tmp_path):
    config = _config(tokens, tmp_path, "long", max_steps=100_000)
    env = {**os.environ, "CALL_START": str(time.time()), "CALL_S": "600", "OUT": str(tmp_path / "out"),
           "STASH": str(tmp_path / "stash"), "SAVE_MINUTES": "0.002", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(KIT / "gpu_train.py"), config], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    status = tmp_path / "out" / "status.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (status.is_file() and json.loads(status.read_text()).get("exported_step")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what `timeout` sends first
    output = proc.communicate(timeout=60)[0]
    final = json.loads(status.read_text())
    print(output[-2000:])
    assert proc.returncode != 0 and "SystemExit: 143" in final["error"]
    step, files, _ = shards.newest(tmp_path / "out")
    assert step == final["exported_step"] >= 1 and len(list((tmp_path / "out").iterdir())) <= 8
