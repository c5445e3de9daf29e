"""The memory figure of ``rcc bench`` (peak memory by context length, RCC against the
uncompressed backbone), in the style of the original README's."""

from __future__ import annotations

from pathlib import Path

from rcc.report import pyplot, save_figure, tokens_label


def bench_memory(result: dict, path) -> Path:
    """Peak memory (MiB) by context length for RCC and the uncompressed backbone."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, label, style in (("backbone", "uncompressed backbone", "s-"), ("rcc", "RCC", "o-")):
        pts = sorted((p["length"], p["peak_mib"]) for p in result["points"] if p["kind"] == kind and p.get("ok"))
        if pts:
            slope = result["summary"].get(kind, {}).get("slope_mib_per_1k")
            extra = f" ({slope:.2f} MiB / 1k tokens)" if slope is not None else ""
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=label + extra)
    lengths = sorted({p["length"] for p in result["points"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [tokens_label(x) for x in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"peak memory (MiB, {result['memory_measure']})")
    ax.grid(alpha=0.3)
    ax.legend()
    m = result.get("model", {})
    ax.set_title(f"{m.get('spec')}: window {m.get('window')}, ratio {m.get('ratio')}, {result.get('device')}")
    out = save_figure(fig, path)
    plt.close(fig)
    return out
