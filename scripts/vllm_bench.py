#!/usr/bin/env python
"""Throughput of `rcc serve --engine vllm` against `rcc serve` (transformers) in one run:
16 concurrent questions on one compressed context (the bundled model, CPU, float32).

    .venv-vllm/bin/python scripts/vllm_bench.py --clients 16 -o runs/vllm-bench.json

For each engine: start the server on a free port (this interpreter, so run it with
.venv-vllm's), post examples/passkey.txt, wait until it is compressed, ask one warm-up
question, then N different questions at once from N clients. Prints a Markdown table
(docs/benchmarks.md) and writes the JSON; the exit status is 1 on any error or when the
two engines' answers differ.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "examples" / "passkey.txt"
ASKS = ["What is the pass key? The pass key is", "Tell me the pass key. The pass key is",
        "Which number is the pass key? The pass key is", "Remember the pass key? The pass key is"]


def call(url: str, body=None, timeout: float = 3600):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json" if isinstance(body, dict) else "text/plain"})
    with urllib.request.urlopen(req, timeout=timeout) as res:
        return json.loads(res.read())


def run_engine(engine: str, model: str, clients: int, max_tokens: int, store: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(store.with_suffix(".log"), "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rcc.cli", "serve", "--engine", engine, "--model", model,
                             "--store", str(store), "--port", str(port), "--max-batch", str(clients),
                             "--max-model-len", "2048"], stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{engine} server exited {proc.returncode}; see {log.name}")
            try:
                call(url + "/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        start_s = time.perf_counter() - t0
        t = time.perf_counter()
        cid = call(url + "/v1/contexts", {"text": DOC.read_text()})["id"]
        while call(f"{url}/v1/contexts/{cid}")["status"] != "ready":
            time.sleep(0.2)
        compress_s = time.perf_counter() - t
        ask = lambda q: call(f"{url}/v1/contexts/{cid}/ask", {"question": q, "mode": "manual",  # noqa: E731
                                                              "max_tokens": max_tokens})
        warm = ask(ASKS[0])
        questions = [f"{ASKS[i % len(ASKS)]}" if i < len(ASKS) else f"({i}) {ASKS[i % len(ASKS)]}"
                     for i in range(clients)]

        def timed(q):
            t = time.perf_counter()
            r = ask(q)
            return r, time.perf_counter() - t

        t = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(timed, questions))
        wall = time.perf_counter() - t
        lat = sorted(x for _, x in results)
        tokens = sum(r["completion_tokens"] for r, _ in results)
        return {"engine": engine, "server_start_s": round(start_s, 1), "compress_s": round(compress_s, 1),
                "warmup_answer": warm["answer"], "questions": clients, "wall_s": round(wall, 2),
                "latency_p50_s": round(statistics.median(lat), 2), "latency_max_s": round(lat[-1], 2),
                "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
                "questions_per_s": round(clients / wall, 3), "answers": {q: r["answer"] for q, (r, _) in
                                                                          zip(questions, results)}}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="rcc-smollm2-135m")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("-o", "--output", default="runs/vllm-bench.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("transformers", "vllm"):
            rows.append(run_engine(engine, args.model, args.clients, args.max_tokens, Path(tmp) / engine))
            print(f"{engine}: {rows[-1]['tokens_per_s']} tokens/s", file=sys.stderr, flush=True)
    same = rows[0]["answers"] == rows[1]["answers"]
    out = {"model": args.model, "clients": args.clients, "max_tokens": args.max_tokens, "same_answers": same,
           "load_average": os.getloadavg(), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print("| engine | questions | wall s | tokens/s | questions/s | latency p50 s | latency max s | server start s "
          "| compress s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['engine']} | {r['questions']} | {r['wall_s']} | {r['tokens_per_s']} | {r['questions_per_s']} | "
              f"{r['latency_p50_s']} | {r['latency_max_s']} | {r['server_start_s']} | {r['compress_s']} |")
    print(f"\nanswers equal between the engines: {same}; warm-up answers: "
          f"{[r['warmup_answer'] for r in rows]}; load average {os.getloadavg()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
