"""The five experiments, one function each: they take a `Context`, write OUTPUT/NAME.md (the table),
OUTPUT/NAME.json (the numbers) and PNG figures, and return the Markdown's path.

Uncertainty: 95% paired bootstrap intervals over the test images (the same resampled rows for every
model and shifted set of an experiment); few-shot also varies the sampled shots over 3 seeds. A
table names an ordering only where the interval of the difference excludes 0.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from clip_jax import losses
from clip_jax.data.templates import PROMPT_MODES
from clip_jax.evaluation import linear_probe as probes
from clip_jax.evaluation import zero_shot
from clip_jax.evaluation.features import preprocess_images
from clip_jax.experiments import clip_runs, plots
from clip_jax.experiments.common import (
    Context,
    bootstrap_indices,
    compare,
    fit_probe,
    fmt_ci,
    interval,
    markdown_table,
    probe_correct,
    zero_shot_correct,
)

SHIFT_TASKS: tuple[str, ...] = ("shape",)


FEW_SHOT_TASKS: tuple[str, ...] = ("shape", "color", "combination", "style")
# The objectives the efficiency experiment compares (loss.name -> the config fields its run sets:
# the heads the objective needs, at the experiment's size); each scores zero-shot as its record says.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "caption": {"model.overrides.decoder": {"width": 64, "heads": 2, "layers": 2}},
    "bag_of_words": {"model.overrides.bag_of_words": True},
    "softmax": {},
}
EFFICIENCY_TASKS: tuple[str, ...] = ("combination", "shape")


def _header(context: Context, title: str, command: str, claim: str, test_examples: int | None = None) -> str:
    sizes = context.sizes
    return (
        f"# {title}\n\n{claim}\n\nCommand: `python -m clip_jax.experiments {command} --output {context.output}"
        f"{' --quick' if sizes.quick else ''}`. {test_examples or sizes.test_examples} test images per set, "
        f"{sizes.probe_examples} probe-training images; top-1 in %, [95% paired bootstrap interval over "
        f"test images, {sizes.bootstrap_samples} resamples].\n\n"
    )


def supervised(context: Context, tasks: tuple[str, ...]) -> str:
    """§4.3, Fig. 5: zero-shot CLIP against a linear probe on a supervised model's features, per task."""
    clip, baseline = context.clip(), context.supervised(context.sizes.supervised)
    rows, data = [], {"tasks": {}}
    for task in tasks:
        num_classes = len(context.dataset.downstream_task(task).class_names)
        test_labels, probe_labels = context.labels(task, "test"), context.labels(task, "probe")
        zero = zero_shot_correct(context, clip, task)
        fitted = fit_probe(context.features(baseline, task, "probe"), probe_labels, num_classes)
        probe = probe_correct(fitted, context.features(baseline, task, "test"), test_labels)
        clip_fitted = fit_probe(context.features(clip, task, "probe"), probe_labels, num_classes)
        clip_probe = probe_correct(clip_fitted, context.features(clip, task, "test"), test_labels)
        resample = bootstrap_indices(len(test_labels), context.sizes.bootstrap_samples)
        entry = {"name": task, "classes": num_classes}
        for name, correct in (("zero_shot", zero), ("supervised_probe", probe), ("clip_probe", clip_probe)):
            entry[name] = (correct.mean(), *interval(correct[resample].mean(axis=1)))
        difference = zero.mean() - probe.mean()
        low, high = interval(zero[resample].mean(axis=1) - probe[resample].mean(axis=1))
        entry.update(difference=difference, low=low, high=high)
        data["tasks"][task] = entry
        rows.append(
            [task, num_classes, fmt_ci(*entry["zero_shot"]), fmt_ci(*entry["supervised_probe"]),
             fmt_ci(difference, low, high), compare(difference, low, high, "zero-shot", "probe"),
             fmt_ci(*entry["clip_probe"])]
        )  # fmt: skip
    data["supervised"] = {"label": baseline.settings.label, "final_loss": float(np.mean(baseline.losses[-20:]))}
    figure = plots.difference_bars(
        list(data["tasks"].values()), "Zero-shot CLIP vs linear probe on supervised features",
        "zero-shot CLIP - linear probe (top-1 points)", plots.output_path(context.output, "supervised"),
    )  # fmt: skip
    markdown = _header(
        context, "Zero-shot CLIP vs a supervised baseline (paper §4.3, Fig. 5)", "supervised",
        "Paper: zero-shot CLIP is competitive with a fully supervised linear classifier on ResNet-50 features, "
        f"winning on 16 of 27 datasets. Here: the same image tower trained with cross-entropy on the colour x "
        f"shape labels ({baseline.settings.label}), its features probed per task; CLIP's own linear probe for reference.",
    )  # fmt: skip
    markdown += markdown_table(
        ["task", "classes", "zero-shot CLIP", "probe on supervised", "difference (points)", "ordering", "CLIP probe"],
        rows,
    )
    markdown += f"\n![zero-shot minus probe]({os.path.basename(figure)})\n"
    return context.write("supervised", markdown, data)


