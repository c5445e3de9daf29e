"""The paper's memory figure beside ours: a per-layer extrapolation of two `rcc bench` runs
of depth-reduced Pythia-1.4B (random:pythia-1.4b:layers=1 and :layers=2) to its 24 layers.

    python benchmarks/pythia_memory.py L1.json L2.json [--layers 24] [--json out.json]

For each kind (rcc, backbone) and each length measured at both depths, the per-layer
increment is peak(2 layers) - peak(1 layer); it holds a layer's weights (constant) and its KV
cache (linear in the tokens). With two or more such lengths a line through the increments
gives the increment at any length; with one (n0), the increment at n is the measured one plus
the growth of one layer's KV cache from n0 to n, computed from the shapes. Extrapolated peak(24 layers, n) = peak(1 layer, n) + 23 x increment(n), where
peak(1 layer, n) is measured when n was run and otherwise read off the least-squares line
of the 1-layer peaks (an extrapolation in length too; the table says which). Printed beside:
the increment computed from the shapes alone (weights + KV cache of one layer), as a check.

Prints a Markdown table; every number it prints is computed from the two JSON files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcc.bench.memory import fit_slope  # noqa: E402

# arXiv 2406.06110, the memory figure: Pythia-1.4B, MB as the paper prints them
PAPER = {("backbone", 32768): 33240, ("backbone", 65536): 61928,
         ("rcc", 65536): 9302, ("rcc", 1048576): 29944, ("rcc", 2097152): 64858}
# Pythia-1.4B's layer: 4 H^2 + 4 H (attention) + 2 H F + H + F (MLP) + 4 H (two layer norms)
H, F, RATIO = 2048, 8192, 32


def layer_bytes(kind: str, n: int, itemsize: int) -> float:
    """One layer's weights and KV cache at ``n`` context tokens, from the shapes alone."""
    weights = (4 * H * H + 4 * H + 2 * H * F + H + F + 4 * H) * itemsize
    kv = 2 * H * itemsize  # keys + values of one position
    if kind == "backbone":
        return weights + n * kv
    # encoder layer + decoder layer + its A_i (H x H), slot cache (one slot per RATIO tokens)
    return 2 * weights + H * H * itemsize + (n // RATIO) * kv


def points(path: str) -> tuple[dict, dict]:
    res = json.loads(Path(path).read_text())
    return {(p["kind"], p["length"]): p["peak_mib"] for p in res["points"] if p.get("ok")}, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("one_layer")
    ap.add_argument("two_layers")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--json", help="write the extrapolation as JSON too")
    args = ap.parse_args(argv)
    p1, r1 = points(args.one_layer)
    p2, _ = points(args.two_layers)
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[r1["config"]["dtypes"][0]]
    extra = args.layers - 1
    out, rows = {}, []
    for kind in ("backbone", "rcc"):
        both = sorted(n for k, n in p2 if k == kind and (kind, n) in p1)
        if not both:
            continue
        inc = [(n, p2[kind, n] - p1[kind, n]) for n in both]
        fit = fit_slope([(n, d) for n, d in inc])
        if fit is None:  # one length: the measured increment, growing as one layer's KV cache does
            n0, d0 = inc[0]
            fit = ((layer_bytes(kind, 2 * n0, itemsize) - layer_bytes(kind, n0, itemsize)) / n0 / 2**20,
                   d0 - (layer_bytes(kind, 2 * n0, itemsize) - layer_bytes(kind, n0, itemsize)) / 2**20)
        line = fit_slope([(n, m) for (k, n), m in p1.items() if k == kind])
        out[kind] = {"increment_mib": dict(inc), "increment_line": fit, "one_layer_line": line}
        lengths = sorted({n for k, n in p1 if k == kind} | {n for k, n in PAPER if k == kind})
        for n in lengths:
            measured = (kind, n) in p1
            if not measured and line is None:
                continue
            base = p1[kind, n] if measured else line[0] * n + line[1]
            per_layer = fit[0] * n + fit[1]
            est = base + extra * per_layer
            shapes = layer_bytes(kind, n, itemsize) / 2**20
            rows.append((n, kind, base, measured, per_layer, shapes, est, PAPER.get((kind, n))))
            out[kind][n] = {"one_layer_mib": round(base, 1), "measured": measured, "per_layer_mib": round(per_layer, 1),
                            "per_layer_from_shapes_mib": round(shapes, 1), "extrapolated_mib": round(est, 1),
                            "paper_mb": PAPER.get((kind, n))}
    print(f"| tokens | model | 1 layer MiB | per layer MiB (measured; from shapes) | {args.layers} layers MiB "
          "(extrapolated) | paper MB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for n, kind, base, measured, per_layer, shapes, est, paper in rows:
        name = "RCC" if kind == "rcc" else "uncompressed"
        one = f"{base:,.0f}" if measured else f"({base:,.0f}, line)"
        print(f"| {n:,} | {name} | {one} | {per_layer:,.0f}; {shapes:,.0f} | {est:,.0f} | "
              f"{'-' if paper is None else f'{paper:,}'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
