"""Training speed of a config (``rcc bench train CONFIG``).

Runs a few optimiser steps of the step ``rcc train`` runs (same model, data,
losses, optimiser, precision) and reports tokens/s, samples/s, the step split
into data / forward / backward / optimizer, peak memory and MFU, as JSON and a
table. ``--dtypes float32,bfloat16`` builds one variant per compute dtype and
alternates them step by step, so both see the same machine in the same
minute; the result gives the ratio.

Counting (``tokens``: context + decoder prompt tokens, as ``rcc train`` logs
them). FLOPs of a step are counted from the backbones' own shapes, matmuls
only (norms, activations and softmax are left out):

- a side's linear layers: ``2 * N * T`` forward, ``2 * N * T`` more for the
  input gradients when a gradient has to pass through it, ``2 * N_trained * T``
  for the weight gradients. ``N``: parameters of the side's decoder layers (LoRA
  included; ``N_trained`` the trained ones), ``T`` the tokens it reads (encoder:
  every window, of which only ``grad_windows`` get a backward pass; decoder:
  slots + prompt). The encoder needs no backward when it is frozen; the
  decoder always does (G and A_i are trained through it).
- attention: ``2 * s^2 * d`` per layer and sequence forward (QK^T and AV, causal
  half), twice that backward; ``s`` the sequence (a window, or slots + prompt).
- the decoder's LM head on the ``m + 1`` positions whose logits are kept
  (``2 * V * H`` per position forward, as much backward); G and A_i per slot.

MFU = FLOPs per step / (seconds per step x peak FLOP/s). The peak is the
device's dense bf16 / fp16 (or fp32) tensor peak from :data:`GPU_PEAK_TFLOPS`,
or on a CPU a measured matmul in the compute dtype, or ``--peak-tflops``.

Peak memory per variant = its resident tensors (parameters, gradients and
optimizer state, summed exactly) + the peak growth during its steps (CUDA:
``max_memory_allocated``; CPU: the process's peak RSS, reset before each step),
so variants that share one process are measured apart.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rcc.errors import RCCError
from rcc.precision import machine

if TYPE_CHECKING:  # annotations only: torch is imported where the step is built
    import torch

log = logging.getLogger(__name__)

# dense tensor-core peaks in TFLOP/s: (bf16/fp16, fp32 without TF32), by a name fragment of
# torch.cuda.get_device_name(); the first match wins (longer names first). Datasheet values, except
# the H200's bf16: 790, what an 8192^3 bf16 matmul through PyTorch reaches on the H200s this project
# borrows (769-798 TFLOP/s; the datasheet's 989 is not reached); `--peak-tflops measure` measures one.
GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 51.0), ("H100 NVL", 835.0, 60.0), ("H100", 989.0, 67.0), ("H200", 790.0, 67.0),
    ("GH200", 989.0, 67.0), ("B200", 2250.0, 80.0), ("A100", 312.0, 19.5), ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6), ("L40", 181.0, 90.5), ("L4", 121.0, 30.3), ("A10G", 70.0, 31.2), ("A10", 125.0, 31.2),
    ("RTX 4090", 165.0, 82.6), ("RTX A6000", 155.0, 38.7), ("RTX 3090", 71.0, 35.6), ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
]
PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class Variant:
    """One way to run the step: a name and its config overrides."""

    name: str
    overrides: list[str] = field(default_factory=list)


# -------------------------------------------------------------- counting
def _side_counts(lm: torch.nn.Module) -> dict:
    from rcc.hooks import decoder_layers

    layers = decoder_layers(lm)
    mats = [p for p in layers.parameters() if p.ndim >= 2]
    cfg = lm.config
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"n": sum(p.numel() for p in mats), "n_trained": sum(p.numel() for p in mats if p.requires_grad),
            "layers": len(layers), "attn_width": heads * head_dim}


def step_flops(model, cfg, batch: dict, counts: tuple[dict, dict] | None = None) -> float:
    """Matmul FLOPs of one micro-batch's forward + backward (see the module docstring).

    Args:
        batch: ``context_ids [b, n]``, ``input_ids [b, m]`` (a ``PretrainBatches`` item).
        counts: the sides' ``_side_counts`` (computed when not given).
    """
    W, k = model.config.window, model.config.slots_per_window
    b, n = batch["context_ids"].shape
    m = batch["input_ids"].shape[1]
    windows = math.ceil(n / W)
    with_grad = min(windows, cfg.data.grad_windows) if cfg.data.grad_windows else windows
    enc, dec = counts or (_side_counts(model.encoder), _side_counts(model.decoder))
    encoder_backward = cfg.model.train_encoder != "frozen"
    flops = 0.0
    # encoder: every window forward, the gradient windows backward
    fwd = 2 * enc["n"] * W + 2 * enc["layers"] * W * W * enc["attn_width"]
    flops += b * windows * fwd
    if encoder_backward:
        bwd = 2 * enc["n"] * W + 2 * enc["n_trained"] * W + 4 * enc["layers"] * W * W * enc["attn_width"]
        flops += b * with_grad * bwd
    # G and A_i on every slot (trained: forward + input and weight gradients)
    h_e, h_d = model.G.in_features, model.G.out_features
    flops += b * windows * k * 6 * h_e * h_d * (1 + len(model.A))
    # decoder over slots + prompt, always with a backward pass
    s = windows * k + m
    head = model.decoder.get_output_embeddings().weight
    dec_fwd = 2 * dec["n"] * s + 2 * dec["layers"] * s * s * dec["attn_width"] + 2 * head.numel() * (m + 1)
    dec_bwd = (2 * dec["n"] * s + 2 * dec["n_trained"] * s + 4 * dec["layers"] * s * s * dec["attn_width"]
               + 2 * head.numel() * (m + 1) * (2 if head.requires_grad else 1))
    flops += b * (dec_fwd + dec_bwd)
    return float(flops)


def device_peak(device: torch.device, compute: torch.dtype,
                given_tflops: float | str | None) -> tuple[float | None, str]:
    """``(peak FLOP/s or None, where it came from)``; ``given_tflops="measure"``
    measures a matmul in the compute dtype on the device (8192-square on a GPU)."""
    import torch

    if given_tflops == "measure" and device.type == "cuda":
        name = str(compute).removeprefix("torch.")
        return matmul_peak(compute, size=8192, repeats=10, device=device), f"measured: {name} 8192^3 matmul"
    if given_tflops and given_tflops != "measure":
        return float(given_tflops) * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, half, single in GPU_PEAK_TFLOPS:
            if fragment in name:
                reduced = compute in (torch.bfloat16, torch.float16)
                return (half if reduced else single) * 1e12, f"table: {fragment} {'bf16/fp16' if reduced else 'fp32'}"
        return None, f"unknown GPU {name!r}: give --peak-tflops"
    name = str(compute).removeprefix("torch.")
    return matmul_peak(compute), f"measured: {name} matmul on {torch.get_num_threads()} threads"


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 8, device=None) -> float:
    """The best FLOP/s of a ``size``-square matmul in ``dtype`` (on a CPU: a stand-in for its peak;
    on a GPU: the mean of ``repeats`` synchronised products after three warm-ups)."""
    import torch

    device = torch.device(device or "cpu")
    a, w = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    if device.type == "cuda":
        for _ in range(3):
            a @ w
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ w
        torch.cuda.synchronize(device)
        return 2 * size**3 * repeats / (time.perf_counter() - start)
    best = math.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ w
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ------------------------------------------------------------ memory
class _Memory:
    """Peak growth during a step: CUDA allocator stats, or the process's RSS on Linux."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> int | None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
        return self._status("VmRSS")

    def growth(self, before: int | None) -> int | None:
        import torch

        if before is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - before
        peak = self._status("VmHWM")
        return None if peak is None else max(0, peak - before)


