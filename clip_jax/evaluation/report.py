"""Writing evaluation results: results.json, a Markdown summary (results.md) and PNG plots
(zero-shot vs k-shot linear probes as in the CLIP paper, per-dataset bars, prompt modes,
ImageNet accuracy against accuracy under distribution shift), and pictures of a few test images
with their top-5 zero-shot classes and, for caption models, their generated captions."""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any

import numpy as np
from etils import epath

JSON_FILE = "results.json"
MARKDOWN_FILE = "results.md"
PLOT_FILES = {
    "few_shot": "zero_shot_vs_few_shot.png",
    "per_dataset": "per_dataset.png",
    "prompt_modes": "prompt_modes.png",
    "robustness": "effective_robustness.png",
}
# Pictures of example images (results["examples"], the images given to write_report).
EXAMPLE_FILES = {"zero_shot": "zero_shot_examples.png", "captions": "captions.png"}


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def write_json(results: dict[str, Any], output_dir: str | os.PathLike) -> str:
    path = epath.Path(output_dir) / JSON_FILE
    path.write_text(json.dumps(_json_ready(results), indent=2))
    return os.fspath(path)


def _percent(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _best_mode(entry: dict[str, Any]) -> str | None:
    for mode in ("ensemble", "single", "class_name"):
        if mode in entry:
            return mode
    return None


def markdown_summary(results: dict[str, Any]) -> str:
    """Tables in percent: zero-shot per prompt mode, retrieval recall@k, linear probe, few-shot,
    robustness; one section per task present."""
    lines = ["# Evaluation results", ""]
    if "checkpoint" in results:
        lines += [f"Checkpoint: `{results['checkpoint']}`", ""]
    zero_shot = results.get("zero_shot") or {}
    if zero_shot:
        lines += _zero_shot_table(zero_shot)
    if results.get("retrieval"):
        lines += _retrieval_table(results["retrieval"])
    if results.get("linear_probe"):
        lines += _linear_probe_table(results["linear_probe"])
    if results.get("few_shot"):
        lines += _few_shot_table(results["few_shot"], zero_shot)
    if results.get("robustness"):
        lines += _robustness_table(results["robustness"])
    examples = results.get("examples") or {}
    if examples.get("captions"):
        lines += _captions_table(examples)
    if results.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {entry}" for entry in results["skipped"]] + [""]
    return "\n".join(lines)


def _zero_shot_table(zero_shot: dict[str, Any]) -> list[str]:
    modes = [m for m in ("class_name", "single", "ensemble") if any(m in entry for entry in zero_shot.values())]
    objectives = sorted({entry.get("objective", "contrastive") for entry in zero_shot.values()})
    lines = [
        f"## Zero-shot classification (top-1 %, top-5 % of the richest prompts; scored by {', '.join(objectives)})",
        "",
    ]
    lines += [
        "| dataset | "
        + " | ".join(f"top-1 {m}" for m in modes)
        + " | top-5 | mean per-class recall | classes | images |"
    ]
    lines += ["|---" * (len(modes) + 5) + "|"]
    for name, entry in zero_shot.items():
        best = entry[_best_mode(entry)]
        cells = [_percent(entry[m]["top1"]) if m in entry else "–" for m in modes]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {_percent(best.get('top5'))} | {_percent(best['mean_per_class_recall'])} | {best['num_classes']} | {best['num_examples']} |"
        )
    lines.append("")
    return lines


def _retrieval_table(retrieval: dict[str, Any]) -> list[str]:
    lines = ["## Retrieval (recall %)", ""]
    names = [k for k in next(iter(retrieval.values())) if "R@" in k]
    lines += ["| dataset | " + " | ".join(names) + " | images | captions |", "|---" * (len(names) + 3) + "|"]
    for name, entry in retrieval.items():
        lines.append(
            f"| {name} | "
            + " | ".join(_percent(entry[k]) for k in names)
            + f" | {entry['num_images']} | {entry['num_texts']} |"
        )
    lines.append("")
    return lines


