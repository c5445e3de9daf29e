"""The comparison table of benchmarks/compare.sh: `rcc eval` results (JSON) of
the pass-key and needle tasks, merged per task, as Markdown: each method at its
better prompt (chosen per task over all its samples), then every run.

    python benchmarks/compare_table.py benchmarks/results/compare-*.json -o benchmarks/results/compare.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rcc.eval.runner import best_prompts, summarize
from rcc.files import atomic_write_text


def load(paths: list[str]) -> dict[str, dict]:
    """Task -> {"records", "metric", "model", "files", "skipped", "kvpress"} merged over its files
    (a sample's run found in two files, e.g. RCC in two 32k invocations, is taken from the first)."""
    tasks: dict[str, dict] = {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        t = tasks.setdefault(res["task"], {"records": [], "metric": res["metrics"][0], "files": [], "skipped": {},
                                           "model": res["model"], "kvpress": res.get("kvpress"), "seconds": 0.0})
        seen = {(r["id"], r["method"]) for r in t["records"]}  # a run repeated in another file counts once
        t["records"] += [r for r in res["records"] if (r["id"], r["method"]) not in seen]
        t["files"].append(str(path))
        t["skipped"].update(res["skipped"])
        t["seconds"] += sum(r["seconds"] for r in res["records"])
    return tasks


def kept(family: str, ratio: int) -> str:
    if family == "rcc":
        return f"n/{ratio} slots"
    if family == "full":
        return "all n (up to 8192 positions)"
    if family == "recent":
        return f"last n/{ratio} tokens"
    if family.startswith("kvpress:"):
        return f"n/{family.rsplit('@', 1)[1]} KV positions"
    return "?"


def size(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def cell(rows: list[dict], metric: str) -> str:
    if not rows:
        return "-"
    hits = sum(r["scores"][metric] for r in rows)
    return f"{hits:g}/{len(rows)}"


def table(tasks: dict[str, dict]) -> str:
    names = [t for t in ("passkey", "needle") if t in tasks] + [t for t in tasks if t not in ("passkey", "needle")]
    lengths = {t: sorted({r["length"] for r in tasks[t]["records"]}) for t in names}
    best = {}
    for t in names:
        recs, metric = tasks[t]["records"], tasks[t]["metric"]
        best[t] = {b["method"]: b for b in best_prompts(recs, summarize(recs, (), (metric,)), metric)}
    rank = {"rcc": 0, "full": 1, "recent": 2}
    families = list(dict.fromkeys(f for t in names for f in best[t]))
    families.sort(key=lambda f: rank.get(f, 3 if f.startswith("kvpress:") else 4))  # stable within kvpress
    ratio = next(iter(tasks.values()))["model"]["ratio"]
    head = ["method", "keeps of an n-token context"]
    for t in names:
        head += [f"{t} prompt"] + [f"{t} @{size(n)}" for n in lengths[t]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + "".join(" --- |" + " ---: |" * len(lengths[t])
                                                                        for t in names)]
    for f in families:
        row = [f, kept(f, ratio)]
        for t in names:
            b = best[t].get(f)
            if b is None:
                row += ["skipped"] + ["-"] * len(lengths[t])
                continue
            recs = [r for r in tasks[t]["records"] if r["method"] == b["run"]]
            row += [b["prompt"]] + [cell([r for r in recs if r["length"] == n], tasks[t]["metric"]) for n in lengths[t]]
        lines.append("| " + " | ".join(row) + " |")
    out = ["Each method at its better prompt (per task, by its score over all that task's samples); "
           "cells: correct / samples.", "", *lines, "", "Every run (method / prompt):", ""]
    head = ["run"] + [f"{t} @{size(n)}" for t in names for n in lengths[t]]
    out += ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    runs = [run for f in families for run in dict.fromkeys(r["method"] for t in names for r in tasks[t]["records"]
                                                          if r["family"] == f)]
    for run in runs:
        row = [run] + [cell([r for r in tasks[t]["records"] if r["method"] == run and r["length"] == n],
                            tasks[t]["metric"]) for t in names for n in lengths[t]]
        out.append("| " + " | ".join(row) + " |")
    skipped = {k: v for t in names for k, v in tasks[t]["skipped"].items()}
    for name, why in skipped.items():
        out.append(f"\n{name}: skipped: {why}")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="rcc eval JSON results")
    p.add_argument("-o", "--output", help="Markdown file (default: print)")
    args = p.parse_args()
    text = table(load(args.results))
    if args.output:
        atomic_write_text(Path(args.output), text)
    print(text, end="")


if __name__ == "__main__":
    main()
