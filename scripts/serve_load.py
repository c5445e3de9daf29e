#!/usr/bin/env python
"""Load test of `rcc serve`: N concurrent clients asking questions on two contexts,
against the same N questions one at a time through the server and through N
sequential `rcc ask` calls (each loads the model and compresses the document);
then, under load, appends to a context and questions over both (``context_ids``).

    python scripts/serve_load.py --clients 16 -o runs/serve-load.json

Prints a Markdown table (as in docs/benchmarks.md) and writes the JSON. Every
answer must equal the single-client answer (and `rcc ask`'s); any error or
mismatch makes the exit status 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [(REPO / "examples" / "passkey.txt", "What is the pass key? The pass key is"),
        (REPO / "examples" / "lighthouse.txt", "Who kept the lamp burning for forty-one years?")]


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None, timeout: float = 1800):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json" if isinstance(body, dict) else "text/plain", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=hdrs, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as res:
        return json.loads(res.read())


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def grow_and_combine(url: str, ids: list[str], n: int, max_tokens: int, result: dict) -> dict:
    """Under load, appends and questions over both contexts: n/2 clients post the same
    append (the second document onto the first: one child, content-addressed) while n/2
    ask over ``context_ids`` [first, second]; then the child's answer. All must equal
    the one-client answer over both contexts (the append keeps the cut, so the child
    reads the slots ``context_ids`` reads). Counts errors and mismatches into ``result``."""
    question = DOCS[0][1]
    both = {"context_ids": ids, "question": question, "max_tokens": max_tokens}
    reference = call(url + "/v1/ask", both)["answer"]
    text = DOCS[1][0].read_text()

    def job(i: int):
        if i % 2:
            return "ask", call(url + "/v1/ask", both)["answer"]
        return "append", call(f"{url}/v1/contexts/{ids[0]}/append", {"text": text})["id"]

    t = time.perf_counter()
    got = []
    with cf.ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(job, i) for i in range(n)]:
            try:
                got.append(f.result())
            except Exception as err:  # noqa: BLE001 - counted, reported
                print(f"error: {err}", file=sys.stderr)
                result["errors"] += 1
    children = sorted({v for k, v in got if k == "append"})
    for cid in children:
        while (row := call(f"{url}/v1/contexts/{cid}"))["status"] != "ready":
            if row["status"] == "failed":
                result["errors"] += 1
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t
    child_answers = [call(f"{url}/v1/contexts/{cid}/ask", {"question": question, "max_tokens": max_tokens})["answer"]
                     for cid in children]
    answers = [v for k, v in got if k == "ask"] + child_answers
    mismatches = sum(a != reference for a in answers) + (len(children) != 1)
    result["mismatches"] += mismatches
    return {"append_requests": sum(k == "append" for k, _ in got), "children": len(children),
            "combined_questions": sum(k == "ask" for k, _ in got), "answer": reference, "wall_s": wall,
            "mismatches": mismatches}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="rcc-smollm2-135m")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--cli-calls", type=int, help="sequential `rcc ask` calls (default: --clients; 0 skips them)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the server and the CLI (0: default)")
    p.add_argument("-o", "--output", default="runs/serve-load.json")
    args = p.parse_args(argv)
    cli_calls = args.clients if args.cli_calls is None else args.cli_calls
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    store = tempfile.mkdtemp(prefix="rcc-serve-load-")
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "rcc.cli", "serve", "--model", args.model, "--store", store,
                               "--port", str(port), "--max-batch", str(args.clients)], env=env)
    result = {"model": args.model, "clients": args.clients, "max_tokens": args.max_tokens, "errors": 0,
              "mismatches": 0}
    try:
        while True:
            try:
                call(url + "/health")
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the server exited") from None
                time.sleep(0.5)
        result["server_start_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        ids = [call(url + "/v1/contexts", {"text": path.read_text()})["id"] for path, _ in DOCS]
        for cid in ids:
            while call(f"{url}/v1/contexts/{cid}")["status"] != "ready":
                time.sleep(0.2)
        result["compress_both_s"] = time.perf_counter() - t

        def ask(i: int) -> tuple[int, str, float]:
            t = time.perf_counter()
            out = call(f"{url}/v1/contexts/{ids[i % 2]}/ask", {"question": DOCS[i % 2][1],
                                                                "max_tokens": args.max_tokens})
            return i, out["answer"], time.perf_counter() - t

        single = [ask(0)[1], ask(1)[1]]  # also loads both memories
        result["answers"] = single
        t = time.perf_counter()
        seq = [ask(i) for i in range(args.clients)]
        result["server_sequential"] = {"wall_s": time.perf_counter() - t, "p50_s": pct([x[2] for x in seq], 0.5),
                                       "p95_s": pct([x[2] for x in seq], 0.95)}
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(ask, i) for i in range(args.clients)]
            done = []
            for f in futures:
                try:
                    done.append(f.result())
                except Exception as err:  # noqa: BLE001 - counted, reported
                    print(f"error: {err}", file=sys.stderr)
                    result["errors"] += 1
        wall = time.perf_counter() - t
        lat = [x[2] for x in done]
        result["mismatches"] += sum(ans != single[i % 2] for i, ans, _ in done + seq)
        result["server_concurrent"] = {"wall_s": wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95)}
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        result["generate_calls"] = next(float(ln.split()[1]) for ln in metrics.splitlines()
                                        if ln.startswith("rcc_batches_total"))
        result["appends"] = grow_and_combine(url, ids, args.clients, args.max_tokens, result)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))  # kept if the rcc ask calls are cut short
        print(f"server: concurrent {result['server_concurrent']}, one at a time {result['server_sequential']}",
              file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    if cli_calls:
        times = []
        for i in range(cli_calls):
            path, question = DOCS[i % 2]
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "rcc.cli", "ask", "--model", args.model, "--context", str(path),
                                  "--question", question, "--max-new-tokens", str(args.max_tokens), "--json", "--quiet"],
                                 capture_output=True, text=True, env=env)
            times.append(time.perf_counter() - t)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                result["errors"] += 1
            elif json.loads(res.stdout.splitlines()[-1])["answer"] != result["answers"][i % 2]:
                result["mismatches"] += 1
        result["cli_sequential"] = {"calls": cli_calls, "wall_s": sum(times), "p50_s": pct(times, 0.5),
                                    "p95_s": pct(times, 0.95)}
    n = args.clients
    rows = [("server, %d concurrent clients" % n, result["server_concurrent"], n),
            ("server, %d questions one at a time" % n, result["server_sequential"], n)]
    if cli_calls:
        rows.append(("%d sequential `rcc ask` calls" % cli_calls, result["cli_sequential"], cli_calls))
    print("| how | questions | wall s | p50 s | p95 s | questions/s |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r, k in rows:
        r["questions_per_s"] = k / r["wall_s"]
        print(f"| {name} | {k} | {r['wall_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['questions_per_s']:.2f} |")
    if cli_calls:
        result["speedup_vs_cli"] = result["server_concurrent"]["questions_per_s"] / result["cli_sequential"]["questions_per_s"]
        print(f"\nthroughput, concurrent server / sequential rcc ask: {result['speedup_vs_cli']:.1f}x")
    a = result["appends"]
    print(f"appends under load: {a['append_requests']} requests made {a['children']} child; {a['combined_questions']} "
          f"questions over both contexts and the child's answer {a['mismatches']} differing, {a['wall_s']:.1f} s")
    print(f"errors {result['errors']}, answers differing from the single-client answer {result['mismatches']}, "
          f"generate calls {result['generate_calls']:.0f} for {2 + 2 * n} questions")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    return 1 if result["errors"] or result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
