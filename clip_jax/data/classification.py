"""TFDS classification datasets for evaluation (ImageNet and its shifts, CIFAR, Food-101, ...):
class names and batches of eval-transformed images with labels, split across processes.

Images go through the same decoding as training (clip_jax.data.decode) but with OpenAI's eval
transform; every process yields the same number of batches (padded, with a mask) so that an SPMD
evaluation step runs in lockstep on all of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from clip_jax import transforms
from clip_jax.data import templates
from clip_jax.data import tfds as tfds_source
from clip_jax.data.decode import ImageLimits, decode_image
from clip_jax.data.sources import (
    RawExample,
    RecordReader,
    SkippedExample,
    check_process_layout,
    even_share,
    example_contents,
    new_counters,
)
from clip_jax.data.workers import PreparerWithReader, WorkerPool, default_num_workers, prepared_in_order

# The split each benchmark is scored on.
DEFAULT_SPLITS: dict[str, str] = {
    "imagenet2012": "validation",
    "imagenet2012_real": "validation",
    "imagenet_v2": "test",
    "imagenet_r": "test",
    "imagenet_a": "test",
    "imagenet_sketch": "test",
    "cifar10": "test",
    "cifar100": "test",
    "food101": "validation",
    "stl10": "test",
    "oxford_iiit_pet": "test",
    "oxford_flowers102": "test",
    "dtd": "test",
    "eurosat": "train",  # EuroSAT has a single split
    "caltech101": "test",
    "mnist": "test",
    "svhn_cropped": "test",
}

# Evaluation keeps every image the decoder can read: only the pixel budget guards memory.
EVAL_IMAGE_LIMITS = ImageLimits(min_image_size=1, max_image_pixels=200_000_000, max_aspect_ratio=float("inf"))


@dataclasses.dataclass(frozen=True)
class EvalPreparer:
    """(image float32 (size, size, 3) from OpenAI's eval transform, label, converted) of an example
    whose `text` slot holds the label; raises SkippedExample for an image that cannot be used."""

    image_size: int

    def __call__(self, example: RawExample, reader: RecordReader | None = None) -> tuple[np.ndarray, int, bool]:
        image_data, label = example_contents(example, reader)
        if image_data is None:
            raise SkippedExample("missing_image", example.description)
        image, converted = decode_image(image_data, EVAL_IMAGE_LIMITS)
        return transforms.eval_transform(image, self.image_size), int(np.asarray(label)), converted


def readable_class_names(dataset_name: str, label_names: tuple[str, ...]) -> tuple[str, ...]:
    """Class names for prompts: the curated list of clip_jax.data.templates when it has one of
    the right length (ImageNet's label names are WordNet ids), else the label names with "_" -> " "."""
    try:
        curated = templates.get_prompts(dataset_name).class_names
    except (ValueError, AttributeError):  # no prompts for this dataset, or none with class names
        curated = ()
    if len(curated) == len(label_names):
        return tuple(curated)
    return tuple(name.replace("_", " ") for name in label_names)


@dataclasses.dataclass
class ClassificationDataset:
    """One split of a TFDS classification dataset, ready for zero-shot or linear-probe evaluation.

    `label_names`: the builder's names in label order (e.g. WordNet ids "n01440764" for ImageNet);
    `class_names`: readable names for prompts (see readable_class_names).
    `counters`: images skipped or converted during the last `batches()` pass.
    """

    name: str
    split: str
    data_dir: str | None
    label_names: tuple[str, ...]
    class_names: tuple[str, ...]
    num_examples: int
    image_key: tuple[str, ...]
    label_key: tuple[str, ...]
    decoders: Any
    reader: str
    counters: dict[str, int] = dataclasses.field(default_factory=new_counters)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def num_batches(self, batch_size: int, process_count: int) -> int:
        """Batches each process yields: enough for the largest process share."""
        return math.ceil(math.ceil(self.num_examples / process_count) / batch_size)

    def _records(self, process_index: int, process_count: int) -> tuple[Iterator[RawExample], RecordReader | None]:
        """This process's share of the split in dataset order (no shuffling for evaluation), and the
        reader of its records (random access) or None (the examples carry their contents)."""
        start, end = even_share(self.num_examples, process_index, process_count)
        keys = tfds_source.FeatureKeys(self.image_key, self.label_key, self.decoders)
        if self.reader == "data_source":
            reader = tfds_source.TfdsRecordReader(self.name, self.split, self.data_dir, keys)
            records = (
                RawExample(None, None, (index,), 0, description=f"{self.name} record {index}", record=index)
                for index in range(start, end)
            )
            return records, reader
        return self._streamed_records(start, end), None

    def _streamed_records(self, start: int, end: int) -> Iterator[RawExample]:
        if end <= start:
            return
        split = f"{self.split}[{start}:{end}]"
        dataset = tfds_source.load_tf_data(
            self.name, split, self.data_dir, self.decoders, shuffle_files=False, shuffle_seed=None
        )
        for offset, record in enumerate(tfds_source.import_tfds().as_numpy(dataset)):
            yield RawExample(
                tfds_source.lookup(record, self.image_key),
                tfds_source.lookup(record, self.label_key),
                (start + offset,),
                0,
                description=f"{self.name} example {start + offset}",
            )

    def batches(
        self,
        image_size: int,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        num_workers: int = 0,
        worker_kind: str = "process",
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches: {"images": float32 (batch_size, size, size, 3) eval-transformed,
        "labels": int32 (batch_size,), "mask": bool (batch_size,)}; padding rows have mask False,
        as do images that could not be decoded (counted in `counters`). Every process yields
        `num_batches(batch_size, process_count)` batches."""
        check_process_layout(process_index, process_count)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.counters = new_counters()
        records, reader = self._records(process_index, process_count)
        workers = num_workers or default_num_workers()
        pool = WorkerPool(PreparerWithReader(EvalPreparer(image_size), reader), workers, worker_kind)
        try:
            stream = prepared_in_order(
                ((record, None) for record in records), pool, 2 * batch_size + 32 * pool.num_workers
            )
            for _ in range(self.num_batches(batch_size, process_count)):
                images = np.zeros((batch_size, image_size, image_size, 3), np.float32)
                labels = np.zeros((batch_size,), np.int32)
                mask = np.zeros((batch_size,), bool)
                for row in range(batch_size):
                    item = next(stream, None)
                    if item is None:
                        break
                    _, _, result, skipped = item
                    if skipped is not None:
                        self.counters[skipped] += 1
                        continue
                    pixels, label, converted = result
                    self.counters["converted_image_mode"] += int(converted)
                    images[row], labels[row], mask[row] = pixels, label, True
                yield {"images": images, "labels": labels, "mask": mask}
        finally:
            pool.shutdown()


def load_classification(
    name: str,
    split: str | None = None,
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    reader: str = "auto",
    image_decoder: str = "pipeline",
) -> ClassificationDataset:
    """A TFDS classification split (default: the benchmark's usual one, DEFAULT_SPLITS) with its
    class names; the dataset must be prepared (nothing is downloaded)."""
    tfds = tfds_source.import_tfds()
    base_name = name.split(":")[0]
    if split is None:
        if base_name not in DEFAULT_SPLITS:
            raise ValueError(f"no default split for {name!r}; pass split= (known defaults: {sorted(DEFAULT_SPLITS)})")
        split = DEFAULT_SPLITS[base_name]
    builder = tfds_source.make_builder(name, data_dir)
    keys = tfds_source.feature_keys(builder, image_key, "", image_decoder, needs_text=False)
    label_path = tfds_source.resolve_path(tfds_source.features_as_mapping(builder.info.features), label_key)
    if label_path is None:
        raise ValueError(f"TFDS dataset {name!r} has no label feature {label_key!r}")
    label_feature = tfds_source.lookup(builder.info.features, label_path)
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(f"feature {label_key!r} of {name!r} is a {type(label_feature).__name__}, not a ClassLabel")
    label_names = tuple(label_feature.names)
    chosen_reader = tfds_source.choose_reader(builder, reader)
    if chosen_reader == "data_source":
        num_examples = len(tfds_source.open_data_source(name, split, data_dir, keys.decoders))
    else:
        try:
            num_examples = int(builder.info.splits[split].num_examples)
        except KeyError as error:  # no such split, or no splits at all: a dataset never prepared
            message = tfds_source.not_prepared_message(name, data_dir)
            raise ValueError(message or f"TFDS dataset {name!r} has no split {split!r} ({error})") from error
    if num_examples < 1:
        raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
    return ClassificationDataset(
        name=base_name,
        split=split,
        data_dir=data_dir,
        label_names=label_names,
        class_names=readable_class_names(base_name, label_names),
        num_examples=num_examples,
        image_key=keys.image,
        label_key=label_path,
        decoders=keys.decoders,
        reader=chosen_reader,
    )
