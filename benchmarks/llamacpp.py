"""llama.cpp beside RCC on the CPU, in one run: what a CPU user would run instead.

    nice -n 15 env HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llamacpp.py \\
        [--lengths 2k,8k] [--threads 2] [--new-tokens 32] [--repeats 3] [-o benchmarks/results/llamacpp-smollm2-cpu.json]

Needs ``.venv-llamacpp`` (``nice -n 15 bash scripts/llamacpp_env.sh``; or ``--llamacpp-python``).
For each length, in turn and each in a fresh process:

- ``llamacpp``: llama.cpp (llama-cpp-python, its defaults: the GGUF's Q4_1 weights as stored and
  memory-mapped, f16 KV cache, batches of 512) on the embedded backbone's GGUF, uncompressed: it
  pre-fills the context + prompt and decodes ``--new-tokens`` greedy tokens
  (:mod:`rcc.eval.llamacpp_child`); its context is sized to hold exactly that;
- ``llamacpp passive``: the same with ``OMP_WAIT_POLICY=passive`` (llama.cpp's OpenMP threads
  sleep instead of spinning while they wait for each other): on a shared CPU it keeps a preempted
  thread from stalling the other (``rcc eval``'s baseline runs so; it changes timing, not results);
- ``rcc float32`` and ``rcc bfloat16``: ``rcc bench --kinds rcc`` with the bundled model
  (compress the context, then answer the prompt from the slots), the command recorded beside it.

The token ids are ``rcc bench``'s (:func:`rcc.bench.memory.context_ids`: the pass-key filler tiled;
:func:`rcc.bench.memory.prompt_ids`: the manual-mode question), from the GGUF's tokenizer, whose
agreement with llama.cpp's is checked first. Peak RSS is measured as ``rcc bench`` measures it:
the peak is reset after loading (``/proc/self/clear_refs``), both kinds run with the same
``MALLOC_MMAP_THRESHOLD_``, and the peak includes the loaded weights. Decode tokens/s is counted
after the first new token, the median over ``--repeats`` decodes from the same pre-filled state.
The JSON holds the CPU's model and flags, the load average around every point and each command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = "benchmarks/results/llamacpp-smollm2-cpu.json"
FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
         "amx_tile", "amx_bf16", "amx_int8")


def cpu() -> dict:
    """The CPU's model, the flags that decide bf16 and SIMD paths, and the core count."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count(),
            "machine": platform.machine()}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def llamacpp_point(python: str, gguf: Path, length: int, ids: list[int], new_tokens: int, threads: int,
                   repeats: int, env: dict | None = None) -> dict:
    """One llama.cpp point in a fresh child: load, reset the peak, pre-fill ``ids`` (a
    ``length``-token context and the prompt) + decode, read the peak."""
    from rcc.bench.memory import ALLOCATOR_ENV
    from rcc.errors import RCCError
    from rcc.eval.llamacpp import LlamaCppChild

    kind = "llamacpp passive" if (env or {}).get("OMP_WAIT_POLICY") == "passive" else "llamacpp"
    point = {"kind": kind, "length": length, "tokens": length, "new_tokens": new_tokens, "threads": threads,
             "env": {**ALLOCATOR_ENV, **(env or {})}}
    load_before = loadavg()
    try:
        with LlamaCppChild(python, gguf, len(ids) + new_tokens, threads, env=point["env"]) as child:
            loaded = child.request("reset_peak")
            out = child.request("generate", ids=ids, max_new_tokens=new_tokens, repeats=repeats)
            peak = child.request("memory")
            info = child.info
    except RCCError as err:
        return {**point, "ok": False, "error": str(err)}
    point.update({
        "ok": True, "peak_mib": peak["peak_mib"], "loaded_mib": round(loaded["rss_mib"], 1),
        "growth_mib": round(peak["peak_mib"] - loaded["rss_mib"], 1), "peak_reset": loaded["reset"],
        "load_s": info["load_s"], "prefill_tokens": out["prefill_tokens"], "prefill_s": out["prefill_s"],
        "prefill_tok_s": out["prefill_tok_s"], "ttft_s": out["ttft_s"], "decode_tok_s": out["decode_tok_s"],
        "decode_tok_s_runs": out["decode_tok_s_runs"], "repeats_same_tokens": out["repeats_same_tokens"],
        "generated": len(out["token_ids"]), "token_ids": out["token_ids"], "llama_perf": out["llama_perf"],
        "n_ctx": info["n_ctx"], "n_ctx_train": info["n_ctx_train"], "n_batch": info["n_batch"],
        "n_ubatch": info["n_ubatch"], "flash_attn": info["flash_attn"], "system_info": info["system_info"],
        "versions": info["versions"], "loadavg_before": load_before, "loadavg_after": loadavg()})
    return point