def _shift_correctness(context: Context, task: str) -> tuple[dict[str, dict[str | None, np.ndarray]], dict[str, str]]:
    """Per model (name -> {set: correct}), with kinds (supervised / zero-shot / adapted); every
    probe is fitted on the original distribution's probe images only."""
    clip = context.clip()
    shifts = context.dataset.task_shifts(task)
    sets: list[str | None] = [None, *shifts]
    num_classes = len(context.dataset.downstream_task(task).class_names)
    labels, probe_labels = context.labels(task, "test"), context.labels(task, "probe")
    results: dict[str, dict[str | None, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    results["zero-shot CLIP"] = {shift: zero_shot_correct(context, clip, task, shift=shift) for shift in sets}
    kinds["zero-shot CLIP"] = "zero-shot"
    fitted = fit_probe(context.features(clip, task, "probe"), probe_labels, num_classes)
    results["CLIP + linear probe"] = {
        shift: probe_correct(fitted, context.features(clip, task, "test", shift), labels) for shift in sets
    }
    kinds["CLIP + linear probe"] = "adapted"
    for settings in context.sizes.shift_models:
        model = context.supervised(settings)
        fitted = fit_probe(context.features(model, task, "probe"), probe_labels, num_classes)
        results[settings.label] = {
            shift: probe_correct(fitted, context.features(model, task, "test", shift), labels) for shift in sets
        }
        kinds[settings.label] = "supervised"
    return results, kinds


def _effective_robustness(results: dict, kinds: dict[str, str], resample: np.ndarray) -> dict[str, Any]:
    """Per bootstrap replicate: original and mean-shifted accuracy of each model, the linear fit to
    the supervised models, and each model's distance above it (effective robustness)."""
    names = list(results)
    original = np.stack([results[name][None][resample].mean(axis=1) for name in names])  # (models, B)
    shifted = np.stack(
        [
            np.mean([results[name][s][resample].mean(axis=1) for s in results[name] if s is not None], axis=0)
            for name in names
        ]
    )
    supervised_rows = [row for row, name in enumerate(names) if kinds[name] == "supervised"]
    slopes, intercepts = _line_fit(original[supervised_rows], shifted[supervised_rows])
    robustness = shifted - (slopes[None] * original + intercepts[None])
    return {"names": names, "robustness": robustness, "gap": shifted - original}


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares lines through the points (x[:, b], y[:, b]) of each column b: (slopes, intercepts);
    a column whose x do not vary gets slope 0."""
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    variance = ((x - x_mean) ** 2).sum(axis=0)
    covariance = ((x - x_mean) * (y - y_mean)).sum(axis=0)
    slopes = np.divide(covariance, variance, out=np.zeros_like(covariance), where=variance > 0)
    return slopes, y_mean - slopes * x_mean


def shift(context: Context, tasks: tuple[str, ...]) -> str:
    """§4.5, Fig. 13/14: effective robustness of zero-shot CLIP, CLIP adapted by a linear probe, and
    supervised models of several sizes and steps, on renderings training never shows."""
    markdown = _header(
        context, "Robustness to distribution shift (paper §4.5, Fig. 13 and 14)", "shift",
        "Paper: zero-shot CLIP models lie far above the line supervised ImageNet models follow from accuracy on "
        "ImageNet to accuracy on its shifted sets (effective robustness), and adapting CLIP to ImageNet with a "
        "linear probe raises ImageNet accuracy but gives some of that robustness back. Here: the shifted sets are "
        "the same test images rendered as training never shows them; each probe is fitted on the original rendering; "
        "effective robustness = mean shifted top-1 minus the linear fit of the supervised models (refitted on each "
        "bootstrap resample).",
    )  # fmt: skip
    data: dict[str, Any] = {}
    for task in tasks:
        results, kinds = _shift_correctness(context, task)
        shifts = [s for s in next(iter(results.values())) if s is not None]
        resample = bootstrap_indices(len(results["zero-shot CLIP"][None]), context.sizes.bootstrap_samples)
        summary = _effective_robustness(results, kinds, resample)
        supervised_names = [n for n in summary["names"] if kinds[n] == "supervised"]
        slope, intercept = _line_fit(
            np.array([[results[n][None].mean()] for n in supervised_names]),
            np.array([[np.mean([results[n][s].mean() for s in shifts])] for n in supervised_names]),
        )
        point_fit = (float(slope[0]), float(intercept[0]))
        rows, points = _shift_rows(results, kinds, shifts, summary, point_fit)
        adapt = _adaptation(results, shifts, resample)
        data[task] = {"points": points, "fit": [float(v) for v in point_fit], "adaptation": adapt}
        markdown += _shift_task_section(context, task, shifts, rows, points, point_fit, adapt)
    return context.write("shift", markdown, data)


def _shift_rows(
    results: dict, kinds: dict[str, str], shifts: list[str], summary: dict, point_fit: tuple[float, float]
) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """The table's rows and the scatter's points of one task, a model each: accuracy per set and the
    effective robustness against the supervised models' fit (with its bootstrap interval)."""
    rows, points = [], []
    for row, name in enumerate(summary["names"]):
        original = results[name][None].mean()
        shifted = float(np.mean([results[name][s].mean() for s in shifts]))
        robust = shifted - (point_fit[0] * original + point_fit[1])
        low, high = interval(summary["robustness"][row])
        verdict = ""
        if kinds[name] != "supervised":
            verdict = (
                "above the supervised fit"
                if low > 0
                else "below the supervised fit"
                if high < 0
                else "no clear difference (interval includes 0)"
            )
        rows.append(
            [name, f"{original * 100:.1f}", *(f"{results[name][s].mean() * 100:.1f}" for s in shifts),
             f"{shifted * 100:.1f}", fmt_ci(robust, low, high), verdict]
        )  # fmt: skip
        points.append({
            "name": name, "kind": kinds[name], "original": float(original), "shifted": shifted,
            "per_shift": {s: float(results[name][s].mean()) for s in shifts},
            "effective_robustness": [float(robust), low, high],
        })  # fmt: skip
    return rows, points


def _shift_task_section(
    context: Context,
    task: str,
    shifts: list[str],
    rows: list[list[str]],
    points: list[dict[str, Any]],
    point_fit: tuple[float, float],
    adapt: dict[str, dict[str, float]],
) -> str:
    """One task's figures (the scatter and the adaptation bars) and its Markdown section."""
    figure = plots.robustness_scatter(
        points, (float(point_fit[0]), float(point_fit[1])), f"Effective robustness: {task} task",
        plots.output_path(context.output, f"shift_{task}"),
    )  # fmt: skip
    bars = plots.difference_bars(
        [{"name": s, **entry} for s, entry in adapt.items()], "Adapting CLIP to the original (linear probe)",
        "CLIP + linear probe - zero-shot CLIP (top-1 points)", plots.output_path(context.output, f"shift_{task}_adapt"),
    )  # fmt: skip
    markdown = f"## Task: {task}\n\n" + markdown_table(
        ["model", "original", *shifts, "mean shifted", "effective robustness (points)", "ordering"], rows
    )
    markdown += f"\nSupervised fit: mean shifted = {point_fit[0]:.2f} x original {point_fit[1]:+.2f}.\n\n"
    markdown += markdown_table(
        ["set", "probe - zero-shot (points)", "ordering"],
        [[s, fmt_ci(e["difference"], e["low"], e["high"]), compare(e["difference"], e["low"], e["high"], "adapted", "zero-shot")]
         for s, e in adapt.items()],
    )  # fmt: skip
    return markdown + f"\n![scatter]({os.path.basename(figure)}) ![adaptation]({os.path.basename(bars)})\n\n"


def _adaptation(results: dict, shifts: list[str], resample: np.ndarray) -> dict[str, dict[str, float]]:
    """Per set (original first), CLIP + linear probe minus zero-shot CLIP, with its interval."""
    adapt = {}
    for name, key in (("original", None), *((s, s) for s in shifts)):
        adapted, zero = results["CLIP + linear probe"][key], results["zero-shot CLIP"][key]
        low, high = interval(adapted[resample].mean(axis=1) - zero[resample].mean(axis=1))
        adapt[name] = {"difference": float(adapted.mean() - zero.mean()), "low": low, "high": high}
    return adapt


def prompts(context: Context, tasks: tuple[str, ...]) -> str:
    """§3.1.4, Fig. 4: the class name alone, one prompt ("a photo of the {}.") and the ensemble."""
    clip = context.clip()
    rows, data = [], {}
    accuracy: dict[str, list[float]] = {mode: [] for mode in PROMPT_MODES}
    for task in tasks:
        correct = {mode: zero_shot_correct(context, clip, task, mode) for mode in PROMPT_MODES}
        resample = bootstrap_indices(len(correct["single"]), context.sizes.bootstrap_samples)
        entry: dict[str, Any] = {mode: float(correct[mode].mean()) for mode in PROMPT_MODES}
        cells = [task, *(f"{entry[mode] * 100:.1f}" for mode in PROMPT_MODES)]
        for first, second in (("single", "class_name"), ("ensemble", "single")):
            difference = entry[first] - entry[second]
            low, high = interval(correct[first][resample].mean(axis=1) - correct[second][resample].mean(axis=1))
            entry[f"{first}-{second}"] = [difference, low, high]
            cells += [fmt_ci(difference, low, high), compare(difference, low, high, first, second)]
        for mode in PROMPT_MODES:
            accuracy[mode].append(entry[mode])
        data[task] = entry
        rows.append(cells)
    figure = plots.grouped_bars(
        list(tasks),
        accuracy,
        "Zero-shot top-1 by prompt mode",
        "top-1 (%)",
        plots.output_path(context.output, "prompts"),
    )
    markdown = _header(
        context, "Prompt engineering and ensembling (paper §3.1.4, Fig. 4)", "prompts",
        "Paper: a prompt template (\"A photo of a {label}.\") beats the bare class name (+1.3 points on ImageNet) and "
        "an ensemble of 80 prompts adds 3.5 more. Here: the same three modes of the evaluation suite, with each "
        "task's templates (clip_jax.data.synthetic.DOWNSTREAM_TASKS).",
    )  # fmt: skip
    markdown += markdown_table(
        ["task", *PROMPT_MODES, "single - class name", "ordering", "ensemble - single", "ordering"], rows
    )
    markdown += f"\n![prompt modes]({os.path.basename(figure)})\n"
    return context.write("prompts", markdown, data)


def few_shot(context: Context, tasks: tuple[str, ...]) -> str:
    """§3.1.5, Fig. 6/7: zero-shot CLIP against k-shot linear probes on its own features."""
    clip = context.clip()
    rows, data, panels, references = [], {}, {}, {}
    for task in tasks:
        num_classes = len(context.dataset.downstream_task(task).class_names)
        probe_labels = context.labels(task, "probe")
        counts = np.bincount(probe_labels, minlength=num_classes)
        shots = [k for k in context.sizes.shots if k <= counts.min()]
        zero = zero_shot_correct(context, clip, task)
        resample = bootstrap_indices(len(zero), context.sizes.bootstrap_samples)
        zero_low, zero_high = interval(zero[resample].mean(axis=1))
        result = probes.few_shot(
            context.features(clip, task, "probe"), probe_labels, context.features(clip, task, "test"),
            context.labels(task, "test"), num_classes, shots=shots, seeds=context.sizes.few_shot_seeds,
        )["shots"]  # fmt: skip
        cells, matched = _few_shot_cells(
            context, (float(zero.mean()), zero_low, zero_high), result, shots, counts.min()
        )
        rows.append([task, fmt_ci(zero.mean(), zero_low, zero_high), *cells])
        panels[task] = {
            "k-shot linear probe": (
                shots,
                [result[k]["top1_mean"] for k in shots],
                [result[k]["top1_std"] for k in shots],
            )
        }
        references[task] = {"zero-shot CLIP": float(zero.mean())}
        data[task] = {"zero_shot": [float(zero.mean()), zero_low, zero_high], "few_shot": result, "matched_at": matched}
    figure = plots.curves(
        panels, references, "labelled examples per class (k)", "Zero-shot CLIP vs few-shot linear probes",
        plots.output_path(context.output, "few_shot"),
    )  # fmt: skip
    markdown = _header(
        context, "Zero-shot vs few-shot (paper §3.1.5, Fig. 6 and 7)", "few_shot",
        "Paper: zero-shot CLIP matches a 4-shot linear probe on its own features (Fig. 6) and a 16-shot probe on "
        "the best ImageNet model's; the shots a probe needs to match zero-shot vary widely by dataset (Fig. 7). "
        "Here: k-shot probes (clip_jax.evaluation.linear_probe.few_shot, mean ± std over seeds); 'zs >' means "
        "zero-shot is better beyond the combined interval, '=' within it.",
    )  # fmt: skip
    markdown += markdown_table(
        ["task", "zero-shot", *(f"{k}-shot" for k in context.sizes.shots), "k from which probes match zero-shot"], rows
    )
    markdown += f"\n![few-shot]({os.path.basename(figure)})\n"
    return context.write("few_shot", markdown, data)


def _few_shot_cells(
    context: Context, zero_interval: tuple[float, float, float], result: dict, shots: list[int], fewest: int
) -> tuple[list[str], int | None]:
    """One task's k-shot cells (each probe against zero-shot) and its last cell: the fewest shots
    from which on no probe is worse than zero-shot (None: no such k). `fewest`: the probe images of
    the rarest class, which bounds k (`shots`: the k it allows)."""
    zero, zero_low, zero_high = zero_interval
    cells, matched = [], None
    for k in context.sizes.shots:
        if k not in shots:
            cells.append(f"- (a class has {fewest} probe images)")
            continue
        mean, std = result[k]["top1_mean"], result[k]["top1_std"]
        # Half-width: the zero-shot interval's and the seeds' (t with n - 1 dof, 95%) in quadrature.
        seeds = len(context.sizes.few_shot_seeds)
        t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(seeds, 2.0)
        half = float(
            np.hypot((zero_high - zero_low) / 2, t * std * np.sqrt(seeds / max(seeds - 1, 1)) / np.sqrt(seeds))
        )
        difference = zero - mean
        order = "=" if abs(difference) <= half else (">" if difference > 0 else "<")
        if order == ">":
            matched = None
        elif matched is None:
            matched = k
        cells.append(f"{mean * 100:.1f} ± {std * 100:.1f} (zs {order})")
    cells.append(f"> {shots[-1] if shots else 0}" if matched is None else f"{matched}")
    return cells, matched


def efficiency(context: Context, tasks: tuple[str, ...]) -> str:
    """§2.3, Fig. 2: zero-shot top-1 against images seen for a transformer caption model, a bag-of-words
    predictor and the contrastive objective, each a run of the default recipe (its loss changed)."""
    sizes = context.sizes
    period = max(1, sizes.efficiency_steps // sizes.efficiency_points)
    steps = list(range(period, sizes.efficiency_steps + 1, period))
    panels: dict[str, dict] = {task: {} for task in tasks}
    data = {}
    final: dict[str, dict[str, np.ndarray]] = {task: {} for task in tasks}
    for loss_name, fields in OBJECTIVES.items():
        objective = losses.get_objective(loss_name).zero_shot
        workdir, batch_size = _efficiency_run(context, loss_name, fields, steps)
        correct = {step: _checkpoint_correct(context, tasks, workdir, step, objective) for step in steps}
        data[loss_name] = {
            task: [[step * batch_size, float(correct[step][task].mean())] for step in steps] for task in tasks
        }
        for task in tasks:
            final[task][loss_name] = correct[steps[-1]][task]
            seen, accuracy = zip(*data[loss_name][task])
            panels[task][f"{loss_name} ({objective})"] = (list(seen), list(accuracy), [0.0] * len(seen))
    rows = _efficiency_rows(context, tasks, data, final)
    figure = plots.curves(
        panels, {}, "images seen", "Zero-shot top-1 vs images seen", plots.output_path(context.output, "efficiency")
    )
    markdown = _header(
        context, "Efficiency of the contrastive objective (paper §2.3, Fig. 2)", "efficiency",
        "Paper: predicting the bag of words of a caption is 3x as efficient as predicting its exact words with a "
        "transformer language model, and the contrastive objective a further 4x (zero-shot ImageNet vs images "
        "processed). Here: the default recipe trained with each loss.name; zero-shot top-1 (the single prompt, on "
        f"the first {context.sizes.efficiency_test_examples} test images) at evenly spaced checkpoints.",
        context.sizes.efficiency_test_examples,
    )  # fmt: skip
    markdown += markdown_table(
        ["task", "loss", *(f"{s} steps" for s in steps), "final [CI]", "contrastive - this", "ordering"], rows,
    )  # fmt: skip
    markdown += f"\n![efficiency]({os.path.basename(figure)})\n"
    return context.write("efficiency", markdown, data)


def _efficiency_run(context: Context, loss_name: str, fields: dict[str, Any], steps: list[int]) -> tuple[str, int]:
    """(workdir, global batch size) of the default recipe trained with `loss_name` and the config
    `fields` its objective needs, a checkpoint kept at each of `steps` (evenly spaced)."""
    sizes = context.sizes
    period = steps[0]  # evenly spaced: every `period` steps
    config = clip_runs.experiment_config(sizes.quick, **{"loss.name": loss_name, **fields})
    config.total_steps = sizes.efficiency_steps
    config.checkpoint.every_steps = period
    config.checkpoint.keep_period = period
    config.checkpoint.max_to_keep = len(steps) + 1
    workdir = clip_runs.trained_workdir(
        config, os.path.join(context.output, "models", f"clip_{loss_name}"), context.log
    )
    return workdir, config.global_batch_size


def _checkpoint_correct(
    context: Context, tasks: tuple[str, ...], workdir: str, step: int, objective: str
) -> dict[str, np.ndarray]:
    """{task: bool (efficiency_test_examples,)}: which test images the checkpoint of `step` classifies
    right zero-shot under `objective`."""
    count = context.sizes.efficiency_test_examples
    model, variables, tokenizer = clip_runs.load_clip(workdir, step)
    correct = {}
    for task in tasks:
        # The single prompt, on the first efficiency_test_examples test images: a caption
        # model scores every (image, class, template) with a decoder pass.
        definition = context.dataset.downstream_task(task)
        images = context.images(task, "test")
        pixels = preprocess_images(images["images"][:count], model.config.vision.image_size)
        scores = zero_shot.zero_shot_scores(
            model, variables, tokenizer, pixels, definition.class_names, (definition.single_template,), objective
        )  # fmt: skip
        correct[task] = np.argmax(np.asarray(scores), axis=1) == images["labels"][:count]
    return correct


def _efficiency_rows(
    context: Context, tasks: tuple[str, ...], data: dict[str, dict], final: dict[str, dict[str, np.ndarray]]
) -> list[list[str]]:
    """A row per task and loss: accuracy at each checkpoint, the final one's interval and, but for
    the contrastive run, its difference from the contrastive run."""
    sizes, rows = context.sizes, []
    for task in tasks:
        resample = bootstrap_indices(sizes.efficiency_test_examples, sizes.bootstrap_samples)
        for loss_name, correct in final[task].items():
            low, high = interval(correct[resample].mean(axis=1))
            cells = [
                task,
                loss_name,
                *(f"{a * 100:.1f}" for _, a in data[loss_name][task]),
                fmt_ci(correct.mean(), low, high),
            ]
            if loss_name != "softmax":
                reference = final[task]["softmax"]
                difference = reference.mean() - correct.mean()
                d_low, d_high = interval(reference[resample].mean(axis=1) - correct[resample].mean(axis=1))
                cells += [
                    fmt_ci(difference, d_low, d_high),
                    compare(difference, d_low, d_high, "contrastive", loss_name),
                ]
            else:
                cells += ["", ""]
            rows.append(cells)
    return rows


COMMANDS = {
    "efficiency": efficiency,
    "supervised": supervised,
    "shift": shift,
    "prompts": prompts,
    "few_shot": few_shot,
}
DEFAULT_TASKS: dict[str, tuple[str, ...]] = {
    "efficiency": EFFICIENCY_TASKS,
    "supervised": ("shape", "color", "combination", "style", "size", "position"),
    "shift": SHIFT_TASKS,
    "prompts": ("shape", "color", "combination", "style", "size", "position"),
    "few_shot": FEW_SHOT_TASKS,
}
