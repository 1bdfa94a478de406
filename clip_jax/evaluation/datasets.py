"""The datasets the evaluation suite (clip_jax.evaluation.suite) runs on, made uniform: which names
it knows, a classification dataset's prompts, test / train batch streams and scored classes
(`classification_data`), and the image-caption streams of retrieval (`retrieval_batches`).

"synthetic" is the built-in shapes (zero-shot on the held-out colour x shape combinations,
retrieval on validation captions), "synthetic_seen" its validation images of the combinations seen
in training; TFDS classification datasets come through clip_jax.data.classification and TFDS
image-caption datasets ("coco_captions") through clip_jax.evaluation.retrieval. `settings` below is
the suite's `EvaluationSettings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from clip_jax.data.classification import load_classification
from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from clip_jax.data.templates import (
    DATASET_PROMPTS,
    IMAGENET_CLASS_SUBSETS,
    PHOTO_TEMPLATES,
    DatasetPrompts,
    get_prompts,
    synthetic_prompts,
)
from clip_jax.evaluation import retrieval

SYNTHETIC_DATASETS: tuple[str, ...] = ("synthetic", "synthetic_seen")
# Image-caption datasets and the split retrieval is scored on (COCO: the 5k Karpathy test split).
RETRIEVAL_SPLITS: dict[str, str] = {"coco_captions": "test"}
IMAGENET = "imagenet2012"
IMAGENET_SHIFTS: tuple[str, ...] = ("imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch")
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


@dataclasses.dataclass
class Classification:
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


def _synthetic_classification(name: str, dataset: Any, settings: Any) -> Classification:
    test_count = settings.max_examples or SYNTHETIC_TEST_EXAMPLES
    train_count = settings.max_train_examples or SYNTHETIC_TRAIN_EXAMPLES
    # "synthetic": the held-out combinations, the task of the built-in default (compositional
    # transfer); "synthetic_seen": combinations seen in training. Probes learn from other
    # examples of the same split (indices after the test examples).
    split, classes = (
        ("held_out", dataset.held_out_labels) if name == "synthetic" else ("validation", dataset.train_labels)
    )
    return Classification(
        name=name,
        prompts=synthetic_prompts(dataset),
        test_batches=_synthetic_stream(dataset, split, 0, test_count),
        train_batches=_synthetic_stream(dataset, split, test_count, train_count),
        class_subset=[int(label) for label in classes],
        process_local=False,
        test_limit=test_count,
        train_limit=train_count,
    )


def _tfds_classification(name: str, settings: Any, image_size: int) -> Classification:
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

    return Classification(
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


def _streamer(split_dataset: Any, settings: Any, image_size: int) -> Callable[[int], Iterator[dict]]:
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


def synthetic_at(synthetic: Any | None, image_size: int) -> SyntheticShapes:
    """`synthetic` (the built-in dataset a model was trained on; None: its default configuration),
    checked to draw `image_size` images."""
    if synthetic is None:
        synthetic = SyntheticShapes(SyntheticShapesConfig(image_size=image_size))
    if synthetic.config.image_size != image_size:
        raise ValueError(
            f"the synthetic dataset draws {synthetic.config.image_size}px images, the model takes {image_size}px"
        )
    return synthetic


def classification_data(name: str, synthetic: Any | None, settings: Any, image_size: int) -> Classification:
    """Classification dataset `name` at `image_size`: the TFDS dataset, or one of the built-in
    dataset `synthetic` (`synthetic_at`)."""
    if name in SYNTHETIC_DATASETS:
        return _synthetic_classification(name, synthetic_at(synthetic, image_size), settings)
    return _tfds_classification(name, settings, image_size)


def retrieval_batches(name: str, dataset: Any, settings: Any, image_size: int) -> Callable[[int], Iterator[dict]]:
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


def is_classification(name: str) -> bool:
    return name.split(":")[0] not in RETRIEVAL_SPLITS


def is_retrieval(name: str) -> bool:
    return name == "synthetic" or name.split(":")[0] in RETRIEVAL_SPLITS