def _linear_probe_table(linear_probe: dict[str, Any]) -> list[str]:
    lines = ["## Linear probe (L-BFGS logistic regression, L2 chosen on a validation split)", ""]
    lines += [
        "| dataset | top-1 | top-5 | mean per-class recall | L2 | training images |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in linear_probe.items():
        lines.append(
            f"| {name} | {_percent(entry['top1'])} | {_percent(entry.get('top5'))} | "
            f"{_percent(entry['mean_per_class_recall'])} | {entry['l2']:.3g} | {entry['num_train']} |"
        )
    lines.append("")
    return lines


def _shot_run(entry: dict[str, Any], k: int) -> dict[str, Any] | None:
    """The k-shot run of a few-shot entry, keyed by int in memory and by str once read from JSON."""
    return entry["shots"].get(k) or entry["shots"].get(str(k))


def _few_shot_table(few_shot: dict[str, Any], zero_shot: dict[str, Any]) -> list[str]:
    shots = sorted({int(k) for entry in few_shot.values() for k in entry["shots"]})
    lines = ["## Few-shot linear probes (top-1 %, mean ± std over seeds) against zero-shot", ""]
    lines += [
        "| dataset | zero-shot | " + " | ".join(f"{k}-shot" for k in shots) + " |",
        "|---" * (len(shots) + 2) + "|",
    ]
    for name, entry in few_shot.items():
        zero = zero_shot.get(name, {})
        zero_cell = _percent(zero[_best_mode(zero)]["top1"]) if _best_mode(zero) else "–"
        cells = []
        for k in shots:
            run = _shot_run(entry, k)
            cells.append(f"{_percent(run['top1_mean'])} ± {_percent(run['top1_std'])}" if run else "–")
        lines.append(f"| {name} | {zero_cell} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _robustness_table(summary: dict[str, Any]) -> list[str]:
    lines = ["## Robustness to distribution shift (zero-shot top-1 %)", ""]
    lines += [
        "| ImageNet | " + " | ".join(summary["shift_top1"]) + " | mean of shifts |",
        "|---" * (len(summary["shift_top1"]) + 2) + "|",
    ]
    lines.append(
        f"| {_percent(summary['imagenet_top1'])} | "
        + " | ".join(_percent(v) for v in summary["shift_top1"].values())
        + f" | {_percent(summary['mean_shift_top1'])} |"
    )
    lines.append("")
    return lines


def _captions_table(examples: dict[str, Any]) -> list[str]:
    lines = [f"## Generated captions ({examples['dataset']}, {examples.get('caption_method', 'greedy')})", ""]
    lines += ["| image | label | caption |", "|---|---|---|"]
    for index, (label, caption) in enumerate(zip(examples["labels"], examples["captions"])):
        lines.append(f"| {index} | {label} | {caption.replace('|', '/')} |")
    lines.append("")
    return lines


def write_markdown(results: dict[str, Any], output_dir: str | os.PathLike) -> str:
    path = epath.Path(output_dir) / MARKDOWN_FILE
    path.write_text(markdown_summary(results))
    return os.fspath(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def check_plotting_available() -> None:
    """Fail before a long evaluation, not after it, when matplotlib is missing."""
    try:
        _pyplot()
    except ImportError as error:
        raise ImportError("PNG plots need matplotlib: pip install matplotlib (or pass --noplots)") from error


def write_plots(results: dict[str, Any], output_dir: str | os.PathLike) -> list[str]:
    """The PNGs the results allow; returns their paths."""
    plt = _pyplot()
    zero_shot = results.get("zero_shot") or {}
    figures = {
        "few_shot": _few_shot_figure(plt, results.get("few_shot"), zero_shot),
        "per_dataset": _per_dataset_figure(plt, zero_shot, results.get("linear_probe") or {}),
        "prompt_modes": _prompt_modes_figure(plt, zero_shot),
        "robustness": _robustness_figure(plt, results.get("robustness")),
    }
    return [_save(figure, output_dir, PLOT_FILES[kind]) for kind, figure in figures.items() if figure is not None]


def _few_shot_figure(plt: Any, few_shot: dict[str, Any] | None, zero_shot: dict[str, Any]) -> Any:
    """The paper's figure: k-shot linear probes against zero-shot (drawn at k = 0 and as a line)."""
    if not few_shot:
        return None
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for index, (name, entry) in enumerate(few_shot.items()):
        color = f"C{index % 10}"
        shots = sorted(int(k) for k in entry["shots"])
        runs = [_shot_run(entry, k) for k in shots]
        means = np.array([100 * run["top1_mean"] for run in runs])
        stds = np.array([100 * run["top1_std"] for run in runs])
        axis.errorbar(shots, means, yerr=stds, marker="o", color=color, capsize=3, label=f"{name}: k-shot linear probe")
        axis.fill_between(shots, means - stds, means + stds, color=color, alpha=0.15)
        mode = _best_mode(zero_shot.get(name, {}))
        if mode:
            value = 100 * zero_shot[name][mode]["top1"]
            axis.axhline(value, color=color, linestyle="--", label=f"{name}: zero-shot ({mode})")
    axis.set_xscale("log", base=2)
    all_shots = sorted({int(k) for entry in few_shot.values() for k in entry["shots"]})
    axis.set_xticks(all_shots, [str(k) for k in all_shots])
    axis.set_xlabel("labelled training examples per class")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title("Zero-shot vs few-shot linear probes")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def _grouped_bars(plt: Any, series: dict[str, list[float]], datasets: list[str], ylabel: str, title: str) -> Any:
    """One group of bars per dataset, one bar per labelled series."""
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(datasets) + 2), 4))
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        positions = np.arange(len(datasets)) + (index - (len(series) - 1) / 2) * width
        axis.bar(positions, values, width, label=label)
    axis.set_xticks(np.arange(len(datasets)), datasets, rotation=30, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    return figure


def _per_dataset_figure(plt: Any, zero_shot: dict[str, Any], linear_probe: dict[str, Any]) -> Any:
    bars: dict[str, dict[str, float]] = {}
    for name, entry in zero_shot.items():
        mode = _best_mode(entry)
        if mode:
            bars.setdefault("zero-shot", {})[name] = 100 * entry[mode]["top1"]
    for name, entry in linear_probe.items():
        bars.setdefault("linear probe", {})[name] = 100 * entry["top1"]
    if not bars:
        return None
    datasets = list(dict.fromkeys(name for series in bars.values() for name in series))
    series = {label: [values.get(name, 0.0) for name in datasets] for label, values in bars.items()}
    return _grouped_bars(plt, series, datasets, "top-1 accuracy (%)", "Accuracy per dataset")


def _prompt_modes_figure(plt: Any, zero_shot: dict[str, Any]) -> Any:
    modes = [m for m in ("class_name", "single", "ensemble") if any(m in entry for entry in zero_shot.values())]
    if len(modes) <= 1:
        return None
    datasets = list(zero_shot)
    series = {
        mode.replace("_", " "): [
            100 * zero_shot[name][mode]["top1"] if mode in zero_shot[name] else 0.0 for name in datasets
        ]
        for mode in modes
    }
    return _grouped_bars(
        plt, series, datasets, "zero-shot top-1 accuracy (%)", "Prompts: class name only, one template, ensemble"
    )


def _robustness_figure(plt: Any, summary: dict[str, Any] | None) -> Any:
    if not summary:
        return None
    figure, axis = plt.subplots(figsize=(5, 5))
    reference = 100 * summary["imagenet_top1"]
    limit = max([reference, *[100 * v for v in summary["shift_top1"].values()], 1.0]) * 1.1
    axis.plot([0, limit], [0, limit], "k--", linewidth=1, label="y = x (perfectly robust)")
    for index, (name, value) in enumerate(summary["shift_top1"].items()):
        axis.scatter([reference], [100 * value], color=f"C{index}", label=name, zorder=3)
    axis.set_xlim(0, limit)
    axis.set_ylim(0, limit)
    axis.set_xlabel("ImageNet top-1 (%)")
    axis.set_ylabel("top-1 under distribution shift (%)")
    axis.set_title("Effective robustness")
    axis.legend(fontsize=8)
    return figure


def _save(figure: Any, output_dir: str | os.PathLike, filename: str) -> str:
    path = epath.Path(output_dir) / filename
    figure.tight_layout()
    with path.open("wb") as file:  # a file object: the output directory may be remote
        figure.savefig(file, format="png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return os.fspath(path)


def _wrapped(text: str, width: int = 28, lines: int = 3) -> str:
    return "\n".join(textwrap.wrap(text, width)[:lines]) or "(empty)"


def write_example_pictures(examples: dict[str, Any], images: np.ndarray, output_dir: str | os.PathLike) -> list[str]:
    """zero_shot_examples.png (each image beside horizontal bars of its top-5 classes and their
    probabilities, as in OpenAI's CLIP notebook) and, when `examples` holds captions, captions.png
    (each image under its generated caption). `examples` as results["examples"]
    (`clip_jax.evaluation.suite.collect_examples`); `images` uint8 (n, H, W, 3) in the same order."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(examples["top5"]):
        raise ValueError(
            f"expected uint8 images (n, H, W, 3), one per example ({len(examples['top5'])}), got {images.dtype} {images.shape}"
        )
    plt = _pyplot()
    written = []
    count = len(images)
    pairs_per_row = 2
    rows = math.ceil(count / pairs_per_row)
    figure, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(12, 2.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index in range(count):
        image_axis, bar_axis = axes[
            index // pairs_per_row, 2 * (index % pairs_per_row) : 2 * (index % pairs_per_row) + 2
        ]
        image_axis.imshow(images[index])
        image_axis.set_title(_wrapped(str(examples["labels"][index])), fontsize=8)
        names = [str(name) for name, _ in examples["top5"][index]]
        probabilities = [100 * float(probability) for _, probability in examples["top5"][index]]
        positions = np.arange(len(names))
        bar_axis.axis("on")
        colors = ["C2" if name == examples["labels"][index] else "C0" for name in names]
        bar_axis.barh(positions, probabilities, color=colors)
        bar_axis.set_yticks(positions, [_wrapped(name, 24, 1) for name in names], fontsize=7)
        bar_axis.invert_yaxis()  # the likeliest class on top
        bar_axis.set_xlim(0, 100)
        bar_axis.set_xlabel("probability (%)", fontsize=7)
        bar_axis.tick_params(axis="x", labelsize=7)
    figure.suptitle(f"Zero-shot top-5 on {examples['dataset']} ({examples['objective']}); green: the true class")
    written.append(_save(figure, output_dir, EXAMPLE_FILES["zero_shot"]))
    if examples.get("captions"):
        columns = min(count, 4)
        rows = math.ceil(count / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.7 * rows), squeeze=False)
        for axis in axes.flat:
            axis.axis("off")
        for index, caption in enumerate(examples["captions"]):
            axis = axes[index // columns, index % columns]
            axis.imshow(images[index])
            axis.set_title(_wrapped(caption), fontsize=8)
        figure.suptitle(f"Generated captions ({examples['dataset']}, {examples.get('caption_method', 'greedy')})")
        written.append(_save(figure, output_dir, EXAMPLE_FILES["captions"]))
    return written


def write_report(
    results: dict[str, Any],
    output_dir: str | os.PathLike,
    plots: bool = True,
    example_images: np.ndarray | None = None,
) -> list[str]:
    """results.json, results.md and (when `plots`) the PNGs into `output_dir` (local or remote);
    returns the paths. `example_images` (uint8, those of results["examples"]) adds the pictures of
    `write_example_pictures`."""
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    paths = [write_json(results, output_dir), write_markdown(results, output_dir)]
    if plots:
        paths += write_plots(results, output_dir)
        if example_images is not None and results.get("examples"):
            paths += write_example_pictures(results["examples"], example_images, output_dir)
    return paths
