"""Two runs of one ``rcc eval`` in two dtypes, compared sample by sample (issue 20: bf16 answers
as good as float32's).

    rcc eval passkey --dtype float32  --modes manual --lengths 2k,8k,32k --samples 2 -o runs/dtype/float32.json
    rcc eval passkey --dtype bfloat16 --modes manual --lengths 2k,8k,32k --samples 2 -o runs/dtype/bfloat16.json
    python benchmarks/dtype_agreement.py runs/dtype/float32.json runs/dtype/bfloat16.json \\
        -o benchmarks/results/dtype-agreement-passkey.json

For each length (a cell of the model card's table, depths pooled): the samples, each dtype's
accuracy, how many samples decoded the same greedy tokens, and the share of identical tokens
(position by position, over the longer of the two answers: a first divergence counts every
later position as different, though the answers may agree again). Prints a markdown table and
writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(identical positions, positions compared): position by position over the longer list."""
    same = sum(x == y for x, y in zip(a, b))
    return same, max(len(a), len(b))


def compare(first: dict, second: dict) -> dict:
    """Per method and length (``"rcc/manual 2048"``), then per method over all lengths (``"rcc/manual all"``):
    samples, accuracy in each, identical answers, share of identical tokens."""
    def records(result):
        return {(r["id"], r["method"]): r for r in result["records"]}

    a, b = records(first), records(second)
    both = sorted(set(a) & set(b), key=lambda k: (a[k]["length"], k))
    if not both:
        raise SystemExit("the two results share no samples (same task, lengths, samples and seed?)")
    missing = [k for k in both if "token_ids" not in a[k] or "token_ids" not in b[k]]
    if missing:
        raise SystemExit(f"{len(missing)} records have no token_ids (run the evals with this version of rcc)")
    cells: dict[tuple[str, int], dict] = defaultdict(lambda: {"samples": 0, "correct_a": 0, "correct_b": 0, "identical": 0,
                                                 "same_tokens": 0, "tokens": 0})
    for k in both:
        ra, rb = a[k], b[k]
        c = cells[ra["method"], ra["length"]]
        c["samples"] += 1
        c["correct_a"] += ra["scores"]["accuracy"] == 1.0
        c["correct_b"] += rb["scores"]["accuracy"] == 1.0
        c["identical"] += ra["token_ids"] == rb["token_ids"]
        same, n = agreement(ra["token_ids"], rb["token_ids"])
        c["same_tokens"] += same
        c["tokens"] += n
    rows = {f"{method} {length}": c for (method, length), c in sorted(cells.items())}
    for method in sorted({m for m, _ in cells}):
        mine = [c for (m, _), c in cells.items() if m == method]
        rows[f"{method} all"] = {key: sum(c[key] for c in mine) for key in mine[0]}
    for c in rows.values():
        c["share_identical_tokens"] = round(c["same_tokens"] / c["tokens"], 4) if c["tokens"] else None
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="eval JSON of the first dtype (e.g. float32)")
    p.add_argument("second", help="eval JSON of the second dtype (e.g. bfloat16)")
    p.add_argument("-o", "--output", help="JSON to write")
    args = p.parse_args()
    first, second = (json.loads(Path(x).read_text()) for x in (args.first, args.second))
    names = [r.get("config", {}).get("dtype") or Path(x).stem for r, x in ((first, args.first), (second, args.second))]
    rows = compare(first, second)
    print(f"| method, tokens | samples | {names[0]} correct | {names[1]} correct | identical answers | identical tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for length, c in rows.items():
        print(f"| {length} | {c['samples']} | {c['correct_a']} | {c['correct_b']} | {c['identical']} | "
              f"{100 * c['share_identical_tokens']:.1f}% |")
    if args.output:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from rcc.files import write_json

        write_json(args.output, {"task": first.get("task"), "first": {"file": args.first, "dtype": names[0]},
                                 "second": {"file": args.second, "dtype": names[1]}, "by_length": rows,
                                 "model": first.get("model"), "versions": second.get("versions")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
