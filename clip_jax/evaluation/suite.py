"""Running the evaluation tasks (zero-shot, retrieval, linear probe, few-shot) over datasets for one
model: what `evaluate.py` runs, and what a training loop can call every N steps.

Datasets: "synthetic" (the built-in shapes: zero-shot on the held-out colour x shape combinations,
retrieval on validation captions), "synthetic_seen" (validation images of the combinations seen in
training), TFDS classification datasets (clip_jax.data.classification) and TFDS image-caption
datasets ("coco_captions") for retrieval.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from clip_jax import captioning, transforms
from clip_jax.data.classification import load_classification
from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from clip_jax.data.templates import (
    DATASET_PROMPTS,
    IMAGENET_CLASS_SUBSETS,
    PHOTO_TEMPLATES,
    PROMPT_MODES,
    DatasetPrompts,
    Template,
    get_prompts,
    synthetic_prompts,
)
from clip_jax.evaluation import linear_probe as probes
from clip_jax.evaluation import retrieval
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
from clip_jax.models import CLIP

TASKS: tuple[str, ...] = ("zero_shot", "retrieval", "linear_probe", "few_shot")
# "auto": the objective the model was trained with (see resolve_zero_shot_objective).
ZERO_SHOT_OBJECTIVES: tuple[str, ...] = ("auto", *OBJECTIVES)
PROBE_TASKS: tuple[str, ...] = ("linear_probe", "few_shot")
SYNTHETIC_DATASETS: tuple[str, ...] = ("synthetic", "synthetic_seen")
# Image-caption datasets and the split retrieval is scored on (COCO: the 5k Karpathy test split).
RETRIEVAL_SPLITS: dict[str, str] = {"coco_captions": "test"}
IMAGENET = "imagenet2012"
IMAGENET_SHIFTS: tuple[str, ...] = ("imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch")
# The presets `evaluate.py --preset` names: the tasks and datasets each runs.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "robustness": {"tasks": ("zero_shot",), "datasets": (IMAGENET, *IMAGENET_SHIFTS)},
}
# Test-only datasets: no split to fit linear / few-shot probes on.
WITHOUT_TRAIN_SPLIT: tuple[str, ...] = (*IMAGENET_SHIFTS, "imagenet2012_real")

# Synthetic images per split when `max_examples` / `max_train_examples` are not set.
# Classification: 8,192 test images put the standard error of a top-1 near 0.5 points, and that of
# the gap between two prompt modes (scored on the same images) at 0.25 to 0.4.
SYNTHETIC_TEST_EXAMPLES = 8192
SYNTHETIC_RETRIEVAL_EXAMPLES = 1024  # images (and their captions) ranked against each other
SYNTHETIC_TRAIN_EXAMPLES = 2048


def known_datasets() -> tuple[str, ...]:
    """Every dataset name the suite can evaluate on (a TFDS name may carry ":version")."""
    return (*SYNTHETIC_DATASETS, *RETRIEVAL_SPLITS, *DATASET_PROMPTS)


def is_known_dataset(name: str) -> bool:
    return name in SYNTHETIC_DATASETS or name.split(":")[0].split("/")[0] in known_datasets()


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
    # How zero-shot scores classes: "contrastive", "caption" (CapPa), "bag_of_words", or "auto".
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
    "auto": with `trained` (the objectives the model was trained with, from its training record),
    contrastive if it was trained contrastively, else caption, else bag of words; without a
    record, the heads decide: caption for a model with a decoder, bag of words for one with
    that head only, contrastive otherwise."""
    if requested != "auto":
        return check_objective(model, requested)
    decoder = getattr(model.config, "decoder", None) is not None
    bag_of_words = bool(getattr(model.config, "bag_of_words", False))
    if trained is not None:
        unknown = sorted(set(trained) - set(OBJECTIVES))
        if unknown or not trained:
            raise ValueError(f"unknown trained objective(s) {unknown or list(trained)}; expected some of {OBJECTIVES}")
        for objective in OBJECTIVES:
            if objective in trained:
                return check_objective(model, objective)
    if decoder:
        return "caption"
    return "bag_of_words" if bag_of_words else "contrastive"


@dataclasses.dataclass
class _Classification:
    """A classification dataset made uniform: prompts, test / train batch streams, scored classes."""

    name: str
    prompts: DatasetPrompts
    test_batches: Callable[[int], Iterator[dict[str, Any]]]  # batch size -> stream
    train_batches: Callable[[int], Iterator[dict[str, Any]]] | None
    class_subset: Sequence[int] | None  # the classes predictions are made among; None: all
    process_local: bool  # True: each process streams its own share
    test_limit: int | None
    train_limit: int | None
    # Images whose label lies outside the dataset's classes (ImageNet-R / -A: outside their 200),
    # left out of the scores; a list so the test stream can count into it as it goes.
    outside_classes: list[int] = dataclasses.field(default_factory=lambda: [0])


