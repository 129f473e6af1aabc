"""Report figures (matplotlib Agg + seaborn): interaction plots and dose-response of the interaction.

Cell means and intervals are the engine's model-based estimates (the same numbers as the tables), not a
separate bootstrap, so a figure can never disagree with the table beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are written on servers and in CI
    import matplotlib.pyplot as plt

    return plt


# Legible at 100% zoom in a 1280 px window: figures are saved at 90 dpi and shown at about their pixel size,
# so 11 pt text is ~14 px on screen (matplotlib's 8-9 pt was ~10 px).
FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
        "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 13}


def is_no_op(intervention: str, value: float) -> bool:
    """scale 1 and add 0 leave the run unchanged: their shifts are float noise (the report's null checks)."""
    return (intervention == "scale" and value == 1) or (intervention == "add" and value == 0)


def _label(intervention: str, value: float, position: str, positions: int) -> str:
    text = f"{intervention}={value:g}"
    return f"{text} [{position}]" if positions > 1 else text


def interaction_plot(cells: pd.DataFrame, a: str, b: str, levels: dict[str, list[str]], title: str,
                     path: Path) -> Path:
    """Cell means of the shift +- 95% CI: x = level of A, one line per level of B; rows = readouts,
    columns = intervention values. ``cells`` is one feature's rows of the analysis ``cells`` table.
    No-op clamps (scale 1, add 0) get no panel: their shifts are float noise, an empty-looking panel; the
    report's null checks show them."""
    import seaborn as sns

    plt = _pyplot()
    data = cells.copy()
    real = ~np.array([is_no_op(str(i), float(v)) for i, v in zip(data["intervention"], data["value"])], dtype=bool)
    if real.any():
        data = data[real]
    positions = data["position"].nunique()
    data = data.sort_values(["intervention", "value", "position"])
    data["clamp"] = [_label(i, v, p, positions) for i, v, p in
                     zip(data["intervention"], data["value"], data["position"])]
    order = list(dict.fromkeys(data["clamp"]))
    rows = sorted(data["readout"].unique())
    colors = dict(zip(levels[b], sns.color_palette("colorblind", 2)))
    with sns.axes_style("whitegrid"), plt.rc_context(FONT):
        fig, axes = plt.subplots(len(rows), len(order), figsize=(3.0 * len(order) + 1.6, 2.8 * len(rows) + 0.9),
                                 squeeze=False, sharex=True)
        for r, readout in enumerate(rows):
            for c, clamp in enumerate(order):
                ax = axes[r, c]
                sub = data[(data["readout"] == readout) & (data["clamp"] == clamp)]
                for j, lb in enumerate(levels[b]):
                    line = sub[sub["B"] == lb].set_index("A").reindex(levels[a])
                    x = np.arange(2) + (j - 0.5) * 0.08
                    y = line["mean"].to_numpy(dtype=float)
                    low = y - line["ci_low"].to_numpy(dtype=float)
                    high = line["ci_high"].to_numpy(dtype=float) - y
                    ax.errorbar(x, y, yerr=np.vstack([low, high]), marker="o", capsize=3, color=colors[lb],
                                label=f"{b}={lb}")
                ax.axhline(0, color="0.6", lw=0.8, zorder=0)
                ax.set_xticks([0, 1], levels[a])
                ax.set_xlim(-0.4, 1.4)
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
                if r == 0:
                    ax.set_title(clamp)
                if c == 0:
                    ax.set_ylabel(f"shift: {readout}")
                if r == len(rows) - 1:
                    ax.set_xlabel(a)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", frameon=False)
        fig.suptitle(title, x=0.02, ha="left")
        fig.tight_layout(rect=(0, 0, 0.86, 0.95))
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return path


def dose_plot(tests: pd.DataFrame, title: str, path: Path) -> Path:
    """Interaction contrast (estimate +- 95% CI) against the clamp value; one panel per readout, one line
    per intervention kind (and position); filled markers are significant after FDR."""
    import seaborn as sns

    plt = _pyplot()
    data = tests.sort_values("value")
    readouts = sorted(data["readout"].unique())
    groups = list(data.groupby(["intervention", "position"], sort=True))
    palette = sns.color_palette("colorblind", max(len(groups), 1))
    with sns.axes_style("whitegrid"), plt.rc_context(FONT):
        fig, axes = plt.subplots(1, len(readouts), figsize=(4.2 * len(readouts) + 0.8, 3.6), squeeze=False)
        for k, readout in enumerate(readouts):
            ax = axes[0, k]
            for color, ((kind, position), sub) in zip(palette, groups):
                sub = sub[sub["readout"] == readout]
                if sub.empty:
                    continue
                x = sub["value"].to_numpy(dtype=float)
                y = sub["estimate"].to_numpy(dtype=float)
                err = np.vstack([y - sub["ci_low"].to_numpy(dtype=float), sub["ci_high"].to_numpy(dtype=float) - y])
                ax.errorbar(x, y, yerr=err, color=color, capsize=3, lw=1, label=f"{kind} [{position}]")
                sig = sub["significant"].fillna(False).to_numpy(dtype=bool)
                ax.scatter(x[sig], y[sig], color=color, zorder=3, s=30)
                ax.scatter(x[~sig], y[~sig], facecolor="white", edgecolor=color, zorder=3, s=30)
            ax.axhline(0, color="0.6", lw=0.8, zorder=0)
            ax.set_title(readout)
            ax.set_xlabel("clamp value")
            if k == 0:
                ax.set_ylabel("A x B interaction\n(difference of differences)")
        axes[0, -1].legend(frameon=False)
        fig.suptitle(title + " (filled: q < 0.05)", x=0.02, ha="left")
        fig.tight_layout(rect=(0, 0, 1, 0.92))
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return path