def _resident_bytes(model, optimizer) -> int:
    import torch

    seen, total = set(), 0
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ------------------------------------------------------------- the step
class _Runner:
    """One variant: its model, data, optimizer and timings."""

    def __init__(self, variant: Variant, cfg, device: torch.device, data: str | None):
        from rcc.train.loop import build_data
        from rcc.train.setup import (build_model, compile_layers, make_optimizer, resolve_frozen_dtype,
                                  resolve_precision, store_frozen)
        import torch

        self.variant, self.cfg, self.device = variant, cfg, device
        cuda = device.type == "cuda"
        precision = resolve_precision(cfg, cuda)
        self.precision = precision
        self.compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, getattr(torch, cfg.model.dtype))
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg)
        self.frozen_dtype = resolve_frozen_dtype(cfg, precision)
        store_frozen(model, cfg, self.frozen_dtype)
        if cfg.run.compile:
            compile_layers(model)
        model.to(device)
        model.train()
        for side, mode in (("encoder", cfg.model.train_encoder), ("decoder", cfg.model.train_decoder)):
            if mode == "frozen":
                getattr(model, side).eval()
        self.model = model
        if data is not None:
            cfg.data.train_data = data
        self.batches = build_data(cfg, model)[0]
        self.optimizer = make_optimizer(model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.memory = _Memory(device)
        self.counts = (_side_counts(model.encoder), _side_counts(model.decoder))
        self.micro = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.records: list[dict] = []

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, split: bool) -> dict:
        """One optimiser step; ``split``: synchronise between phases to time them
        (on a GPU that removes overlap, so throughput comes from unsplit steps)."""
        import torch

        from rcc.train.loop import to_device, training_loss

        cfg, model, opt = self.cfg, self.model, self.optimizer
        times = dict.fromkeys(PHASES, 0.0)
        before = self.memory.start()
        tokens = samples = 0
        flops = 0.0
        self._sync()
        start = mark = time.perf_counter()

        def lap(phase):
            nonlocal mark
            if split:
                self._sync()
            now = time.perf_counter()
            times[phase] += now - mark
            mark = now

        amp = torch.autocast(self.device.type, dtype=self.compute, enabled=self.precision in ("bf16", "fp16"))
        for _ in range(cfg.optim.grad_accum):
            host = self.batches[self.micro % len(self.batches)]
            self.micro += 1
            tokens += host["context_ids"].numel() + host["input_ids"].numel()
            samples += host["input_ids"].shape[0]
            flops += step_flops(model, cfg, host, self.counts)
            batch = to_device(host, self.device)
            lap("data")
            with amp:
                loss = training_loss(model, batch, cfg.data.grad_windows) / cfg.optim.grad_accum
            lap("forward")
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            self.loss_sum += loss.detach().double()
            lap("backward")
        if self.scaler:
            self.scaler.unscale_(opt)
        if cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.max_grad_norm)
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        lap("optimizer")
        self._sync()
        seconds = time.perf_counter() - start
        growth = self.memory.growth(before)
        return {"seconds": seconds, "tokens": tokens, "samples": samples, "flops": flops, "split": split,
                "phases": times, "growth_bytes": growth, "loss": loss.item() * cfg.optim.grad_accum}

    def summary(self, peak: float | None) -> dict:
        timed = [r for r in self.records if not r["split"]] or self.records
        split = [r for r in self.records if r["split"]] or self.records
        sec = statistics.median(r["seconds"] for r in timed)
        r0 = timed[0]
        phases = {p: statistics.median(r["phases"][p] for r in split) for p in PHASES}
        growth = [r["growth_bytes"] for r in self.records if r["growth_bytes"] is not None]
        resident = _resident_bytes(self.model, self.optimizer)
        return {
            "name": self.variant.name, "overrides": self.variant.overrides,
            "mixed_precision": self.precision, "frozen_dtype": str(self.frozen_dtype).removeprefix("torch."),
            "compile": bool(self.cfg.run.compile), "batch_size": self.cfg.optim.batch_size,
            "grad_accum": self.cfg.optim.grad_accum, "steps": len(timed), "seconds_per_step": sec,
            "seconds_all": [r["seconds"] for r in timed], "samples_per_s": r0["samples"] / sec,
            "tokens_per_s": r0["tokens"] / sec, "phases_s": phases, "flops_per_step": r0["flops"],
            "tflops_per_s": r0["flops"] / sec / 1e12, "mfu": (r0["flops"] / sec / peak) if peak else None,
            "resident_gib": resident / 2**30,
            "peak_gib": (resident + max(growth)) / 2**30 if growth else None,
        }