def rcc_point(length: int, dtype: str, args) -> dict:
    """One ``rcc bench --kinds rcc`` point (its own fresh child process); the command beside it."""
    with tempfile.TemporaryDirectory(prefix="rcc-bench-") as tmp:
        out = Path(tmp) / "bench.json"
        cmd = ["rcc", "bench", "--model", args.model, "--device", "cpu", "--dtype", dtype, "--lengths", str(length),
               "--kinds", "rcc", "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--no-plot", "--quiet", "-o"]
        shown = shlex.join(cmd + ["OUT.json"])
        res = subprocess.run([sys.executable, "-m", "rcc.cli", *cmd[1:], str(out)], capture_output=True, text=True, check=False,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                 p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
        if res.returncode != 0 or not out.is_file():
            lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
            return {"kind": f"rcc {dtype}", "length": length, "ok": False, "command": shown,
                    "error": lines[-1] if lines else f"exit status {res.returncode}"}
        bench = json.loads(out.read_text())
    (p,) = bench["points"]
    return {**p, "kind": f"rcc {dtype}", "dtype": dtype, "command": shown,
            "prefill_tok_s": None, "rcc_bench_config": bench.get("config")}


def fmt(v, nd=1) -> str:
    return "-" if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else str(v))


def table(result: dict) -> str:
    """The points as a markdown table."""
    rows = [("| tokens | method | prefill / compress tok/s | TTFT s | decode tok/s (median, runs) | peak RSS MiB "
             "| after load MiB | load avg before / after |"),
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for p in result["points"]:
        if not p.get("ok"):
            rows.append(f"| {p['length']} | {p['kind']} | failed: {p.get('error')} | | | | | |")
            continue
        speed = p["prefill_tok_s"] if p["kind"].startswith("llamacpp") else p.get("compress_tok_s")
        runs = ", ".join(fmt(r, 1) for r in p.get("decode_tok_s_runs") or [])
        load = f"{fmt((p.get('loadavg_before') or [None])[0], 2)} / {fmt((p.get('loadavg_after') or [None])[0], 2)}"
        rows.append(f"| {p['length']} | {p['kind']} | {fmt(speed, 0)} | "
                    f"{fmt(p.get('ttft_s'), 2)} | {fmt(p.get('decode_tok_s'), 1)} ({runs}) | {fmt(p.get('peak_mib'), 0)} "
                    f"| {fmt(p.get('loaded_mib'), 0)} | {load} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2k,8k", help="context lengths (default 2k,8k)")
    ap.add_argument("--threads", type=int, default=2, help="threads of llama.cpp and torch (default 2)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per request (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="decodes timed per point (default 3)")
    ap.add_argument("--model", default="rcc-smollm2-135m", help="the RCC model (default the bundled one)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="RCC's dtypes (default float32,bfloat16)")
    ap.add_argument("--methods", default="llamacpp,llamacpp-passive,rcc",
                    help="what to measure (default llamacpp,llamacpp-passive,rcc)")
    ap.add_argument("--llamacpp-python", help="python of .venv-llamacpp (default: found as rcc eval finds it)")
    ap.add_argument("-o", "--output", default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)

    from rcc.backbones import embedded_smollm2_file
    from rcc.errors import RCCError
    from rcc.files import write_json
    from rcc.report import parse_lengths

    try:
        lengths = parse_lengths(args.lengths)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        if not set(methods) <= {"llamacpp", "llamacpp-passive", "rcc"}:
            raise RCCError(f"--methods {args.methods}: use llamacpp, llamacpp-passive and/or rcc")
        from rcc.eval.llamacpp import LlamaCppChild, find_python, tokenizer_check

        python, why = find_python(args.llamacpp_python)
        if any(m.startswith("llamacpp") for m in methods) and python is None:
            raise RCCError(why)
        gguf = embedded_smollm2_file()
    except RCCError as err:
        print(f"llamacpp bench: error: {err}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from rcc.bench.memory import context_ids, prompt_ids

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    result = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "benchmarks/llamacpp.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu(), "threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "gguf": gguf.name, "model": args.model, "loadavg_start": loadavg(), "points": []}
    if python is not None:
        with LlamaCppChild(python, gguf, 512, 1) as child:  # the tokenizers, once
            result["tokenizer_check"] = tokenizer_check(child, tok)
            result["llamacpp"] = {k: child.info[k] for k in ("versions", "system_info", "flash_attn")}
        if not result["tokenizer_check"]["agrees"]:
            print(f"llamacpp bench: the tokenizers differ: {result['tokenizer_check']}", file=sys.stderr)
            return 1
    t0 = time.perf_counter()
    for length in lengths:
        ids = context_ids(tok, length, len(tok))[0].tolist() + prompt_ids(tok, len(tok))[0].tolist()
        todo = [m for m in methods if m != "rcc"] + ([f"rcc {d}" for d in dtypes] if "rcc" in methods else [])
        for kind in todo:
            print(f"llamacpp bench: {length} tokens, {kind} ...", file=sys.stderr, flush=True)
            if kind.startswith("llamacpp"):
                env = {"OMP_WAIT_POLICY": "passive"} if kind == "llamacpp-passive" else {}
                point = llamacpp_point(python, gguf, length, ids, args.new_tokens, args.threads, args.repeats, env)
            else:
                point = rcc_point(length, kind.split()[1], args)
            result["points"].append(point)
            write_json(args.output, result)  # what is done so far survives an interruption
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["loadavg_end"] = loadavg()
    write_json(args.output, result)
    print(table(result))
    print(f"llamacpp bench: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
