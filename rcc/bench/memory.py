"""Memory and speed of RCC against its uncompressed decoder backbone (``rcc bench``).

Each (model kind, context length) point runs in a fresh child process, so
every peak is that point's alone: the child loads the model, resets the peak
(``/proc/self/clear_refs`` on Linux CPU, ``reset_peak_memory_stats`` on CUDA),
then measures one request:

- ``rcc``: ``model.generate(context_ids, prompt)``: compress the context
  (streaming, ``window_batch_size`` windows at a time, docs/method.md section 4), then
  generate ``new_tokens`` after a short prompt;
- ``backbone``: the decoder alone (the encoder and the projections are freed
  first) pre-fills the whole context + prompt and generates ``new_tokens``;
- ``forward``: the plain backbone (the decoder without its adapters, no cache,
  no LM head) runs over the same windows RCC compresses, ``window_batch_size``
  at a time: the speed compression is measured against (``compress_s``).

With several dtypes (``--dtypes float32,bfloat16``) every point is measured in each, one
after the other (the same minute of the machine), and the summary gives each dtype's
speed over the first's.

RCC's compression time is split: ``slot_prefill_s`` is the time spent in the decoder's
pre-fill of the n/r slots (timed with hooks on the decoder), the rest is the encoder
and the projections. The pre-fill is work a plain forward pass never does, so
``(forward + slot pre-fill) / forward`` is the floor of compression's cost against a
forward pass, reported beside the measured ratio.

Recorded per point: peak memory (RSS on CPU, ``torch.cuda.max_memory_allocated``
on GPU), memory after loading, compression time, time to first token (from
holding the token ids to the first new token: compression + pre-fill for
RCC, pre-fill for the backbone), decode tokens/s (after the first token; with
``repeats`` > 1 the median, min and max over that many decodes from the same
pre-filled cache), the torch threads used and the load average around the point
(decode speed on a shared CPU depends on both: torch's threads wait for each
other at every operation, so a busy machine slows a 2-thread decode far more
than a 1-thread one).
The memory slope of each kind is a least-squares line of peak memory against
context length, in MiB per 1k (1024) tokens.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rcc.bench.decode import Clock, decode_again, tok_s
from rcc.config import RCCConfig
from rcc.errors import RCCError
from rcc.files import write_json
from rcc.report import parse_lengths, render_table, versions
from rcc.precision import machine as cpu_machine

log = logging.getLogger(__name__)

BENCH_KINDS = ("rcc", "backbone", "forward")
BENCH_DTYPES = ("float32", "bfloat16", "float16")
# glibc raises its mmap threshold after large frees and then keeps freed tensors in
# its heap, so peak RSS would follow the allocator's history (one window after
# another grows it) rather than live memory. A fixed threshold maps every large
# tensor on its own and unmaps it on free: peak RSS then tracks live tensors, as
# torch.cuda.max_memory_allocated does on a GPU. Applied to both kinds alike.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_MARK = "RCC_BENCH_RESULT "


@dataclass
class BenchConfig:
    """What ``rcc bench`` measures; saved in its JSON result.

    Attributes:
        model: as ``--model`` of the CLI (checkpoint, released layout with
            ``base_model``, ``embedded:smollm2`` or a backbone for a fresh model).
        lengths: context lengths in tokens.
        device: e.g. ``"cpu"``, ``"cuda"``.
        dtypes: each point is measured in each of these, in turn (e.g. ``["float32", "bfloat16"]``).
        window, ratio: of a fresh model.
        window_batch_size: windows RCC encodes per step; 1 keeps one window's
            activations at a time (the memory floor).
        new_tokens: tokens generated per request (>= 2 to time decoding).
        kinds: which of ``rcc``, ``backbone`` and ``forward`` to measure.
        backbone_max_length: skip the backbone above this length (its pre-fill
            is quadratic: hours on a CPU at long lengths).
        timeout_s: per point; a point that runs longer is recorded as failed.
        threads: torch intra-op threads in each child (None: torch's default, one per core).
        repeats: decodes timed per point (the first is the measured request; the others
            decode ``new_tokens`` again from the same context, compressed or pre-filled once more).

    Raises:
        RCCError: on bad lengths, kinds or counts.
    """

    model: str
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768])
    base_model: str | None = None
    device: str = "cpu"
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    window: int = RCCConfig.window
    ratio: int = RCCConfig.ratio
    window_batch_size: int | None = 1
    new_tokens: int = 16
    kinds: list[str] = field(default_factory=lambda: ["rcc", "backbone"])
    backbone_max_length: int | None = None
    seed: int = 0
    timeout_s: float | None = None
    threads: int | None = None
    repeats: int = 1

    def __post_init__(self) -> None:
        self.lengths = sorted(set(parse_lengths(self.lengths)))
        self.dtypes = list(dict.fromkeys([self.dtypes] if isinstance(self.dtypes, str) else self.dtypes))
        bad_dtypes = [d for d in self.dtypes if d not in BENCH_DTYPES]
        if bad_dtypes or not self.dtypes:
            raise RCCError(f"unknown dtypes {bad_dtypes}; use {', '.join(BENCH_DTYPES)} (comma-separated)")
        bad = [k for k in self.kinds if k not in BENCH_KINDS]
        if bad or not self.kinds:
            raise RCCError(f"unknown kinds {bad}; use rcc, backbone and/or forward")
        if self.new_tokens < 2:
            raise RCCError("new-tokens must be at least 2 (one for the first token, more to time decoding)")
        if self.threads is not None and self.threads < 1:
            raise RCCError(f"threads must be at least 1, got {self.threads}")
        if self.repeats < 1:
            raise RCCError(f"repeats must be at least 1, got {self.repeats}")
        if self.backbone_max_length is not None:
            self.backbone_max_length = parse_lengths([self.backbone_max_length])[0]


# ------------------------------------------------------------ measurement
def _status_mib(field_name: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def reset_peak(device: str) -> tuple[float, str]:
    """Start a new peak now; returns (current memory in MiB, what is measured)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20, "cuda max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        return _status_mib("VmRSS") or 0.0, "peak RSS"
    except OSError:
        log.warning("cannot reset the peak RSS (no /proc/self/clear_refs): peaks include model loading")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS (not reset: includes loading)"


def peak_mib(device: str) -> float:
    """The peak since :func:`reset_peak`: CUDA allocator peak, or peak RSS (VmHWM)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc
    ``malloc_trim``), so memory freed after loading is not counted in the peak
    (and is not silently reused, hiding growth)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def context_ids(tokenizer, length: int, vocab_size: int, seed: int = 0):
    """``[1, length]`` context ids: the pass-key filler tiled (random ids without a tokenizer)."""
    import torch

    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, vocab_size, (1, length), generator=g)
    from rcc.data.haystack import PASSKEY_FILLER

    unit = tokenizer("".join(PASSKEY_FILLER) * 4, add_special_tokens=False)["input_ids"]
    return torch.tensor([(unit * (length // len(unit) + 1))[:length]])


def prompt_ids(tokenizer, vocab_size: int):
    """``[1, m]``: the manual-mode prompt asking for the pass key."""
    import torch

    if tokenizer is None:
        return torch.arange(1, 9).remainder(vocab_size - 1).add(1).unsqueeze(0)
    from rcc.prompts import CHATML

    return tokenizer(CHATML.build("", "What is the pass key?", "manual")[1], add_special_tokens=False,
                     return_tensors="pt").input_ids


def _kv_bytes_per_position(decoder, dtype_bytes: int) -> int:
    cfg = decoder.config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * layers * heads * head_dim * dtype_bytes


def measure(model, kind: str, length: int, new_tokens: int = 16, window_batch_size: int | None = 1,
            seed: int = 0, free_encoder: bool = False, repeats: int = 1) -> dict:
    """Measure one request of ``kind`` on a ``length``-token context, in this process.

    Args:
        model: an :class:`~rcc.RCCModel`.
        kind: ``"rcc"``, ``"backbone"`` (``model.decoder`` alone) or ``"forward"``
            (the plain backbone's forward pass over RCC's windows, see the module doc).
        free_encoder: for ``backbone`` and ``forward``, drop the encoder and projections first
            so the peak holds only the decoder's weights (the model is unusable after).
        repeats: decodes timed (after the peak is taken, see :func:`rcc.bench.decode.decode_again`).
    Returns:
        a point: ``peak_mib``, ``loaded_mib``, ``compress_s``, ``ttft_s``,
        ``decode_tok_s`` (median over the repeats; ``decode_tok_s_runs``, ``_min``, ``_max``),
        ``kv_positions``, ``kv_cache_mib``, ``threads``, ``loadavg_before``/``_after`` ...
    """
    import torch

    device = str(model.device)
    tok = model.tokenizer
    vocab = model.decoder.config.vocab_size
    ids = context_ids(tok, length, vocab, seed).to(model.device)
    prompt = prompt_ids(tok, vocab).to(model.device)
    dtype_bytes = torch.empty((), dtype=model.dtype).element_size()
    per_pos = _kv_bytes_per_position(model.decoder, dtype_bytes)
    decoder = model.decoder
    point = {"kind": kind, "length": length, "new_tokens": new_tokens}
    if kind in ("backbone", "forward") and free_encoder:
        for name in ("encoder", "G", "A"):
            delattr(model, name)
    release_memory()
    load_before = _loadavg()
    loaded, what = reset_peak(device)
    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        if kind == "rcc":
            # context ids, not a memory: a one-off request, whose slots generate holds once
            with DecoderTime(decoder, device) as spans:
                out = model.generate(ids, prompt, max_new_tokens=new_tokens, eos_token_id=None, streamer=clock,
                                     window_batch_size=window_batch_size)
            t1 = clock.start
            point["slot_prefill_s"] = round(spans.within(t0, t1), 3)
            point["encoder_s"] = round(t1 - t0 - point["slot_prefill_s"], 3)
            positions = model.config.slots_for(length)
            enc = model.encoder.config
            point["all_encoder_states_mib"] = round(
                (enc.num_hidden_layers + 1) * length * enc.hidden_size * dtype_bytes / 2**20, 1)
        elif kind == "forward":
            from rcc.adapters import disabled
            from rcc.hooks import backbone_body
            from rcc.windows import pad_to_windows

            W = model.config.window
            windows = pad_to_windows(ids, W).reshape(-1, W)
            step = window_batch_size or len(windows)
            with disabled(decoder):
                for s in range(0, len(windows), step):
                    backbone_body(decoder)(input_ids=windows[s : s + step], use_cache=False)
            out = ids[:, :0]
            t1 = time.perf_counter()
            positions = 0
        else:
            full = torch.cat([ids, prompt], dim=1)
            pad = decoder.generation_config.pad_token_id
            out = decoder.generate(input_ids=full, attention_mask=torch.ones_like(full), do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                                   pad_token_id=pad if pad is not None else 0)
            out = out[:, full.shape[1]:]
            t1 = t0
            positions = length
    peak = peak_mib(device)
    times = clock.times
    runs, same = [tok_s(times)] if kind != "forward" else [], True
    if repeats > 1 and kind != "forward":
        with torch.no_grad():
            again = decode_again(model, kind, ids, prompt, new_tokens, window_batch_size, repeats - 1)
        runs += [speed for speed, _ in again]
        same = all(torch.equal(o.cpu(), out.cpu()) for _, o in again)
    runs = [r for r in runs if r is not None]
    total_positions = positions + prompt.shape[1] + new_tokens if kind != "forward" else 0
    point.update({
        "ok": True,
        "tokens": length,
        "kv_positions": positions,
        "generated": int(out.shape[1]),
        "peak_mib": round(peak, 1),
        "loaded_mib": round(loaded, 1),
        "growth_mib": round(peak - loaded, 1),
        "kv_cache_mib": round(total_positions * per_pos / 2**20, 3),
        "compress_s": round(t1 - t0, 3) if kind != "backbone" else None,
        "compress_tok_s": round(length / max(t1 - t0, 1e-9), 1) if kind != "backbone" else None,
        "ttft_s": round(times[0] - t0, 3) if times else None,
        "decode_tok_s": round(statistics.median(runs), 2) if runs else None,
        "decode_tok_s_runs": [round(r, 2) for r in runs],
        "decode_tok_s_min": round(min(runs), 2) if runs else None,
        "decode_tok_s_max": round(max(runs), 2) if runs else None,
        "repeats_same_tokens": same,  # greedy: every repeat decodes the measured request's tokens
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "memory_measure": what,
    })
    return point


class DecoderTime:
    """The wall time spent inside ``decoder``'s forward calls, from hooks on it.

    ``with DecoderTime(decoder, device) as spans: ...`` then ``spans.within(t0, t1)``: the
    seconds of the calls that began and ended between ``t0`` and ``t1`` (``time.perf_counter``),
    e.g. RCC's pre-fill of the slots before generation starts. On CUDA each call is
    synchronised at both ends, so the spans are the calls' own.
    """

    def __init__(self, decoder, device: str):
        self.decoder, self.cuda = decoder, device.startswith("cuda")
        self.spans: list[list[float]] = []

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self) -> "DecoderTime":
        def pre(_module, _args):
            self.spans.append([self._now(), float("nan")])

        def post(_module, _args, _out):
            self.spans[-1][1] = self._now()

        self._hooks = [self.decoder.register_forward_pre_hook(pre), self.decoder.register_forward_hook(post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()

    def within(self, t0: float, t1: float) -> float:
        return sum(end - start for start, end in self.spans if start >= t0 and end <= t1)


def _loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _child(spec: dict) -> dict:
    from rcc.loading import load_model
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = load_model(spec["model"], base_model=spec.get("base_model"), dtype=getattr(torch, spec["dtype"]),
                       device=spec["device"], window=spec["window"], ratio=spec["ratio"])
    # the embedded loader keeps a parsed copy of the GGUF weights for later loads; this
    # process loads once, so free it: it is a loader cache, not memory RCC needs
    from rcc.backbones import clear_embedded_cache

    clear_embedded_cache()
    return measure(model, spec["kind"], spec["length"], spec["new_tokens"], spec["window_batch_size"],
                   spec["seed"], free_encoder=True, repeats=spec.get("repeats", 1))


def _run_child(spec: dict, timeout: float | None) -> dict:
    import rcc

    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    env.update(ALLOCATOR_ENV)
    root = str(Path(rcc.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    base = {"kind": spec["kind"], "length": spec["length"], "ok": False}
    try:
        res = subprocess.run([sys.executable, "-m", "rcc.bench.memory", json.dumps(spec)], capture_output=True,
                             text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    if res.returncode < 0:
        why = f"killed by signal {-res.returncode}" + (" (out of memory?)" if res.returncode == -9 else "")
    else:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {res.returncode}"
    return {**base, "error": why}


def fit_slope(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``(slope, intercept)`` of y on x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def summarize(points: list[dict]) -> dict:
    """Per kind: slope (MiB per 1k tokens) and intercept of peak memory over
    the lengths where every kind succeeded (all its lengths if only one kind); RCC's
    compression time over the forward pass's, and its floor (see the module doc).

    With points of several dtypes (their ``dtype`` key) the top level summarises the
    first dtype, ``by_dtype`` each one, and ``vs_first_dtype`` each later dtype's speed
    over the first's at every (kind, length): compress tokens/s, TTFT and decode tokens/s.
    """
    dtypes = list(dict.fromkeys(p["dtype"] for p in points if "dtype" in p))
    if len(dtypes) > 1:
        out = _summarize_one([p for p in points if p.get("dtype") == dtypes[0]])
        out["by_dtype"] = {d: _summarize_one([p for p in points if p.get("dtype") == d]) for d in dtypes}
        out["vs_first_dtype"] = {d: _speedups(points, dtypes[0], d) for d in dtypes[1:]}
        return out
    return _summarize_one(points)


def _speedups(points: list[dict], base: str, other: str) -> list[dict]:
    """``other``'s speed over ``base``'s at each (kind, length) both measured: >1 is faster."""
    ok = {(p["kind"], p["length"], p["dtype"]): p for p in points if p.get("ok") and "dtype" in p}
    rows = []
    for (kind, length, dtype), a in ok.items():
        b = ok.get((kind, length, other))
        if dtype != base or b is None:
            continue
        row = {"kind": kind, "length": length}
        for key, higher_is_faster in (("compress_tok_s", True), ("ttft_s", False), ("decode_tok_s", True)):
            x, y = a.get(key), b.get(key)
            if x and y:
                row[key] = round(y / x if higher_is_faster else x / y, 3)
        rows.append(row)
    return rows


def _summarize_one(points: list[dict]) -> dict:
    ok = [p for p in points if p.get("ok")]
    kinds = list(dict.fromkeys(p["kind"] for p in ok))
    common = sorted(set.intersection(*[{p["length"] for p in ok if p["kind"] == k} for k in kinds])) if kinds else []
    out: dict = {"common_lengths": common}
    for k in kinds:
        use = [p for p in ok if p["kind"] == k and (len(kinds) == 1 or p["length"] in common)]
        fit = fit_slope([(p["length"] / 1024, p["peak_mib"]) for p in use])
        out[k] = {"points": len(use), "slope_mib_per_1k": round(fit[0], 3) if fit else None,
                  "intercept_mib": round(fit[1], 1) if fit else None}
    times = {(p["kind"], p["length"]): p.get("compress_s") for p in ok if p["kind"] in ("rcc", "forward")}
    both = sorted(n for k, n in times if k == "rcc" and ("forward", n) in times)
    if both:  # RCC's compression time over the plain forward pass of the same windows
        out["compress_vs_forward"] = {n: round(times["rcc", n] / max(times["forward", n], 1e-9), 3) for n in both}
        prefill = {p["length"]: p.get("slot_prefill_s") for p in ok if p["kind"] == "rcc"}
        out["compress_floor_vs_forward"] = {
            n: round((times["forward", n] + prefill[n]) / max(times["forward", n], 1e-9), 3)
            for n in both if prefill.get(n) is not None}
    r, b = out.get("rcc", {}).get("slope_mib_per_1k"), out.get("backbone", {}).get("slope_mib_per_1k")
    if r is not None and b is not None:
        out["slope_ratio"] = round(b / r, 1) if r > 0 else float("inf")
    return out


def run_bench(cfg: BenchConfig, output: str | Path | None = None, progress=None, isolate: bool = True,
              model=None) -> dict:
    """Measure every (length, kind) point and return (and write) the result.

    Args:
        cfg: the :class:`BenchConfig`.
        output: JSON file to write (atomically).
        progress: called with a one-line message after each point.
        isolate: a fresh child process per point (the default, needed for
            honest peaks); False measures in this process with ``model``
            (quick checks; peaks then include whatever earlier points left).
        model: the loaded model for ``isolate=False``.
    Returns:
        ``{"config", "model", "device", "memory_measure", "machine", "points", "summary", ...}``.
    """
    if not isolate and model is None:
        raise RCCError("run_bench(isolate=False) needs the loaded model")
    points = []
    spec = {k: v for k, v in asdict(cfg).items()
            if k not in ("lengths", "kinds", "dtypes", "timeout_s", "backbone_max_length")}
    if not isolate and len(cfg.dtypes) > 1:
        raise RCCError("run_bench(isolate=False) measures the loaded model's dtype only; give one dtype")
    for length in cfg.lengths:
        for kind in cfg.kinds:
            for dtype in cfg.dtypes:  # innermost: each dtype sees the same minute of the machine
                if kind == "backbone" and cfg.backbone_max_length and length > cfg.backbone_max_length:
                    point = {"kind": kind, "length": length, "ok": False,
                             "error": f"skipped: above --backbone-max-length {cfg.backbone_max_length}"}
                elif isolate:
                    point = _run_child({**spec, "kind": kind, "length": length, "dtype": dtype}, cfg.timeout_s)
                else:
                    point = measure(model, kind, length, cfg.new_tokens, cfg.window_batch_size, cfg.seed,
                                    repeats=cfg.repeats)
                point["dtype"] = dtype
                points.append(point)
                if progress is not None:
                    progress(_point_line(point))
    first = next((p for p in points if p.get("ok")), {})
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "model": {"spec": cfg.model, "window": cfg.window, "ratio": cfg.ratio, "dtypes": cfg.dtypes,
                  "base_model": cfg.base_model},
        "device": cfg.device,
        "memory_measure": first.get("memory_measure", "peak RSS" if cfg.device == "cpu" else "cuda max_memory_allocated"),
        "allocator_env": ALLOCATOR_ENV if isolate else {},
        "machine": {"platform": platform.platform(), **cpu_machine(),
                    "threads": cfg.threads or (first.get("threads") if first else None)},
        "versions": versions(),
        "seed": cfg.seed,
        "points": points,
        "summary": summarize(points),
    }
    if output is not None:
        write_json(output, result)
    return result


def _point_line(p: dict) -> str:
    head = f"{p['kind']:8s} {p['length']:>8d} tokens {p.get('dtype', '')}:"
    if not p.get("ok"):
        return f"{head} {p.get('error')}"
    if p["kind"] == "forward":
        return f"{head} peak {p['peak_mib']:.0f} MiB, forward pass {p['compress_s']} s ({p['compress_tok_s']} tok/s)"
    split = f" (slot pre-fill {p['slot_prefill_s']} s)" if p.get("slot_prefill_s") is not None else ""
    return (f"{head} peak {p['peak_mib']:.0f} MiB, ttft {p['ttft_s']} s{split}, "
            f"{_decode_cell(p)} tok/s, load {p.get('loadavg_before')} -> {p.get('loadavg_after')}")


def _decode_cell(p: dict) -> str:
    """``"7.59"``, or with several decodes ``"7.59 (6.92-10.6)"``: median (min-max)."""
    if p.get("decode_tok_s") is None:
        return "-"
    if len(p.get("decode_tok_s_runs", [])) > 1:
        return f"{p['decode_tok_s']} ({p['decode_tok_s_min']}-{p['decode_tok_s_max']})"
    return str(p["decode_tok_s"])


def format_table(result: dict) -> str:
    """The points as a table, then each kind's memory slope."""
    header = ["tokens", "model", "dtype", "peak MiB", "after load MiB", "growth MiB", "KV positions", "compress s",
              "slot pre-fill s", "TTFT s", "decode tok/s"]
    rows = []
    for p in result["points"]:
        name = {"rcc": "RCC", "backbone": "backbone", "forward": "forward pass"}[p["kind"]]
        dtype = p.get("dtype", "")
        if not p.get("ok"):
            rows.append([p["length"], name, dtype, p.get("error", "failed")] + [""] * 7)
            continue

        timed = ["-" if p.get(key) is None else p[key] for key in ("compress_s", "slot_prefill_s", "ttft_s")]
        rows.append([p["length"], name, dtype, p["peak_mib"], p["loaded_mib"], p["growth_mib"], p["kv_positions"],
                     *timed, _decode_cell(p)])
    m = result.get("machine", {})
    text = ""
    if m.get("cpu"):
        flags = ", ".join(m.get("bf16_flags") or []) or "none"
        text = (f"{result.get('device')}: {m['cpu']} ({m.get('cores')} cores, {m.get('threads') or 'default'} torch "
                f"threads; bf16 flags: {flags})\n")
    text += render_table(header, rows)
    s = result["summary"]
    for kind, name in (("rcc", "RCC"), ("backbone", "backbone")):
        if s.get(kind, {}).get("slope_mib_per_1k") is not None:
            text += f"\nmemory slope {name}: {s[kind]['slope_mib_per_1k']:.3f} MiB per 1k tokens"
    for n, ratio in s.get("compress_vs_forward", {}).items():
        text += f"\ncompression at {n} tokens: {ratio}x the time of the backbone's plain forward pass over its windows"
        floor = s.get("compress_floor_vs_forward", {}).get(n)
        if floor is not None:
            text += f" (floor {floor}x: the forward pass plus the decoder's pre-fill of the slots)"
    for dtype, rows_ in s.get("vs_first_dtype", {}).items():
        base = result["config"]["dtypes"][0]
        for r in rows_:
            parts = [f"{label} {r[key]}x" for key, label in (("compress_tok_s", "compress"), ("ttft_s", "TTFT"),
                                                              ("decode_tok_s", "decode")) if key in r]
            if parts:
                text += f"\n{dtype} over {base}, {r['kind']} at {r['length']} tokens: {', '.join(parts)}"
    if "slope_ratio" in s:
        text += f"\nbackbone slope / RCC slope: {s['slope_ratio']}x (over {', '.join(map(str, s['common_lengths']))} tokens)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m rcc.bench.memory SPEC_JSON`` (one measurement of ``rcc bench``;
    the point's spec as JSON, from :func:`_run_child`)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m rcc.bench.memory SPEC_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        point = _child(json.loads(argv[0]))
    except RCCError as err:
        print(f"rcc: error: {err}", file=sys.stderr)
        return 2
    print(_MARK + json.dumps(point), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
