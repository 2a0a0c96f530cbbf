"""Matplotlib figures of a study report; each takes a table of :mod:`sparsealloc.storage.report`.

Figures are built with :class:`matplotlib.figure.Figure` directly and saved through the Agg canvas,
so no display and no pyplot state are involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
from matplotlib.ticker import MaxNLocator

DPI = 110


def _figure(width: float = 7.5, height: float = 4.2) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    return fig, fig.add_subplot(1, 1, 1)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (tight layout) and return the path."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path


def history_figure(history: pd.DataFrame, objective: str) -> Figure:
    """Each completed trial's first objective and the best value so far, over the trial number."""
    fig, ax = _figure()
    ax.scatter(history["trial"], history[objective], s=18, color="#9aa5b1", label=f"trial {objective}", zorder=2)
    ax.step(history["trial"], history["best_so_far"], where="post", color="#d1495b", linewidth=2,
            label="best so far", zorder=3)
    ax.set(xlabel="trial number", ylabel=objective, title=f"Optimization history ({objective})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def pareto_figure(pareto: pd.DataFrame, names: Sequence[str]) -> Figure:
    """Objective 0 against objective 1 (colour = objective 2 when there are three); Pareto set in red."""
    fig, ax = _figure()
    x, y = names[0], names[1]
    rest, front = pareto[~pareto["pareto"]], pareto[pareto["pareto"]]
    if len(names) >= 3:
        z = names[2]
        points = ax.scatter(pareto[x], pareto[y], c=pareto[z], cmap="viridis", s=28, zorder=2)
        fig.colorbar(points, ax=ax, label=z)
        ax.scatter(front[x], front[y], s=90, facecolors="none", edgecolors="#d1495b", linewidths=1.5,
                   label="Pareto set", zorder=3)
    else:
        ax.scatter(rest[x], rest[y], s=22, color="#9aa5b1", label="dominated", zorder=2)
        line = front.sort_values([x, y])
        ax.plot(line[x], line[y], "o-", color="#d1495b", markersize=6, label="Pareto front", zorder=3)
    for row in front.itertuples(index=False):
        ax.annotate(str(row.trial), (getattr(row, x), getattr(row, y)), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ladder = uniform_ladder(pareto)
    if len(ladder):  # the uniform KV bit-widths (warm starts "uniform", "uniform-kv8"...) on the same axes
        ax.plot(ladder[x], ladder[y], "x--", color="black", markersize=8, linewidth=0.8, label="uniform ladder",
                zorder=4)
        for row in ladder.itertuples(index=False):
            bits = "16" if row.warm_start == "uniform" else str(row.warm_start).removeprefix("uniform-kv")
            ax.annotate(f"{bits}-bit", (getattr(row, x), getattr(row, y)), textcoords="offset points",
                        xytext=(-10, -12), fontsize=7)
    ax.set(xlabel=x, ylabel=y, title="Pareto front" + (f" ({x} vs {y})" if len(names) > 2 else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def uniform_ladder(pareto: pd.DataFrame) -> pd.DataFrame:
    """The uniform warm starts of a study with KV bits ("uniform", "uniform-kv8", ...), by bytes."""
    if "warm_start" not in pareto or "kv_bytes" not in pareto:
        return pareto.iloc[0:0]
    names = pareto["warm_start"].astype(str)
    ladder = pareto[(names == "uniform") | names.str.startswith("uniform-kv")]
    return ladder.sort_values("kv_bytes")


def pareto_3d_figure(pareto: pd.DataFrame, names: Sequence[str]) -> Figure:
    """3D scatter of three objectives; Pareto set in red."""
    fig = Figure(figsize=(7, 5.5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    x, y, z = names[:3]
    rest, front = pareto[~pareto["pareto"]], pareto[pareto["pareto"]]
    ax.scatter(rest[x], rest[y], rest[z], s=16, color="#9aa5b1", label="dominated")
    ax.scatter(front[x], front[y], front[z], s=36, color="#d1495b", label="Pareto set")
    ax.set(xlabel=x, ylabel=y, zlabel=z, title="Pareto front (3 objectives)")
    ax.legend()
    return fig


def per_layer_figure(layers: pd.DataFrame, trial: int) -> Figure:
    """Per decoder block (x = block index): the reported plan's sparsity, uniform and OWL."""
    fig, ax = _figure(max(7.5, min(16.0, 0.3 * len(layers) + 4)), 4.2)
    x = layers["block"]
    ax.plot(x, layers["best"], "o-", color="#d1495b", linewidth=2, label=f"plan (trial {trial})", zorder=3)
    if "uniform" in layers:
        ax.plot(x, layers["uniform"], "--", color="#30638e", label="uniform (target)", zorder=2)
    if "owl" in layers:
        ax.plot(x, layers["owl"], "s:", color="#00798c", markersize=7, markerfacecolor="none", linewidth=1.5,
                label="OWL (warm start)", zorder=4)  # on top, hollow: visible where it equals the plan
    if "dropped" in layers and layers["dropped"].any():
        for b in x[layers["dropped"]]:
            ax.axvspan(b - 0.5, b + 0.5, color="#ccc", alpha=0.6, zorder=1)
    ax.set(xlabel="decoder block", ylabel="sparsity", title="Per-layer sparsity",
           xticks=list(x) if len(x) <= 40 else list(x)[:: max(1, len(x) // 20)], xlim=(-0.5, len(x) - 0.5))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def kv_bits_figure(layers: pd.DataFrame, trial: int) -> Figure:
    """Per decoder block: the K and V cache bits of the reported plan (16 = not quantized)."""
    fig, ax = _figure(max(7.5, min(16.0, 0.3 * len(layers) + 4)), 3.6)
    x = layers["block"]
    width = 0.4
    ax.bar(x - width / 2, layers["k_bits"], width, color="#30638e", label="K bits")
    ax.bar(x + width / 2, layers["v_bits"], width, color="#edae49", label="V bits")
    ax.set(xlabel="decoder block", ylabel="bits", yticks=[2, 3, 4, 8, 16],
           title=f"KV-cache bits per layer (trial {trial})",
           xticks=list(x) if len(x) <= 40 else list(x)[:: max(1, len(x) // 20)], xlim=(-0.5, len(x) - 0.5))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def validation_figure(validation: pd.DataFrame, proxy: str) -> Figure:
    """Proxy value against held-out perplexity of the validated trials (warm starts labelled)."""
    fig, ax = _figure(6.5, 4.5)
    ax.scatter(validation["proxy"], validation["ppl"], s=30, color="#30638e", zorder=2)
    for row in validation.itertuples(index=False):
        label = f"{row.trial}" + (f" {row.warm_start}" if row.warm_start else "")
        ax.annotate(label, (row.proxy, row.ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    rho = validation.attrs.get("spearman")
    ax.set(xlabel=f"proxy ({proxy})", ylabel="validation perplexity",
           title="Proxy vs validation PPL" + (f" (Spearman ρ = {rho:.3f})" if rho is not None else ""))
    ax.grid(alpha=0.3)
    return fig
