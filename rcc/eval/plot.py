"""Pictures of evaluation results (matplotlib, no display needed): the length x
depth heat-map of retrieval tasks and a metric by context length."""

from __future__ import annotations

from pathlib import Path

from rcc.report import pyplot, save_figure, tokens_label


def heatmap(result: dict, path, metric: str | None = None) -> Path:
    """One panel per method: ``metric`` (default: the headline) by context
    length (x) and needle depth (y), 0..1."""
    plt = pyplot()
    metric = metric or result["metrics"][0]
    summary = result["summary"]
    lengths = sorted({g["length"] for e in summary.values() for g in e["groups"]})
    depths = sorted({g["depth"] for e in summary.values() for g in e["groups"]})
    n = len(summary)
    width = max(2.4, 0.8 * len(lengths))
    fig, axes = plt.subplots(1, n, figsize=(1.5 + width * n, 1.8 + 0.45 * len(depths)), squeeze=False,
                             sharey=True, constrained_layout=True)
    image = None
    for ax, (name, entry) in zip(axes[0], summary.items()):
        cell = {(g["length"], g["depth"]): g[metric] for g in entry["groups"]}
        grid = [[cell.get((length, d), float("nan")) for length in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [tokens_label(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(name, fontsize=10)
    axes[0][0].set_ylabel("needle depth")
    fig.supxlabel("context length (tokens)", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label=metric, shrink=0.9, pad=0.02)
    model = result.get("model", {})
    fig.suptitle(f"{result['task']}: {metric}" + ("" if model.get("trained", True) else " (UNTRAINED model)"),
                 fontsize=11)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def by_length(result: dict, path, metric: str | None = None) -> Path:
    """``metric`` by context length, one line per method."""
    plt = pyplot()
    metric = metric or result["metrics"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in result["summary"].items():
        groups = sorted(entry["groups"], key=lambda g: g["length"])
        ax.plot([g["length"] for g in groups], [g[metric] for g in groups], marker="o", label=name)
    ax.set_xscale("log", base=2)
    lengths = sorted({g["length"] for e in result["summary"].values() for g in e["groups"]})
    ax.set_xticks(lengths, [tokens_label(x) for x in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{result['task']}: {metric}" + ("" if result.get("model", {}).get("trained", True) else " (UNTRAINED)"))
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_result(result: dict, path) -> Path | None:
    """The picture that fits an evaluation task (None for QA, which has no axis)."""
    if result["group_by"] == ["length", "depth"]:
        return heatmap(result, path)
    if result["group_by"] == ["length"]:
        return by_length(result, path)
    return None
