"""Running the evaluation tasks (zero-shot, retrieval, linear probe, few-shot) over datasets for one
model: what `evaluate.py` runs, and what a training loop can call every N steps.

The datasets (the built-in "synthetic" and "synthetic_seen", TFDS classification datasets, and
TFDS image-caption datasets such as "coco_captions" for retrieval) are clip_jax.evaluation.datasets.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from clip_jax import captioning, transforms
from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from clip_jax.data.templates import PROMPT_MODES, Template
from clip_jax.evaluation import linear_probe as probes
from clip_jax.evaluation import retrieval
from clip_jax.evaluation.datasets import (
    IMAGENET,
    IMAGENET_SHIFTS,
    SYNTHETIC_DATASETS,
    Classification,
    classification_data,
    is_classification,
    is_known_dataset,
    is_retrieval,
    known_datasets,
    retrieval_batches,
    synthetic_at,
)
from clip_jax.evaluation.features import Encoder, extract_image_features, gather_from_processes, preprocess_images
from clip_jax.evaluation.zero_shot import (
    OBJECTIVES,
    check_objective,
    class_embeddings,
    class_probabilities,
    classification_metrics,
    zero_shot_predict,
    zero_shot_scores,
)
from clip_jax.losses import TERM_NEEDS
from clip_jax.models import CLIP

TASKS: tuple[str, ...] = ("zero_shot", "retrieval", "linear_probe", "few_shot")
# "auto": the objective the model was trained with (see resolve_zero_shot_objective).
ZERO_SHOT_OBJECTIVES: tuple[str, ...] = ("auto", *OBJECTIVES)
PROBE_TASKS: tuple[str, ...] = ("linear_probe", "few_shot")
# The presets `evaluate.py --preset` names: the tasks and datasets each runs.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "robustness": {"tasks": ("zero_shot",), "datasets": (IMAGENET, *IMAGENET_SHIFTS)},
}


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """What to evaluate, and how much of each dataset."""

    tasks: tuple[str, ...] = ("zero_shot",)
    datasets: tuple[str, ...] = ("synthetic",)
    prompt_modes: tuple[str, ...] = PROMPT_MODES
    batch_size: int = 256
    max_examples: int | None = None  # test images per dataset; None = the whole split
    max_train_examples: int | None = 10_000  # the probes' training pool; None = the whole split
    shots: tuple[int, ...] = probes.DEFAULT_SHOTS
    seeds: tuple[int, ...] = probes.DEFAULT_SEEDS
    data_dir: str | None = None  # TFDS data directory
    tfds_reader: str = "auto"  # "auto", "data_source" or "tf_data" (clip_jax.data.tfds)
    tfds_image_decoder: str = "pipeline"  # or "tfds"
    # Who decodes TFDS images: "process" (a pool of processes) or "thread" (needed where the data
    # exists only in this process, e.g. under tfds.testing.mock_data). None: the pipeline's default.
    tfds_worker_kind: str | None = None
    # How zero-shot scores classes: with the head of one of zero_shot.OBJECTIVES, or "auto".
    zero_shot_objective: str = "auto"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"unknown task(s) {unknown or list(self.tasks)}; expected some of {TASKS}")
        if not self.datasets:
            raise ValueError("no dataset to evaluate on")
        unknown = [name for name in self.datasets if not is_known_dataset(name)]
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; expected some of {sorted(known_datasets())}")
        unknown = sorted(set(self.prompt_modes) - set(PROMPT_MODES))
        if unknown or not self.prompt_modes:
            raise ValueError(
                f"unknown prompt mode(s) {unknown or list(self.prompt_modes)}; expected some of {PROMPT_MODES}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("max_examples", "max_train_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"shots must be positive, got {self.shots}")
        if not self.seeds:
            raise ValueError("few-shot needs at least one seed")
        if self.zero_shot_objective not in ZERO_SHOT_OBJECTIVES:
            raise ValueError(
                f"unknown zero_shot_objective {self.zero_shot_objective!r}; expected one of {ZERO_SHOT_OBJECTIVES}"
            )


def resolve_zero_shot_objective(model: CLIP, requested: str = "auto", trained: Sequence[str] | None = None) -> str:
    """The objective zero-shot scores with. An explicit one is checked against the model's heads.
    "auto": with `trained` (the zero-shot objectives of the model's training, e.g. the one the
    record of its loss.name names, `losses.Objective.zero_shot`), the first of OBJECTIVES among
    them; without, the heads decide: caption for a model with a decoder, bag of words for one with
    that head only, contrastive otherwise."""
    if requested != "auto":
        return check_objective(model, requested)
    if trained is not None:
        unknown = sorted(set(trained) - set(OBJECTIVES))
        if unknown or not trained:
            raise ValueError(f"unknown trained objective(s) {unknown or list(trained)}; expected some of {OBJECTIVES}")
        for objective in OBJECTIVES:
            if objective in trained:
                return check_objective(model, objective)
    # The first generative head the model has (OBJECTIVES after "contrastive", whose needs it meets).
    contrastive, *generative = OBJECTIVES
    return next(
        (term for term in generative if all(need.met_by(model.config) for need in TERM_NEEDS[term])), contrastive
    )


def _features(
    encoder: Encoder, data: Classification, stream: Callable, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    batch_size = encoder.local_batch_size if data.process_local else encoder.batch_size
    return extract_image_features(encoder, stream(batch_size), max_examples=limit, process_local=data.process_local)


class _ClassifierCache:
    """Class embeddings by (class names, templates): ImageNet and its four shift sets share them.
    Also what zero-shot needs under the other objectives: the objective, the tokenizer and the
    variables as given (the decoder runs where they lie, not replicated over the encoder's mesh)."""

    def __init__(
        self, encoder: Encoder, tokenizer: Callable, objective: str = "contrastive", variables: Any = None
    ) -> None:
        self.encoder, self.tokenizer, self.objective = encoder, tokenizer, objective
        self.variables = encoder.variables if variables is None else variables
        self._cache: dict[tuple, np.ndarray] = {}

    def __call__(self, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        key = (tuple(class_names), tuple(templates))
        if key not in self._cache:
            self._cache[key] = class_embeddings(self.encoder, self.tokenizer, class_names, templates)
        return self._cache[key]


def _zero_shot(
    encoder: Encoder,
    classifiers: _ClassifierCache,
    data: Classification,
    settings: EvaluationSettings,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Zero-shot metrics of one dataset for every prompt mode, under `classifiers.objective`."""
    subset = None if data.class_subset is None else list(data.class_subset)
    modes = {mode: data.prompts.templates_for(mode) for mode in settings.prompt_modes}
    objective = classifiers.objective
    if objective == "contrastive":
        scores = {
            mode: zero_shot_predict(test_features, classifiers(data.prompts.class_names, templates))
            for mode, templates in modes.items()
        }
    else:
        started = time.time()
        scores, labels = _scores_over_stream(encoder, classifiers, data, modes)
        if not np.array_equal(labels, test_labels):
            raise RuntimeError(f"{data.name}: the test stream gave other images the second time it was read")
        log(f"{data.name}: {objective} zero-shot scores of {len(labels)} images in {time.time() - started:.1f}s")
    zero_shot: dict[str, Any] = {"objective": objective}
    for mode in settings.prompt_modes:
        metrics = classification_metrics(scores[mode], test_labels, subset)
        zero_shot[mode] = {**metrics, "num_templates": len(modes[mode])}
        log(f"{data.name}: zero-shot ({mode}, {len(modes[mode])} templates) top-1 {metrics['top1']:.4f}")
    if subset is not None:
        # Among every class too (for the synthetic held-out split: can the model tell the novel
        # combinations apart from the seen ones?).
        best = "ensemble" if "ensemble" in settings.prompt_modes else settings.prompt_modes[-1]
        zero_shot["top1_among_all_classes"] = classification_metrics(scores[best], test_labels, top_k=(1,))["top1"]
        zero_shot["scored_classes"] = len(subset)
        zero_shot["chance_top1"] = 1.0 / len(subset)
    return zero_shot


def _scores_over_stream(
    encoder: Encoder, classifiers: _ClassifierCache, data: Classification, modes: dict[str, Sequence[Template]]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({mode: (n, classes) scores}, labels (n,)) of the test images under a generative objective,
    which scores images rather than their embeddings: one more pass over the test stream, keeping
    the rows (mask, limit) the embedding pass kept, in its order. Every process scores the whole
    batch (the rows of every process, gathered), so the decoder sees the same inputs everywhere."""
    batch_size = encoder.local_batch_size if data.process_local else encoder.batch_size
    scores: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    labels: list[np.ndarray] = []
    kept = 0
    for batch in data.test_batches(batch_size):
        images = preprocess_images(batch["images"], encoder.image_size)
        mask = np.ones(len(images), bool) if batch.get("mask") is None else np.asarray(batch["mask"], bool)
        batch_labels = np.asarray(batch["labels"])
        if data.process_local:
            images, mask, batch_labels = (gather_from_processes(part) for part in (images, mask, batch_labels))
        rows = np.flatnonzero(mask)
        if data.test_limit is not None:
            rows = rows[: data.test_limit - kept]
        for mode, templates in modes.items():
            scores[mode].append(
                zero_shot_scores(
                    encoder.model,
                    classifiers.variables,
                    classifiers.tokenizer,
                    images[rows],
                    data.prompts.class_names,
                    templates,
                    classifiers.objective,
                    batch_size=encoder.batch_size,
                )  # fmt: skip
            )
        labels.append(batch_labels[rows])
        kept += len(rows)
        if data.test_limit is not None and kept >= data.test_limit:
            break
    return {mode: np.concatenate(parts) for mode, parts in scores.items()}, np.concatenate(labels).astype(np.int64)


def evaluate_classification(
    encoder: Encoder,
    classifiers: _ClassifierCache,
    data: Classification,
    settings: EvaluationSettings,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Zero-shot (every prompt mode) and the probes of one classification dataset, sharing the
    test features."""
    results: dict[str, Any] = {}
    started = time.time()
    test_features, test_labels = _features(encoder, data, data.test_batches, data.test_limit)
    log(f"{data.name}: {len(test_labels)} test images embedded in {time.time() - started:.1f}s")
    if data.outside_classes[0]:
        # Counted on this process's share of the stream.
        count = len(data.prompts.class_names)
        log(f"{data.name}: {data.outside_classes[0]} images left out, labelled outside its {count} classes")
    if "zero_shot" in settings.tasks:
        results["zero_shot"] = _zero_shot(encoder, classifiers, data, settings, test_features, test_labels, log)
    wanted_probes = [task for task in PROBE_TASKS if task in settings.tasks]
    if wanted_probes and data.train_batches is None:
        log(f"{data.name}: no training split, linear probe and few-shot skipped")
        results["skipped"] = [f"{task}: no training split" for task in wanted_probes]
    elif wanted_probes:
        results.update(_probes(encoder, data, settings, (test_features, test_labels), log))
    return results


def _probes(
    encoder: Encoder,
    data: Classification,
    settings: EvaluationSettings,
    test: tuple[np.ndarray, np.ndarray],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The linear probe and few-shot results of one dataset with a training split, scored on `test`
    (its test features and labels), and "skipped" (what could not run, and why) when anything could not."""
    test_features, test_labels = test
    results: dict[str, Any] = {}
    subset = None if data.class_subset is None else list(data.class_subset)
    started = time.time()
    train_features, train_labels = _features(encoder, data, data.train_batches, data.train_limit)
    log(f"{data.name}: {len(train_labels)} training images embedded in {time.time() - started:.1f}s")
    num_classes = len(data.prompts.class_names)
    counts = np.bincount(train_labels)
    fewest = int(counts[counts > 0].min())
    skipped = []
    if "linear_probe" in settings.tasks:
        if counts.max() < 2:
            skipped.append("linear_probe: no class has two training images to validate the regularisation on")
        else:
            results["linear_probe"] = probes.linear_probe(
                train_features, train_labels, test_features, test_labels, num_classes,
                class_subset=subset, mesh=encoder.mesh,
            )  # fmt: skip
            probe = results["linear_probe"]
            log(f"{data.name}: linear probe top-1 {probe['top1']:.4f} (L2 {probe['l2']:.3g})")
    if "few_shot" in settings.tasks:
        # Every class of the training pool needs k images for a k-shot sample.
        usable = [k for k in settings.shots if k <= fewest]
        if len(usable) < len(settings.shots):
            skipped.append(
                f"few_shot: shots {sorted(set(settings.shots) - set(usable))}, a class has only {fewest} training images"
            )
        if usable:
            results["few_shot"] = probes.few_shot(
                train_features, train_labels, test_features, test_labels, num_classes,
                shots=usable, seeds=settings.seeds, class_subset=subset, mesh=encoder.mesh,
            )  # fmt: skip
            for k, entry in results["few_shot"]["shots"].items():
                log(f"{data.name}: {k}-shot top-1 {entry['top1_mean']:.4f} +- {entry['top1_std']:.4f}")
    for reason in skipped:
        log(f"{data.name}: {reason}")
    if skipped:
        results["skipped"] = skipped
    return results


def robustness_summary(zero_shot: dict[str, Any]) -> dict[str, Any] | None:
    """ImageNet top-1 beside its shifts' (ensemble prompts, else the last mode evaluated):
    the points of the effective-robustness plot."""
    if IMAGENET not in zero_shot or not any(shift in zero_shot for shift in IMAGENET_SHIFTS):
        return None

    def top1(entry: dict[str, Any]) -> float:
        mode = "ensemble" if "ensemble" in entry else [m for m in PROMPT_MODES if m in entry][-1]
        return float(entry[mode]["top1"])

    shifts = {name: top1(zero_shot[name]) for name in IMAGENET_SHIFTS if name in zero_shot}
    reference = top1(zero_shot[IMAGENET])
    mean_shift = float(np.mean(list(shifts.values())))
    return {
        "imagenet_top1": reference,
        "shift_top1": shifts,
        "mean_shift_top1": mean_shift,
        # What the y = x line would predict minus what the shifts give: a robust model loses little.
        "mean_drop": reference - mean_shift,
    }


def run_evaluation(
    model: CLIP,
    variables: dict[str, Any],
    tokenizer: Callable,
    settings: EvaluationSettings,
    *,
    synthetic: Any | None = None,
    mesh: Mesh | None = None,
    log: Callable[[str], None] = print,
    trained_objectives: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every requested task on every dataset it applies to; results keyed task -> dataset.

    `synthetic` is the built-in dataset (`SyntheticShapes`) the model was trained on (default: the
    default configuration at the model's image size). `mesh`/`variables` as for `Encoder`.
    Zero-shot scores with `settings.zero_shot_objective`; "auto" picks it from `trained_objectives`
    (those of the model's training run, when known) or the model's heads
    (`resolve_zero_shot_objective`); each zero-shot entry records it under "objective".
    """
    encoder = Encoder(model, variables, mesh=mesh, batch_size=settings.batch_size)
    image_size = encoder.image_size
    if synthetic is not None or any(name in SYNTHETIC_DATASETS for name in settings.datasets):
        synthetic = synthetic_at(synthetic, image_size)
    results: dict[str, Any] = {task: {} for task in settings.tasks}
    skipped: list[str] = []
    classification_tasks = [task for task in settings.tasks if task != "retrieval"]
    objective = resolve_zero_shot_objective(model, settings.zero_shot_objective, trained_objectives)
    classifiers = _ClassifierCache(encoder, tokenizer, objective, variables)
    for name in settings.datasets:
        if "retrieval" in settings.tasks:
            if is_retrieval(name):
                stream = retrieval_batches(name, synthetic, settings, image_size)
                results["retrieval"][name] = _retrieval(encoder, tokenizer, name, stream, log)
            else:
                skipped.append(f"retrieval on {name}: not an image-caption dataset")
        if classification_tasks:
            if not is_classification(name):
                skipped.append(f"{', '.join(classification_tasks)} on {name}: not a classification dataset")
                continue
            data = classification_data(name, synthetic, settings, image_size)
            for task, value in evaluate_classification(encoder, classifiers, data, settings, log).items():
                if task == "skipped":
                    skipped.extend(f"{entry} ({name})" for entry in value)
                else:
                    results[task][name] = value
    summary = robustness_summary(results.get("zero_shot", {}))
    if summary is not None:
        results["robustness"] = summary
    if skipped:
        results["skipped"] = skipped
    return results


def _retrieval(
    encoder: Encoder,
    tokenizer: Callable,
    name: str,
    stream: Callable[[int], Iterator[dict]],
    log: Callable[[str], None],
) -> dict[str, float]:
    """Retrieval recalls of one image-caption dataset."""
    started = time.time()
    result = retrieval.retrieval_evaluate_model(encoder, tokenizer, stream(encoder.batch_size))
    log(
        f"{name}: retrieval image->text R@1 {result['image_to_text_R@1']:.4f}, "
        f"text->image R@1 {result['text_to_image_R@1']:.4f} ({time.time() - started:.1f}s)"
    )
    return result


def _displayable(images: np.ndarray) -> np.ndarray:
    """uint8 pictures of a batch: uint8 images as they are, preprocessed float images with the
    evaluation normalisation undone."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    mean, std = np.asarray(transforms.OPENAI_MEAN), np.asarray(transforms.OPENAI_STD)
    return np.clip(np.round((images * std + mean) * 255), 0, 255).astype(np.uint8)


def collect_examples(
    model: CLIP,
    variables: dict[str, Any],
    tokenizer: Callable,
    settings: EvaluationSettings,
    *,
    synthetic: Any | None = None,
    count: int = 8,
    trained_objectives: Sequence[str] | None = None,
    caption_method: str = "greedy",
) -> tuple[dict[str, Any], np.ndarray] | None:
    """(examples, uint8 images (count, H, W, 3)) for the report's pictures: the first `count`
    test images of the first classification dataset of `settings`, their top-5 zero-shot classes
    with probabilities (among the classes the dataset is scored on, with its richest prompts,
    under the objective `run_evaluation` uses) and, for a model with a decoder, their generated
    captions. None when no dataset is a classification dataset. Every process must call it."""
    names = [name for name in settings.datasets if is_classification(name)]
    if not names or count < 1:
        return None
    image_size = model.config.vision.image_size
    data = classification_data(names[0], synthetic, settings, image_size)
    batch = next(iter(data.test_batches(count)))
    images, labels = np.asarray(batch["images"]), np.asarray(batch["labels"])
    mask = np.ones(len(images), bool) if batch.get("mask") is None else np.asarray(batch["mask"], bool)
    if data.process_local:
        images, labels, mask = (gather_from_processes(part) for part in (images, labels, mask))
    images, labels = images[mask][:count], labels[mask][:count]
    objective = resolve_zero_shot_objective(model, settings.zero_shot_objective, trained_objectives)
    mode = next(mode for mode in ("ensemble", "single", "class_name") if mode in settings.prompt_modes)
    classes = list(range(len(data.prompts.class_names))) if data.class_subset is None else list(data.class_subset)
    class_names = [data.prompts.class_names[label] for label in classes]
    preprocessed = preprocess_images(images, image_size)
    scores = zero_shot_scores(
        model, variables, tokenizer, preprocessed, class_names, data.prompts.templates_for(mode), objective,
        batch_size=settings.batch_size,
    )  # fmt: skip
    probabilities = class_probabilities(variables, scores, objective)
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :5]
    examples: dict[str, Any] = {
        "dataset": names[0],
        "objective": objective,
        "prompt_mode": mode,
        "labels": [data.prompts.class_names[int(label)] for label in labels],
        "top5": [[[class_names[c], float(row[c])] for c in order] for row, order in zip(probabilities, top)],
    }
    if getattr(model.config, "decoder", None) is not None:
        examples["captions"] = captioning.generate_captions(
            model, variables, preprocessed, tokenizer, caption_method, batch_size=len(preprocessed)
        )
        examples["caption_method"] = caption_method
    return examples, _displayable(images)


def summary_line(results: dict[str, Any]) -> str:
    """One line of the suite's headline numbers: zero-shot top-1 per dataset and prompt mode,
    retrieval R@1, linear-probe top-1 and the largest few-shot k's top-1."""
    parts = []
    for name, entry in results.get("zero_shot", {}).items():
        modes = [mode for mode in PROMPT_MODES if mode in entry]
        text = f"zero-shot {name} " + " / ".join(f"{mode} {entry[mode]['top1']:.3f}" for mode in modes)
        if "chance_top1" in entry:
            text += f" (chance {entry['chance_top1']:.3f}; among all classes {entry['top1_among_all_classes']:.3f})"
        parts.append(text)
    for name, entry in results.get("retrieval", {}).items():
        recalls = entry["image_to_text_R@1"], entry["text_to_image_R@1"]
        parts.append(f"retrieval {name} R@1 image->text {recalls[0]:.3f}, text->image {recalls[1]:.3f}")
    for name, entry in results.get("linear_probe", {}).items():
        parts.append(f"linear probe {name} {entry['top1']:.3f}")
    for name, entry in results.get("few_shot", {}).items():
        shots = max(entry["shots"], key=int)
        parts.append(f"{shots}-shot {name} {entry['shots'][shots]['top1_mean']:.3f}")
    return "; ".join(parts)


def flatten_metrics(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalar leaves of a results dict as {"zero_shot/synthetic/ensemble/top1": value, ...}, for
    metric writers (lists, such as the L2 sweep and per-seed runs, are left out)."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def synthetic_dataset_for(data_settings: Mapping[str, Any] | None, image_size: int) -> SyntheticShapes:
    """The built-in dataset a model was trained on, at `image_size`.

    `data_settings` is a training run's data config (the "data" section of the record a training
    workdir keeps, `clip_jax.io.training_workdir.read_run_record`): when that run trained on
    "synthetic", its seed and held-out combinations; for any other run, or None (a model that was
    not trained by train.py), the default configuration.
    """
    settings = {}
    if data_settings and data_settings.get("name") == "synthetic":
        settings = {"seed": int(data_settings["seed"]), "num_held_out": int(data_settings["num_held_out"])}
    return SyntheticShapes(SyntheticShapesConfig(image_size=image_size, **settings))
