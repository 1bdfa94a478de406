"""The experiments' figures, drawn like the paper's: a sorted bar chart of zero-shot minus linear
probe (Fig. 5), the effective-robustness scatter (Fig. 13) and the adaptation bars (Fig. 14),
prompt modes per task (Fig. 4), few-shot curves against zero-shot (Fig. 6) and zero-shot accuracy
against images seen (Fig. 2). matplotlib is imported inside each function (Agg backend, files only)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

POSITIVE, NEGATIVE = "#3a923a", "#2f6fb0"  # the paper's green (zero-shot wins) and blue


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str) -> str:
    plt = _pyplot()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def difference_bars(rows: Sequence[Mapping[str, Any]], title: str, xlabel: str, path: str) -> str:
    """Horizontal bars of row["difference"] (points) with row["low"], row["high"], sorted, one per row["name"]."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda row: row["difference"])
    figure, axes = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.5))
    values = np.array([row["difference"] for row in rows]) * 100
    errors = np.array([[row["difference"] - row["low"], row["high"] - row["difference"]] for row in rows]).T * 100
    colors = [POSITIVE if value >= 0 else NEGATIVE for value in values]
    axes.barh(range(len(rows)), values, xerr=errors, color=colors, capsize=3)
    axes.set_yticks(range(len(rows)), [row["name"] for row in rows])
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    return _save(figure, path)


def robustness_scatter(points: Sequence[Mapping[str, Any]], fit: tuple[float, float], title: str, path: str) -> str:
    """x = accuracy on the original distribution, y = mean accuracy over shifted sets (one point per
    model, point["kind"] in supervised / zero-shot / adapted; point["per_shift"] small markers);
    the y = x line and the linear fit (slope, intercept) to the supervised models."""
    plt = _pyplot()
    styles = {
        "supervised": ("#2f6fb0", "o", "supervised (linear probe)"),
        "zero-shot": ("#d1495b", "*", "zero-shot CLIP"),
        "adapted": ("#edae49", "D", "CLIP + linear probe (adapted)"),
    }
    figure, axes = plt.subplots(figsize=(6, 5.5))
    shown = set()
    for point in points:
        color, marker, label = styles[point["kind"]]
        axes.scatter(
            [point["original"]] * len(point["per_shift"]),
            list(point["per_shift"].values()),
            color=color,
            alpha=0.25,
            s=12,
        )
        axes.scatter(
            point["original"], point["shifted"], color=color, marker=marker, s=110 if marker == "*" else 50,
            label=None if label in shown else label, edgecolors="black", linewidths=0.5, zorder=3,
        )  # fmt: skip
        shown.add(label)
    grid = np.linspace(0, 1, 50)
    axes.plot(grid, grid, "--", color="grey", label="y = x (perfect robustness)")
    axes.plot(grid, fit[0] * grid + fit[1], "-", color=styles["supervised"][0], alpha=0.7, label="fit to supervised")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("top-1 on the original distribution")
    axes.set_ylabel("top-1 on shifted sets (mean; faint: each)")
    axes.set_title(title)
    axes.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], title: str, ylabel: str, path: str,
                 errors: Mapping[str, Any] | None = None) -> str:  # fmt: skip
    """Bars per group (x) and series (colour), with optional (2, groups) error arrays per series."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / len(series)
    for position, (name, values) in enumerate(series.items()):
        x = np.arange(len(groups)) + (position - (len(series) - 1) / 2) * width
        error = None if errors is None else errors.get(name)
        axes.bar(
            x,
            np.asarray(values) * 100,
            width,
            label=name,
            yerr=None if error is None else np.asarray(error) * 100,
            capsize=2,
        )
    axes.set_xticks(range(len(groups)), groups)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, path)


def curves(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]],
           references: Mapping[str, Mapping[str, float]], xlabel: str, title: str, path: str,
           log_x: bool = True) -> str:  # fmt: skip
    """One panel per key of `panels`: per curve name, (x, mean, spread) as a line with error bars;
    `references[panel][name]` a dashed horizontal line (e.g. zero-shot)."""
    plt = _pyplot()
    figure, all_axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axes, (panel, lines) in zip(all_axes[0], panels.items()):
        for index, (name, (x, mean, spread)) in enumerate(lines.items()):
            color = f"C{index}"
            axes.errorbar(
                x, np.asarray(mean) * 100, yerr=np.asarray(spread) * 100, color=color, marker="o", capsize=2, label=name
            )
            if name in references.get(panel, {}):
                axes.axhline(references[panel][name] * 100, color=color, linestyle="--", alpha=0.7)
        for name, value in references.get(panel, {}).items():
            if name not in lines:
                axes.axhline(value * 100, color="black", linestyle="--", alpha=0.7, label=name)
        if log_x:
            axes.set_xscale("log", base=2)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("top-1 (%)")
        axes.set_title(panel)
        axes.legend(fontsize=7)
    figure.suptitle(title)
    return _save(figure, path)


def output_path(output: str, name: str) -> str:
    return os.path.join(output, name + ".png")
