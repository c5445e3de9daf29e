"""The README's main command against a bare import, in one run (issue 20's target: its
second run within 4x ``python -c "import torch, transformers, rcc"``; the first no
slower than before the backbone cache).

    python benchmarks/readme_speed.py [--repeats 3] [-o benchmarks/results/readme-speed.json]

Runs, alternating so that a change of load hits all alike: the bare import, the
README command with a warm cache, and (with ``--cold``) the README command with an
empty cache folder (the first run on a machine: the GGUF dequantised and cached,
the CPU's dtype measured) and the README command as it ran before the cache (float32,
the GGUF dequantised in every run: ``RCC_CPU_DTYPE=float32`` and a cache folder that
cannot be made, so the one-line fallback takes today's old path). With ``--plain-gc``, also
the README command with Python's collector as it is (``rcc.loading.quiet_gc`` replaced by a
null context: what holding the collector off during the load and freezing it saves).
Each run is a fresh process; wall time and peak RSS (``/usr/bin/time`` style, from
``os.wait4`` of each child). Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def readme_command() -> list[str]:
    """The README's first ``rcc ask`` line, as arguments of ``python -m rcc.cli``."""
    import shlex

    line = next(ln for ln in (REPO / "README.md").read_text().splitlines()[:6] if "rcc ask" in ln)
    args = shlex.split(line.split("&&", 1)[1])
    return [sys.executable, "-m", "rcc.cli", *args[1:]]


def timed(cmd: list[str], env: dict) -> dict:
    """One run: wall time, and the CPU time and peak RSS of that child alone (``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "rc": child.returncode, "stdout": stdout.strip()[-200:],
            "stderr_tail": stderr.strip().splitlines()[-1:] if child.returncode else []}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="also time first runs (empty cache folder each time)")
    p.add_argument("--plain-gc", action="store_true", help="also time the README command without quiet_gc")
    p.add_argument("-o", "--output", default="benchmarks/results/readme-speed.json")
    args = p.parse_args()
    from rcc.files import write_json
    from rcc.report import versions
    from rcc.precision import describe

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    bare = [sys.executable, "-c", "import torch, transformers, rcc"]
    readme = readme_command()
    key = re.search(r"The pass key is (\d+)\.", (REPO / "examples" / "passkey.txt").read_text()).group(1)
    subprocess.run(readme, cwd=REPO, env=env, capture_output=True)  # fills the cache (and the page cache)
    runs: dict[str, list[dict]] = {"bare import": [], "README, second run": []}
    plain_gc = [sys.executable, "-c", "import contextlib, sys; import rcc.loading as L; "
                "L.quiet_gc = contextlib.nullcontext; from rcc.cli.commands import main; sys.exit(main(sys.argv[1:]))",
                *readme[3:]]
    if args.plain_gc:
        runs["README, second run, plain gc"] = []
    if args.cold:
        runs["README, first run"] = []
        runs["README, as before the cache"] = []
    for _ in range(args.repeats):
        runs["bare import"].append(timed(bare, env))
        runs["README, second run"].append(timed(readme, env))
        if args.plain_gc:
            runs["README, second run, plain gc"].append(timed(plain_gc, env))
        if args.cold:
            cache = tempfile.mkdtemp(prefix="rcc-cold-")
            cold_env = dict(env, RCC_CACHE_DIR=cache)
            runs["README, first run"].append(timed(readme, cold_env))
            shutil.rmtree(cache, ignore_errors=True)
            before_env = dict(env, RCC_CACHE_DIR="/dev/null/rcc-no-cache", RCC_CPU_DTYPE="float32")
            runs["README, as before the cache"].append(timed(readme, before_env))
    rows = {}
    for name, rs in runs.items():
        rows[name] = {"median_wall_s": statistics.median(r["wall_s"] for r in rs),
                      "walls": [r["wall_s"] for r in rs], "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                      "answers": sorted({r["stdout"] for r in rs}) if name != "bare import" else None,
                      "failed": sum(r["rc"] != 0 for r in rs)}
    ratio = rows["README, second run"]["median_wall_s"] / rows["bare import"]["median_wall_s"]
    result = {"command": " ".join(readme[2:]), "expected_answer": key, "system": describe(), "versions": versions(),
              "loadavg": list(os.getloadavg()), "runs": rows, "second_run_over_bare_import": round(ratio, 2)}
    write_json(args.output, result)
    print(f"{'':28s} {'median s':>9s} {'runs':>22s} {'peak RSS MiB':>13s}  answer")
    for name, r in rows.items():
        print(f"{name:28s} {r['median_wall_s']:9.2f} {str(r['walls']):>22s} {r['peak_rss_mib']:13.0f}  "
              f"{'' if r['answers'] is None else ','.join(r['answers'])}")
    print(f"README second run / bare import: {ratio:.2f}x (target <= 4); load {result['loadavg']}; "
          f"auto dtype {result['system']['cpu_auto_dtype']}; wrote {args.output}")
    ok = all(r["failed"] == 0 for r in rows.values()) and all(
        r["answers"] == [key] for n, r in rows.items() if r["answers"] is not None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
