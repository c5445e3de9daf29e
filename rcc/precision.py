"""What ``--dtype auto`` means on this machine: the fastest dtype that is correct here.

On a GPU: bfloat16 (float16 on a GPU without bf16). On a CPU it depends on the
processor, and machines of one class differ, so the choice is made at run time:

- native bf16 matrix units (Intel AMX, flag ``amx_bf16``): bfloat16;
- no bf16 instructions at all (e.g. AVX2 only): float32; bf16 would be
  emulated and several times slower than float32;
- bf16 dot products without matrix tiles (``avx512_bf16``, e.g. AMD Zen 4;
  ``bf16`` on Arm): the flags do not settle it, so a one-off micro-benchmark
  (a layer-sized matmul in both dtypes) decides, and its result is cached per
  machine in :func:`rcc.files.cache_root` ``/cpu-dtype.json``.

``RCC_CPU_DTYPE=float32|bfloat16`` overrides the rule for a process (the
tests pin float32 so that their numbers do not depend on the machine); an
explicit ``--dtype`` always wins over ``auto``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rcc.errors import RCCError

log = logging.getLogger(__name__)

ENV = "RCC_CPU_DTYPE"
CPU_DTYPES = ("float32", "bfloat16")
#: bf16 is chosen when its matmul runs at least this many times float32's speed: below it,
#: the element-wise work a model does besides matmuls (norms, rotary, attention's softmax),
#: which bf16 does not speed up on a CPU, eats the gain
MIN_SPEEDUP = 1.5
#: (rows, in, out) of the measured matmul: a decoder layer's MLP over a 512-token window
BENCH_SHAPE = (512, 576, 1536)
_CACHE_NAME = "cpu-dtype.json"


@dataclass(frozen=True)
class CPUInfo:
    """The processor as the OS reports it.

    Attributes:
        model: e.g. ``"Intel(R) Xeon(R) Platinum 8480+"`` or ``"AMD EPYC"``.
        machine: ``platform.machine()``, e.g. ``"x86_64"``, ``"aarch64"``, ``"arm64"``.
        flags: instruction-set flags (``/proc/cpuinfo`` ``flags`` or ``Features``; empty where unknown).
        cores: logical CPUs (``os.cpu_count()``).
    """

    model: str
    machine: str
    flags: frozenset[str] = field(default_factory=frozenset)
    cores: int | None = None

    def key(self, threads: int, torch_version: str) -> str:
        """What a cached measurement is valid for: this CPU, flags, thread count and torch."""
        text = json.dumps([self.model, self.machine, sorted(self.flags), threads, torch_version])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype ``auto`` resolved to on a CPU, and why.

    Attributes:
        dtype: ``"bfloat16"`` or ``"float32"``.
        reason: one sentence for ``rcc info --system``.
        rule: ``"flags"``, ``"benchmark"``, ``"cached benchmark"`` or ``"env"``.
        gflops: the micro-benchmark's ``{"float32": ..., "bfloat16": ...}`` (GFLOP/s) when one ran.
    """

    dtype: str
    reason: str
    rule: str
    gflops: dict | None = None


def cpu_info() -> CPUInfo:
    """This machine's :class:`CPUInfo` (Linux: ``/proc/cpuinfo``; elsewhere the model only)."""
    model, flags = platform.processor() or "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not flags and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if not model and platform.system() == "Darwin":
        import subprocess

        try:
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return CPUInfo(model=model or platform.machine(), machine=platform.machine(), flags=frozenset(flags),
                   cores=os.cpu_count())


def measure_matmul(dtype: str, threads: int | None = None, repeats: int = 2) -> float:
    """GFLOP/s of a layer-sized matmul (:data:`BENCH_SHAPE`) in ``dtype`` on the CPU, best of ``repeats``."""
    import torch

    m, k, n = BENCH_SHAPE
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dt), torch.randn(k, n, generator=g).to(dt)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for _ in range(2):  # first calls pick and prepare kernels
            a @ b
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            best = min(best, (time.perf_counter() - t) / 4)
    finally:
        torch.set_num_threads(before)
    return 2 * m * k * n / best / 1e9


def _read_cache(path: Path, key: str) -> DtypeChoice | None:
    try:
        entries = json.loads(path.read_text())
        entry = entries.get(key) if isinstance(entries, dict) else None
        choice = DtypeChoice(**entry) if isinstance(entry, dict) else None
    except (OSError, ValueError, TypeError):
        return None  # missing, unreadable or foreign: measured again
    if choice is None or choice.dtype not in CPU_DTYPES:
        return None
    return DtypeChoice(choice.dtype, choice.reason, "cached benchmark", choice.gflops)


