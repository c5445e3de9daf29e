"""`rcc train` against a deadline (run.stop_at, run.fit_schedule, run.save_minutes),
examples tokenized once (rcc.data.save_examples), and the training bench's table
beside its JSON: what the GPU kit (recipes/smollm2-135m/gpu.sh) relies on."""

import json
import time

import numpy as np
import pytest

from rcc import RCCError
from rcc.bench.train import GPU_PEAK_TFLOPS
from rcc.cli import main
from rcc.data import FinetuneExample, load_examples, save_examples
from rcc.train.loop import Budget, checkpoints, train
from rcc.train.config import TrainConfig
from tests.train.test_train import BACKBONE, VOCAB, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _logged(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _budget(**run):
    return Budget(TrainConfig.load(tiny("t", "o", **run)).run)


def test_the_budget_stops_while_a_step_and_a_save_still_fit():
    b = _budget(stop_at=time.time() + 10.0)
    b.steps, b.save_s = [1.0, 1.0], 2.0
    assert not b.over()  # 1 s step + 4 s for a checkpoint and final < 10 s
    b.steps.append(7.0)  # a slow step: 7 + 4 > 10
    assert b.over()
    b = _budget(stop_at=time.time() + 10.0)
    b.steps = [0.1]
    assert b.save_guess == 1.0 and not b.over()  # nothing trained, nothing measured: 1 s a save
    assert _budget(max_minutes=1e-9).over()  # spent once past it, whatever the steps


def test_the_budget_fits_the_steps_the_time_buys():
    b = _budget(stop_at=time.time() + 100.0, max_steps=100_000)
    b.steps, b.save_s, b.eval_s = [9.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2.0, 1.0  # step 1 (warm-up) is not counted
    assert b.fit(6, 100_000) in (6 + 90, 6 + 89)  # 0.95 x (100 - 4 - 1) s at 1 s a step
    assert b.fit(6, 50) == 50  # never more than the config's max_steps
    b = _budget(stop_at=time.time() + 1.0)
    b.steps = [1.0] * 6
    assert b.fit(6, 100) == 7  # no time left: one more step
    b = _budget(max_minutes=100 / 60)
    b.steps, b.save_s = [1.0] * 6, 20.0
    assert b.fit(6, 100_000) in (6 + 95, 6 + 94)  # max_minutes is spent time: its saves come after it


def test_stop_at_stops_in_time_with_a_checkpoint_and_final(tokens, tmp_path):
    train(tiny(tokens, tmp_path / "warm", max_steps=1, eval_batches=0))  # a process's first run imports for seconds
    stop_at = time.time() + 3.0
    result = train(tiny(tokens, tmp_path / "r", max_steps=100_000, stop_at=stop_at, save_minutes=1e-6,
                        keep_checkpoints=1, eval_batches=0))
    late = time.time() - stop_at
    print(f"stop_at: {result.step} steps, ended {late:+.2f} s from stop_at")
    assert 1 < result.step < 100_000 and late <= 0.5
    assert checkpoints(tmp_path / "r")[-1].name == f"step-{result.step:08d}"
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file()


def test_fit_schedule_ends_the_schedule_when_the_time_ends(tokens, tmp_path):
    run = tmp_path / "r"
    result = train(tiny(tokens, run, max_steps=100_000, max_minutes=0.05, fit_schedule=True, eval_batches=0,
                        warmup_steps=2, min_lr_ratio=0.1, lr=1e-3))
    fitted = json.loads((checkpoints(run)[-1] / "trainer_state.json").read_text())["total_steps"]
    print(f"fit_schedule: {fitted} steps fitted, {result.step} run")
    assert 3 <= fitted < 100_000  # 3 s of tiny steps: shrunk to what the time holds (a loaded machine holds fewer)
    assert result.step >= 0.5 * fitted  # a loaded machine may still stop it early, by time
    if result.step == fitted:  # the cosine reached its floor: the schedule ended with the time
        assert _logged(run)[-1]["lr"] == pytest.approx(1e-4)


def test_fit_schedule_needs_a_time_budget():
    with pytest.raises(RCCError, match="run.stop_at or run.max_minutes"):
        TrainConfig.load(tiny("t", "o", fit_schedule=True))


def test_save_minutes_checkpoints_by_time(tokens, tmp_path):
    train(tiny(tokens, tmp_path / "r", max_steps=3, save_every=0, save_minutes=1e-6, keep_checkpoints=5,
               eval_batches=0))
    assert [p.name for p in checkpoints(tmp_path / "r")] == [f"step-{i:08d}" for i in (1, 2, 3)]


# ---------------------------------------------------------- saved examples
def _examples(n=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ctx = rng.integers(1, VOCAB, int(rng.integers(5, 40)))
        ids = rng.integers(1, VOCAB, int(rng.integers(3, 9)))
        labels = np.where(np.arange(len(ids)) < 2, -100, ids)
        out.append(FinetuneExample(ctx, ids, labels, int(rng.integers(-1, len(ctx)))))
    return out


def test_saved_examples_read_back_exactly_and_train(tmp_path):
    examples = _examples()
    path = save_examples(tmp_path / "ex.safetensors", examples)
    got, report = load_examples(str(path), None, mode="mixed", window=16, max_windows=2, max_decoder_tokens=64,
                                answer_suffix="")
    long = [e for e in examples if len(e.context) > 32]  # more than max_windows x window: skipped, counted
    assert report.kept == len(examples) - len(long) and sum(report.skipped.values()) == len(long)
    kept = [e for e in examples if len(e.context) <= 32]
    for a, b in zip(kept, got):
        assert np.array_equal(a.context, b.context) and np.array_equal(a.input_ids, b.input_ids)
        assert np.array_equal(a.labels, b.labels) and a.answer_at == b.answer_at
        assert b.context.dtype == np.int64
    result = train(dict(task="finetune", model=dict(backbone=dict(BACKBONE), window=16, ratio=4),
                        data=dict(train_data=str(path), max_windows=2, max_decoder_tokens=64, grad_windows=1),
                        optim=dict(max_steps=2, batch_size=2, warmup_steps=0),
                        run=dict(output_dir=str(tmp_path / "run"), progress=False, eval_batches=0, save_every=0)))
    assert result.step == 2


def test_a_damaged_or_foreign_examples_file_is_one_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = save_examples(tmp_path / "ex.safetensors", _examples())
    tensors = load_file(str(path))
    tensors["context_offsets"] = tensors["context_offsets"][:-1].copy()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"format": "rcc-examples/1"})
    opts = dict(mode="manual", window=16, max_windows=4, max_decoder_tokens=64, answer_suffix="")
    with pytest.raises(RCCError, match="offsets do not fit"):
        load_examples(str(tmp_path / "bad.safetensors"), None, **opts)
    save_file({"x": np.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RCCError, match="not a file of tokenized examples"):
        load_examples(str(tmp_path / "other.safetensors"), None, **opts)


# ------------------------------------------------------------------- bench
def test_the_h200_peak_is_the_measured_790():
    assert [half for name, half, _ in GPU_PEAK_TFLOPS if name == "H200"] == [790.0]


def test_bench_train_writes_its_table_beside_the_json(tokens, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(tiny(tokens, tmp_path / "unused", max_steps=2)))
    out = tmp_path / "b.json"
    assert main(["bench", "train", str(cfg), "--steps", "1", "--warmup", "0", "--peak-tflops", "measure",
                 "-o", str(out), "-q"]) == 0
    table = (tmp_path / "b.md").read_text()
    result = json.loads(out.read_text())
    assert result["peak_from"].startswith("measured") and "| new |" in table
