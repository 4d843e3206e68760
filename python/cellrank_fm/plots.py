"""PNG figures (matplotlib, Agg backend, no display needed); each is written atomically."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cellrank_fm.errors import atomic_path


@contextmanager
def png_figure(path: str | Path, size=(6, 5), dpi: int = 150):
    """A figure and axes to draw on, saved as a PNG at `path` when the block ends.

    A bare matplotlib Figure (no pyplot), so writing files never changes the backend a
    notebook session draws with.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    ax = fig.subplots()
    yield fig, ax
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def new_axes(size=(6, 5)):
    """Axes on a new pyplot figure, for interactive use (a notebook shows it)."""
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)[1]


def confusion_matrix_png(cm, classes: list[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (true in rows), each cell annotated with its count."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(classes)
    side = max(4.0, 0.5 * k + 2.5)
    with png_figure(path, size=(side + 1, side)) as (fig, ax):
        im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), classes, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title)
        if k <= 30:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")


def scatter_png(coords, values, path: str | Path, title: str = "", legend_title: str = "") -> None:
    """2-D embedding (e.g. UMAP) coloured by a categorical or numeric column."""
    coords = np.asarray(coords)
    with png_figure(path, size=(7, 6)) as (fig, ax):
        size = max(1.0, min(20.0, 20000 / max(len(coords), 1)))
        if values is None:
            ax.scatter(coords[:, 0], coords[:, 1], s=size, linewidths=0)
        else:
            vals = np.asarray(values, dtype=object)
            numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                          for v in vals[:1000])
            if numeric:
                sc = ax.scatter(coords[:, 0], coords[:, 1], c=vals.astype(float), s=size,
                                linewidths=0, cmap="viridis")
                fig.colorbar(sc, ax=ax, label=legend_title)
            else:
                cats = sorted({str(v) for v in vals})
                import matplotlib

                cmap = matplotlib.colormaps["tab20" if len(cats) > 10 else "tab10"]
                strs = np.array([str(v) for v in vals])
                for i, c in enumerate(cats):
                    m = strs == c
                    ax.scatter(coords[m, 0], coords[m, 1], s=size, linewidths=0,
                               color=cmap(i % cmap.N), label=c)
                if len(cats) <= 30:
                    ax.legend(title=legend_title, markerscale=max(1, 6 / size), fontsize=7,
                              bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        if title:
            ax.set_title(title)


def roc_png(curves: list[tuple[np.ndarray, np.ndarray, str]], path: str | Path, title: str = "") -> None:
    """ROC curves: a list of (false positive rate, true positive rate, legend label)."""
    with png_figure(path, size=(5.5, 5)) as (fig, ax):
        for fpr, tpr, label in curves:
            ax.plot(fpr, tpr, label=label, linewidth=1.2)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=8, loc="lower right")
        if title:
            ax.set_title(title)


def bar_png(names: list[str], values, path: str | Path, title: str = "", xlabel: str = "",
            errors=None) -> None:
    """Horizontal bars, first name on top (e.g. genes ranked by importance)."""
    with png_figure(path, size=bar_size(len(names))) as (fig, ax):
        draw_bars(ax, names, values, title, xlabel, errors)


def bar_size(n_bars: int) -> tuple[float, float]:
    return (6, max(3.0, 0.28 * n_bars + 1.2))


def draw_bars(ax, names: list[str], values, title: str = "", xlabel: str = "", errors=None) -> None:
    values = np.asarray(values, dtype=float)
    y = np.arange(len(names))[::-1]
    ax.barh(y, values, xerr=errors, color="#4477aa")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)


def curve_png(series: dict[str, tuple[list, list]], path: str | Path, xlabel: str = "step",
              ylabel: str = "", title: str = "") -> None:
    """Line plot of named (x, y) series, e.g. validation macro-F1 per evaluation."""
    with png_figure(path, size=(6, 4)) as (fig, ax):
        for name, (x, y) in series.items():
            ax.plot(x, y, marker="o", markersize=3, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if len(series) > 1:
            ax.legend()
        if title:
            ax.set_title(title)