def _synthetic_stream(dataset: Any, split: str, start: int, count: int) -> Callable[[int], Iterator[dict]]:
    def stream(batch_size: int) -> Iterator[dict[str, Any]]:
        for first in range(start, start + count, batch_size):
            yield dataset.get_batch(split, np.arange(first, min(first + batch_size, start + count)))

    return stream


def _synthetic_classification(name: str, dataset: Any, settings: EvaluationSettings) -> _Classification:
    test_count = settings.max_examples or SYNTHETIC_TEST_EXAMPLES
    train_count = settings.max_train_examples or SYNTHETIC_TRAIN_EXAMPLES
    # "synthetic": the held-out combinations, the task of the built-in default (compositional
    # transfer); "synthetic_seen": combinations seen in training. Probes learn from other
    # examples of the same split (indices after the test examples).
    split, classes = (
        ("held_out", dataset.held_out_labels) if name == "synthetic" else ("validation", dataset.train_labels)
    )
    return _Classification(
        name=name,
        prompts=synthetic_prompts(dataset),
        test_batches=_synthetic_stream(dataset, split, 0, test_count),
        train_batches=_synthetic_stream(dataset, split, test_count, train_count),
        class_subset=[int(label) for label in classes],
        process_local=False,
        test_limit=test_count,
        train_limit=train_count,
    )


def _tfds_classification(name: str, settings: EvaluationSettings, image_size: int) -> _Classification:
    def open_split(split: str | None) -> Any:
        return load_classification(
            name, split, settings.data_dir, reader=settings.tfds_reader, image_decoder=settings.tfds_image_decoder
        )

    test = open_split(None)
    try:
        prompts = get_prompts(name)
        if len(prompts.class_names) != test.num_classes:
            raise ValueError(
                f"{name!r} has {test.num_classes} classes, the templates module {len(prompts.class_names)}"
            )
    except ValueError:
        # A dataset without curated prompts: its own (readable) label names and ImageNet-style prompts.
        prompts = DatasetPrompts(tuple(test.class_names), PHOTO_TEMPLATES)
    outside_classes = [0]
    test_batches = _streamer(test, settings, image_size)
    subset = class_subset_labels(name, test.label_names)
    if subset is not None:
        # ImageNet-R / -A: a classifier of their 200 classes, and labels mapped into them.
        prompts = DatasetPrompts(
            tuple(prompts.class_names[label] for label in subset), prompts.templates, prompts.single_template
        )
        test_batches = _labels_mapped_into(test_batches, subset, test.num_classes, outside_classes)
    train = None
    if test.split != "train" and name.split(":")[0] not in WITHOUT_TRAIN_SPLIT:
        try:
            train = open_split("train")
        except ValueError:
            train = None  # no training split (the ImageNet shift sets): no probes

    return _Classification(
        name=name,
        prompts=prompts,
        test_batches=test_batches,
        train_batches=_streamer(train, settings, image_size) if train is not None else None,
        class_subset=None,
        process_local=True,
        test_limit=settings.max_examples,
        train_limit=settings.max_train_examples,
        outside_classes=outside_classes,
    )


def _streamer(split_dataset: Any, settings: EvaluationSettings, image_size: int) -> Callable[[int], Iterator[dict]]:
    options = {} if settings.tfds_worker_kind is None else {"worker_kind": settings.tfds_worker_kind}
    return lambda batch_size: split_dataset.batches(
        image_size, batch_size, jax.process_index(), jax.process_count(), **options
    )


def class_subset_labels(name: str, label_names: Sequence[str]) -> list[int] | None:
    """The labels (indices into `label_names`, ascending) of the classes dataset `name` is scored on:
    ImageNet-R's and -A's 200 (IMAGENET_CLASS_SUBSETS); None for a dataset scored on all its labels."""
    wnids = IMAGENET_CLASS_SUBSETS.get(name.split(":")[0])
    if wnids is None:
        return None
    positions = {label_name: label for label, label_name in enumerate(label_names)}
    missing = [wnid for wnid in wnids if wnid not in positions]
    if missing:
        raise ValueError(
            f"{name!r}: {len(missing)} of its {len(wnids)} classes are not among the dataset's label names "
            f"(e.g. {missing[:3]}); expected ImageNet's WordNet ids, got e.g. {list(label_names[:3])}"
        )
    return sorted(positions[wnid] for wnid in wnids)


