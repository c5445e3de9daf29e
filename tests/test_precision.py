"""What `--dtype auto` means on a CPU (rcc/precision.py): the rule on made-up CPUs
(flags given, the measurement replaced by fixed numbers where the flags do not
settle it), the per-machine cache of the measurement, the override, and the
callers that follow the rule (CLI dtype, training precision, `rcc info --system`)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rcc import precision
from rcc.errors import RCCError
from rcc.precision import CPUInfo, choose_cpu_dtype

AMX = CPUInfo("Intel(R) Xeon(R) Platinum 8480+", "x86_64",
              frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), 2)
ZEN4 = CPUInfo("AMD EPYC 9R14", "x86_64", frozenset({"avx2", "avx512f", "avx512_bf16"}), 2)
AVX2 = CPUInfo("AMD EPYC 7R13", "x86_64", frozenset({"avx2", "fma"}), 2)
GRAVITON3 = CPUInfo("", "aarch64", frozenset({"asimd", "sve", "bf16", "i8mm"}), 2)
GRAVITON2 = CPUInfo("", "aarch64", frozenset({"asimd"}), 2)


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)


class Measure:
    """Stands in for the matmul timing: fixed GFLOP/s per dtype, calls counted."""

    def __init__(self, float32, bfloat16):
        self.speed, self.calls = {"float32": float32, "bfloat16": bfloat16}, 0

    def __call__(self, dtype, threads):
        self.calls += 1
        return self.speed[dtype]


def never(dtype, threads):
    raise AssertionError("the flags settle it: nothing to measure")


@pytest.mark.parametrize("cpu, dtype", [(AMX, "bfloat16"), (AVX2, "float32"), (GRAVITON2, "float32")])
def test_the_flags_settle_amx_and_cpus_without_bf16(cpu, dtype, tmp_path):
    choice = choose_cpu_dtype(cpu, cache=tmp_path / "c.json", measure=never)
    assert (choice.dtype, choice.rule) == (dtype, "flags")
    assert ("amx_bf16" in choice.reason) == (cpu is AMX)
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("cpu", [ZEN4, GRAVITON3])
@pytest.mark.parametrize("speeds, dtype", [((100, 290), "bfloat16"), ((100, 120), "float32"), ((100, 40), "float32")])
def test_bf16_dot_products_without_amx_are_measured(cpu, speeds, dtype, tmp_path):
    measure = Measure(*speeds)
    choice = choose_cpu_dtype(cpu, cache=tmp_path / "c.json", measure=measure, threads=2)
    assert (choice.dtype, choice.rule) == (dtype, "benchmark")
    assert choice.gflops == {"float32": speeds[0], "bfloat16": speeds[1]} and measure.calls == 6
    assert f"{speeds[1] / speeds[0]:.2f}x" in choice.reason


def test_the_measurement_is_cached_per_machine_and_thread_count(tmp_path):
    cache = tmp_path / "cpu-dtype.json"
    first = choose_cpu_dtype(ZEN4, cache=cache, measure=Measure(100, 290), threads=2)
    again = choose_cpu_dtype(ZEN4, cache=cache, measure=never, threads=2)
    assert (again.dtype, again.rule, again.gflops) == (first.dtype, "cached benchmark", first.gflops)
    # another thread count, or another CPU, is another measurement
    one = choose_cpu_dtype(ZEN4, cache=cache, measure=Measure(100, 120), threads=1)
    other = choose_cpu_dtype(CPUInfo("AMD EPYC 9654", "x86_64", ZEN4.flags, 96), cache=cache,
                             measure=Measure(100, 120), threads=2)
    assert (one.dtype, one.rule, other.dtype, other.rule) == ("float32", "benchmark", "float32", "benchmark")
    assert len(json.loads(cache.read_text())) == 3
    assert choose_cpu_dtype(ZEN4, cache=cache, measure=never, threads=2).dtype == "bfloat16"


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"x": 1}), None])
def test_a_damaged_cache_is_measured_again(tmp_path, content):
    cache = tmp_path / "cpu-dtype.json"
    choose_cpu_dtype(ZEN4, cache=cache, measure=Measure(100, 290), threads=2)
    entries = json.loads(cache.read_text())
    if content is None:  # an entry that names no dtype we know
        cache.write_text(json.dumps({k: {**v, "dtype": "float8"} for k, v in entries.items()}))
    else:
        cache.write_text(content)
    measure = Measure(100, 290)
    choice = choose_cpu_dtype(ZEN4, cache=cache, measure=measure, threads=2)
    assert (choice.dtype, choice.rule, measure.calls) == ("bfloat16", "benchmark", 6)


def test_an_unwritable_cache_still_chooses(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    choice = choose_cpu_dtype(ZEN4, cache=blocker / "cpu-dtype.json", measure=Measure(100, 290), threads=2)
    assert choice.dtype == "bfloat16"


def test_the_environment_overrides_the_rule(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.ENV, "bfloat16")
    assert choose_cpu_dtype(AVX2, cache=tmp_path / "c.json", measure=never).rule == "env"
    monkeypatch.setenv(precision.ENV, "float32")
    assert choose_cpu_dtype(AMX, cache=tmp_path / "c.json", measure=never).dtype == "float32"
    monkeypatch.setenv(precision.ENV, "fp8")
    with pytest.raises(RCCError, match="RCC_CPU_DTYPE=fp8: use one of float32, bfloat16"):
        choose_cpu_dtype(AMX)


@pytest.mark.parametrize("forced, dtype, mixed", [("bfloat16", torch.bfloat16, "bf16"), ("float32", torch.float32, "no")])
def test_cli_and_training_follow_the_choice(monkeypatch, forced, dtype, mixed):
    from rcc.loading import resolve_dtype
    from rcc.train.config import TrainConfig
    from rcc.train.setup import resolve_frozen_dtype, resolve_precision

    monkeypatch.setenv(precision.ENV, forced)
    assert resolve_dtype("auto", "cpu") == dtype
    assert resolve_dtype("float64", "cpu") == torch.float64  # an explicit dtype always wins
    cfg = TrainConfig.from_dict({"task": "pretrain", "model": {"backbone": "embedded:smollm2"},
                                "data": {"train_data": "data/x"}, "optim": {"max_steps": 1},
                                "run": {"output_dir": "runs/x"}})
    assert cfg.run.mixed_precision == "auto" and resolve_precision(cfg, cuda=False) == mixed
    assert resolve_frozen_dtype(cfg, resolve_precision(cfg, cuda=False)) == dtype
    cfg.run.mixed_precision = "no"
    assert resolve_precision(cfg, cuda=False) == "no"


def test_this_machine_is_read_and_measured(tmp_path):
    info = precision.cpu_info()
    assert info.model and info.machine and info.cores >= 1
    if info.machine == "x86_64":
        assert "sse2" in info.flags  # every x86-64 CPU has it: the flags were read
    speed = precision.measure_matmul("float32", threads=1, repeats=1)
    assert math.isfinite(speed) and speed > 0.1
    choice = choose_cpu_dtype(cache=tmp_path / "c.json")
    assert choice.dtype in ("float32", "bfloat16") and choice.rule in ("flags", "benchmark")


def test_rcc_info_system_says_what_auto_picks_and_why(monkeypatch, tmp_path, capsys):
    from rcc.cli import main

    monkeypatch.setenv("RCC_CACHE_DIR", str(tmp_path))
    assert main(["info", "--system", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"] == precision.cpu_info().model and info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_auto_dtype"] == choose_cpu_dtype().dtype and info["cpu_auto_reason"]
    monkeypatch.setenv(precision.ENV, "float32")
    assert main(["info", "--system"]) == 0
    assert "set by RCC_CPU_DTYPE" in capsys.readouterr().out
    assert main(["info"]) == 2 and "or --system" in capsys.readouterr().err