def _random_tokens(cfg, vocab: int, folder: Path) -> str:
    """A token folder of random ids with room for the config's contexts (speed does not depend on the text)."""
    import numpy as np

    from rcc.data import write_token_folder

    if cfg.task != "pretrain":
        raise RCCError("--random-data builds pretraining tokens; give a pretrain config (task: pretrain)")
    window = cfg.model.rcc_config().window
    length = 2 * (cfg.data.max_windows * window + cfg.data.target_tokens)
    rng = np.random.default_rng(cfg.run.seed)
    write_token_folder(folder, {"train": [rng.integers(1, vocab, length) for _ in range(64)]}, vocab)
    return str(folder)


# ----------------------------------------------------------------- run
def run(config: str, overrides: list[str], steps: int = 3, warmup: int = 1, device: str | None = None, peak_tflops: float | str | None = None, random_data: bool = False,
        progress=None, dtypes: list[str] | None = None) -> dict:
    """Measure the training step of ``config`` (see the module docstring).

    Args:
        config, overrides: as ``rcc train`` takes them.
        steps / warmup: measured / discarded optimiser steps per variant.
        device: ``"cpu"`` or ``"cuda"`` (None: cuda when available).
        random_data: random token ids instead of the config's ``train_data``.
        dtypes: instead of one variant, one per compute dtype (``float32``: ``run.mixed_precision=no``,
            ``bfloat16``: ``bf16``, ``float16``: ``fp16``), alternating; ``ratio`` is then the second's
            samples/s over the first's.
    Returns:
        the JSON-ready result: ``variants`` (one summary each, see :meth:`_Runner.summary`),
        ``ratio`` (with two dtypes: the second's samples/s over the first's) and the machine.
    Raises:
        RCCError: on a bad config, data, device or variant.
    """
    import torch

    from rcc.train.config import TrainConfig

    say = progress or (lambda _line: None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RCCError("--device cuda: no GPU is visible to torch")
    if steps < 1 or warmup < 0:
        raise RCCError("--steps must be at least 1 and --warmup not negative")
    unknown = [d for d in dtypes or [] if d not in _PRECISION_OF]
    if unknown:
        raise RCCError(f"--dtypes: unknown {', '.join(unknown)}; use {', '.join(_PRECISION_OF)}")
    variants = [Variant("new", list(overrides))]
    if dtypes:
        variants = [Variant(d, [*overrides, f"run.mixed_precision={_PRECISION_OF[d]}"]) for d in dict.fromkeys(dtypes)]
    runners = []
    with tempfile.TemporaryDirectory(prefix="rcc-bench-train-") as tmp:
        data = None
        for v in variants:
            base = ["run.resume=never", f"run.output_dir={tmp}/out", "run.progress=false", "run.eval_batches=0"]
            cfg = TrainConfig.load(config, [*base, *v.overrides])
            if random_data and data is None:
                data = _random_tokens(cfg, _vocab(cfg), Path(tmp) / "tokens")
            say(f"building {v.name} ({cfg.optim.batch_size} x {cfg.optim.grad_accum} samples a step)")
            runners.append(_Runner(v, cfg, dev, data))
        compute = runners[-1].compute
        peak, peak_from = device_peak(dev, compute, peak_tflops)
        split_steps = min(steps, 3) if dev.type == "cuda" else 0
        for i in range(warmup + steps + split_steps):
            for r in runners:  # alternate: every variant sees the same minute of the machine
                split = dev.type != "cuda" or i >= warmup + steps
                rec = r.step(split)
                if i >= warmup:
                    r.records.append(rec)
                say(f"{r.variant.name} step {i + 1}: {rec['seconds']:.2f} s{' (warm-up)' if i < warmup else ''}")
    summaries = [r.summary(peak) for r in runners]
    result = {
        "config": str(config), "overrides": overrides,
        "random_data": random_data, "device": _device_name(dev), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "platform": platform.platform(), "machine": machine(),
        "peak_tflops": peak / 1e12 if peak else None,
        "peak_from": peak_from, "warmup": warmup, "variants": summaries,
    }
    if len(summaries) == 2:
        result["ratio"] = summaries[1]["samples_per_s"] / summaries[0]["samples_per_s"]
    return result


_PRECISION_OF = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def _vocab(cfg) -> int:
    from transformers import AutoConfig

    from rcc.backbones import EMBEDDED

    spec = cfg.model.backbone or cfg.model.decoder_backbone
    if isinstance(spec, dict):
        return int(spec.get("vocab_size", 32000))
    if spec == EMBEDDED:
        return 49152  # SmolLM2's
    if spec is None:
        raise RCCError("--random-data needs a backbone in the config (not init_from)")
    return int(AutoConfig.from_pretrained(spec).vocab_size)


def _device_name(dev: torch.device) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu: {machine()['cpu']}"


def format_table(result: dict) -> str:
    """A markdown table of the variants (and the ratio)."""
    rows = ["| variant | precision | frozen | s/step | samples/s | tokens/s | data / fwd / bwd / opt s "
            "| TFLOP/s | MFU | peak GiB |", "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for v in result["variants"]:
        ph = " / ".join(f"{v['phases_s'][p]:.2f}" for p in PHASES)
        mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "-"
        peak = f"{v['peak_gib']:.1f}" if v["peak_gib"] is not None else "-"
        rows.append(f"| {v['name']} | {v['mixed_precision']} | {v['frozen_dtype']} | {v['seconds_per_step']:.2f} | "
                    f"{v['samples_per_s']:.2f} | {v['tokens_per_s']:.0f} | {ph} | {v['tflops_per_s']:.2f} | {mfu} | "
                    f"{peak} |")
    m = result.get("machine") or {}
    flags = ", ".join(m.get("bf16_flags") or []) or "none"
    lines = [f"{result['device']}, {result['threads']} threads (bf16 flags: {flags}); peak "
             f"{result['peak_tflops'] or 0:.1f} TFLOP/s ({result['peak_from']})", *rows]
    if "ratio" in result:
        a, b = result["variants"][0]["name"], result["variants"][1]["name"]
        lines.append(f"\n{b} / {a} samples/s: {result['ratio']:.2f}x")
    return "\n".join(lines)