def _labels_mapped_into(
    stream: Callable[[int], Iterator[dict]], subset: Sequence[int], num_labels: int, outside_classes: list[int]
) -> Callable[[int], Iterator[dict]]:
    """`stream` with labels mapped to their positions in `subset`; images labelled outside it (none on
    the real ImageNet-R / -A) are masked out and counted into outside_classes[0]."""
    mapping = np.full(num_labels, -1, np.int64)
    mapping[np.asarray(subset)] = np.arange(len(subset))

    def mapped(batch_size: int) -> Iterator[dict[str, Any]]:
        outside_classes[0] = 0
        for batch in stream(batch_size):
            labels = mapping[np.asarray(batch["labels"])]
            valid = np.asarray(batch["mask"], bool) if batch.get("mask") is not None else np.ones(len(labels), bool)
            outside = valid & (labels < 0)
            outside_classes[0] += int(outside.sum())
            yield {**batch, "labels": np.maximum(labels, 0).astype(np.int32), "mask": valid & ~outside}

    return mapped


def _features(
    encoder: Encoder, data: _Classification, stream: Callable, limit: int | None
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
    data: _Classification,
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
    encoder: Encoder, classifiers: _ClassifierCache, data: _Classification, modes: dict[str, Sequence[Template]]
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
    data: _Classification,
    settings: EvaluationSettings,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Zero-shot (every prompt mode) and the probes of one classification dataset, sharing the
    test features."""
    results: dict[str, Any] = {}
    started = time.time()
    test_features, test_labels = _features(encoder, data, data.test_batches, data.test_limit)
    subset = None if data.class_subset is None else list(data.class_subset)
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
                    train_features,
                    train_labels,
                    test_features,
                    test_labels,
                    num_classes,
                    class_subset=subset,
                    mesh=encoder.mesh,
                )
                log(
                    f"{data.name}: linear probe top-1 {results['linear_probe']['top1']:.4f} (L2 {results['linear_probe']['l2']:.3g})"
                )
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


def _retrieval_batches(
    name: str, dataset: Any, settings: EvaluationSettings, image_size: int
) -> Callable[[int], Iterator[dict]]:
    if name == "synthetic":
        count = settings.max_examples or SYNTHETIC_RETRIEVAL_EXAMPLES

        def stream(batch_size: int) -> Iterator[dict[str, Any]]:
            for first in range(0, count, batch_size):
                batch = dataset.get_batch("validation", np.arange(first, min(first + batch_size, count)))
                yield {"images": batch["images"], "captions": batch["captions"]}

        return stream
    base = name.split(":")[0]
    split = RETRIEVAL_SPLITS[base]
    return lambda batch_size: retrieval.tfds_caption_batches(
        name, split, image_size, batch_size, settings.data_dir, max_images=settings.max_examples
    )


def _is_classification(name: str) -> bool:
    return name.split(":")[0] not in RETRIEVAL_SPLITS


def _is_retrieval(name: str) -> bool:
    return name == "synthetic" or name.split(":")[0] in RETRIEVAL_SPLITS


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
    if synthetic is None and any(name in SYNTHETIC_DATASETS for name in settings.datasets):
        synthetic = SyntheticShapes(SyntheticShapesConfig(image_size=image_size))
    if synthetic is not None and synthetic.config.image_size != image_size:
        raise ValueError(
            f"the synthetic dataset draws {synthetic.config.image_size}px images, the model takes {image_size}px"
        )
    results: dict[str, Any] = {task: {} for task in settings.tasks}
    skipped: list[str] = []
    classification_tasks = [task for task in settings.tasks if task != "retrieval"]
    objective = resolve_zero_shot_objective(model, settings.zero_shot_objective, trained_objectives)
    classifiers = _ClassifierCache(encoder, tokenizer, objective, variables)
    for name in settings.datasets:
        if "retrieval" in settings.tasks:
            if _is_retrieval(name):
                stream = _retrieval_batches(name, synthetic, settings, image_size)
                started = time.time()
                results["retrieval"][name] = retrieval.retrieval_evaluate_model(
                    encoder, tokenizer, stream(encoder.batch_size)
                )
                log(
                    f"{name}: retrieval image->text R@1 {results['retrieval'][name]['image_to_text_R@1']:.4f}, "
                    f"text->image R@1 {results['retrieval'][name]['text_to_image_R@1']:.4f} ({time.time() - started:.1f}s)"
                )
            else:
                skipped.append(f"retrieval on {name}: not an image-caption dataset")
        if classification_tasks:
            if not _is_classification(name):
                skipped.append(f"{', '.join(classification_tasks)} on {name}: not a classification dataset")
                continue
            if name in SYNTHETIC_DATASETS:
                data = _synthetic_classification(name, synthetic, settings)
            else:
                data = _tfds_classification(name, settings, image_size)
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
    names = [name for name in settings.datasets if _is_classification(name)]
    if not names or count < 1:
        return None
    image_size = model.config.vision.image_size
    if names[0] in SYNTHETIC_DATASETS:
        synthetic = synthetic or SyntheticShapes(SyntheticShapesConfig(image_size=image_size))
        data = _synthetic_classification(names[0], synthetic, settings)
    else:
        data = _tfds_classification(names[0], settings, image_size)
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