def _write_cache(path: Path, key: str, choice: DtypeChoice) -> None:
    from rcc.files import write_json

    try:
        entries = json.loads(path.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = asdict(choice)
    try:
        write_json(path, entries)
    except OSError as err:  # a read-only cache: measured again next time
        log.info("cannot cache the CPU dtype measurement in %s (%s)", path, err)


def choose_cpu_dtype(info: CPUInfo | None = None, cache: Path | None = None, measure=measure_matmul,
                     threads: int | None = None) -> DtypeChoice:
    """The dtype ``auto`` means on this CPU (see the module's rules).

    Args:
        info: the CPU (default :func:`cpu_info`); tests pass made-up flags.
        cache: the measurement cache file (default: ``cpu-dtype.json`` in :func:`rcc.files.cache_root`).
        measure: ``measure(dtype, threads) -> GFLOP/s`` (default :func:`measure_matmul`).
        threads: torch threads the choice is for (default: torch's current setting).
    Raises:
        RCCError: when ``RCC_CPU_DTYPE`` holds something else than float32 or bfloat16.
    """
    forced = os.environ.get(ENV)
    if forced:
        if forced not in CPU_DTYPES:
            raise RCCError(f"{ENV}={forced}: use one of {', '.join(CPU_DTYPES)} (or unset it for the automatic choice)")
        return DtypeChoice(forced, f"set by {ENV}", "env")
    info = info or cpu_info()
    flags = info.flags
    if "amx_bf16" in flags:
        return DtypeChoice("bfloat16", "the CPU has AMX bf16 matrix tiles (flag amx_bf16): bf16 matmuls run several "
                           "times faster than float32", "flags")
    native = "avx512_bf16" in flags or (info.machine in ("aarch64", "arm64") and "bf16" in flags)
    if not native:
        found = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "neon", "asimd", "sve"}) or ["none known"]
        return DtypeChoice("float32", f"no bf16 instructions (flags: {', '.join(found)}): bf16 would be emulated, "
                           "slower than float32", "flags")
    import torch

    threads = threads or torch.get_num_threads()
    from rcc.files import cache_root

    path = cache or cache_root() / _CACHE_NAME
    key = info.key(threads, torch.__version__)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    runs: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(3):  # alternating, so that a change of load hits both dtypes alike
        for dt in runs:
            runs[dt].append(measure(dt, threads))
    gflops = {dt: round(max(r), 1) for dt, r in runs.items()}
    speedup = gflops["bfloat16"] / max(gflops["float32"], 1e-9)
    flag = "avx512_bf16" if "avx512_bf16" in flags else "bf16"
    if speedup >= MIN_SPEEDUP:
        choice = DtypeChoice("bfloat16", f"bf16 dot-product instructions ({flag}) without AMX; measured bf16 matmul "
                             f"{speedup:.2f}x float32 (>= {MIN_SPEEDUP}) on {threads} threads", "benchmark", gflops)
    else:
        choice = DtypeChoice("float32", f"bf16 dot-product instructions ({flag}) without AMX; measured bf16 matmul "
                             f"only {speedup:.2f}x float32 (< {MIN_SPEEDUP}) on {threads} threads", "benchmark", gflops)
    _write_cache(path, key, choice)
    return choice


def auto_dtype(device: str) -> str:
    """The dtype name ``auto`` resolves to on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``)."""
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "cpu" or device.startswith("cpu:"):
        return choose_cpu_dtype().dtype
    return "float32"


def auto_precision(cuda: bool) -> str:
    """``run.mixed_precision: auto`` of a training run: ``"bf16"``/``"fp16"`` on a GPU, and on a CPU
    ``"bf16"`` where :func:`choose_cpu_dtype` picks bfloat16, else ``"no"`` (float32)."""
    dtype = auto_dtype("cuda" if cuda else "cpu")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")


def machine(info: CPUInfo | None = None) -> dict:
    """The CPU a measurement ran on, for benchmark JSON and tables: its model, architecture,
    logical cores, the bf16 flags :func:`choose_cpu_dtype` reads, torch's intra-op threads
    and torch's version (no micro-benchmark is run)."""
    import torch

    info = info or cpu_info()
    return {"cpu": info.model, "machine": info.machine, "cores": info.cores, "torch_threads": torch.get_num_threads(),
            "bf16_flags": sorted(info.flags & {"amx_bf16", "amx_tile", "avx512_bf16", "bf16"}),
            "torch": torch.__version__}


def describe(device: str = "cpu") -> dict:
    """What ``rcc info --system`` prints: the CPU, torch's threads and the ``auto`` dtype with its reason."""
    import torch

    info = cpu_info()
    out = {**machine(info), "cuda": torch.cuda.is_available()}
    choice = choose_cpu_dtype(info)
    out["cpu_auto_dtype"] = choice.dtype
    out["cpu_auto_reason"] = choice.reason
    out["cpu_auto_rule"] = choice.rule
    if choice.gflops:
        out["cpu_matmul_gflops"] = choice.gflops
    if device != "cpu":
        out["device"] = device
        out["device_auto_dtype"] = auto_dtype(device)
    return out
