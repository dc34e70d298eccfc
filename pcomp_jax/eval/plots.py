"""The evaluation's figures: accuracy heatmaps by depth and length, RULER's scores by task and
length, perplexity by prefix length."""

from __future__ import annotations

import os

import numpy as np


def plot_heatmaps(metrics: dict[str, dict], output_dir: str, suffix: str = "") -> list[str]:
    """``heatmap_<task><suffix>.png``: one panel per method, accuracy by depth (rows) x length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({t for m in metrics.values() for t in m["synthetic"]}):
        names = [n for n, m in metrics.items() if task in m["synthetic"]]
        lengths = sorted({int(n) for n in names for n in metrics[n]["synthetic"][task]})
        depths = sorted({float(d) for n in names for c in metrics[n]["synthetic"][task].values() for d in c["by_depth"]})
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names) + 1, 2.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for j, n in enumerate(lengths):
                cell = metrics[name]["synthetic"][task].get(str(n))
                for i, d in enumerate(depths):
                    if cell is not None and f"{d:g}" in cell["by_depth"]:
                        grid[i, j] = cell["by_depth"][f"{d:g}"]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_title(name, fontsize=9)
            ax.set_xticks(range(len(lengths)), [f"{n / 1024:g}K" if n >= 1024 else str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("context tokens", fontsize=7)
        axes[0][0].set_ylabel("depth", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        fig.suptitle(f"{task}: accuracy by depth and length", fontsize=10)
        path = os.path.join(output_dir, f"heatmap_{task}{suffix}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def plot_ruler_heatmaps(metrics: dict[str, dict], output_dir: str, suffix: str = "") -> list[str]:
    """``heatmap_ruler<suffix>.png`` (generated samples) and ``heatmap_ruler_file<suffix>.png``
    (RULER's data files), for those a sweep has: one panel per method, RULER's score (x100)
    by task (rows, the average over tasks last) x length (columns), each cell written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .summary import ruler_order

    written = []
    for section in ("ruler", "ruler_file"):
        names = [n for n, m in metrics.items() if m.get(section)]
        if not names:
            continue
        tasks = ruler_order({t for n in names for t in metrics[n][section]["tasks"]})
        lengths = sorted({int(length) for n in names for length in metrics[n][section]["average"]})
        size = (1.0 * len(lengths) * len(names) + 2.5, 0.32 * len(tasks) + 1.8)
        fig, axes = plt.subplots(1, len(names), figsize=size, squeeze=False)
        for k, (ax, name) in enumerate(zip(axes[0], names)):
            scores = metrics[name][section]
            rows = [scores["tasks"].get(t, {}) for t in tasks] + [scores["average"]]
            grid = np.array([[row[str(n)]["score"] if str(n) in row else np.nan for n in lengths] for row in rows])
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6)
            ax.set_title(name, fontsize=9)
            ax.set_xticks(range(len(lengths)), [f"{n / 1024:g}K" if n >= 1024 else str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(rows)), [*tasks, "average"] if k == 0 else [""] * len(rows), fontsize=7)
            ax.set_xlabel("tokens", fontsize=7)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score x100")
        fig.suptitle("RULER: score by task and length" + (" (RULER's data files)" if section == "ruler_file" else ""),
                     fontsize=10)
        path = os.path.join(output_dir, f"heatmap_{section}{suffix}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def plot_perplexity(metrics: dict[str, dict], output_dir: str, window: int | None = None,
                    suffix: str = "") -> str | None:
    """``perplexity<suffix>.png``: perplexity against prefix length, one line per method (log scales)."""
    if not any(m["perplexity"] for m in metrics.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in metrics.items():
        if m["perplexity"]:
            xs = [int(t) for t in m["perplexity"]]
            ax.plot(xs, [m["perplexity"][str(t)]["perplexity"] for t in xs], marker="o", label=name)
    if window:
        ax.axvline(window, color="gray", linestyle=":", label=f"trained window ({window})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefix tokens")
    ax.set_ylabel("perplexity of the continuation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = os.path.join(output_dir, f"perplexity{suffix}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
