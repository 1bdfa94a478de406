"""TFDS datasets with an image feature and a text feature as a training source, read either by
random access (`tfds.data_source`, ArrayRecord files) or by tf.data (`tfds.load`, TFRecord files).

Random access: each process owns an even, contiguous share of the record indices and visits it in
a fresh seeded permutation every epoch; a position is (epoch, offset) and resuming is instant.
tf.data: each process reads `tfds.split_for_jax_process(split)` with files shuffled by a per-epoch
seed and a seeded shuffle buffer; resuming re-reads (without decoding) the examples of the epoch
already used. See docs/data.md for the choice.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from clip_jax.data.config import DataSettings
from clip_jax.data.sources import (
    RawExample,
    SkippedExample,
    check_process_layout,
    global_batches_started,
    permuted_indices,
    process_stream_index,
)

READERS: tuple[str, ...] = ("auto", "data_source", "tf_data")
IMAGE_DECODERS: tuple[str, ...] = ("pipeline", "tfds")
# Tried in order when data.tfds.text_key is "": coco_captions' captions, then common names.
DEFAULT_TEXT_KEYS: tuple[str, ...] = ("captions/text", "caption", "text")

# Positions whose record indices are computed at once (the permutation is vectorised).
_PERMUTATION_CHUNK = 256


def import_tfds():
    """tensorflow_datasets, imported at first use (it takes seconds; shards-only runs never pay)."""
    import tensorflow_datasets

    return tensorflow_datasets


# --------------------------------------------------------------------------------------------
# Feature paths: "captions/text" walks nested dicts; keys may themselves hold "/" ("image/id").
# --------------------------------------------------------------------------------------------


def resolve_path(mapping: Mapping[str, Any], path: str) -> tuple[str, ...] | None:
    """The keys leading to `path` through nested mappings (whole keys before "/"-split ones), or
    None when nothing matches."""
    if path in mapping:
        return (path,)
    parts = path.split("/")
    for cut in range(len(parts) - 1, 0, -1):
        head, rest = "/".join(parts[:cut]), "/".join(parts[cut:])
        if head in mapping and isinstance(mapping[head], Mapping):
            tail = resolve_path(mapping[head], rest)
            if tail is not None:
                return (head, *tail)
    return None


def lookup(example: Mapping[str, Any], keys: Sequence[str]) -> Any:
    value: Any = example
    for key in keys:
        value = value[key]
    return value


def _flat_feature_names(mapping: Mapping[str, Any], prefix: str = "") -> list[str]:
    names = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        names.extend(_flat_feature_names(value, name + "/") if isinstance(value, Mapping) else [name])
    return names


def features_as_mapping(features: Any) -> Mapping[str, Any]:
    """A TFDS FeaturesDict as nested dicts of features (Sequence-of-dict features opened up)."""
    tfds = import_tfds()
    result = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Sequence) and isinstance(feature.feature, tfds.features.FeaturesDict):
            feature = feature.feature
        result[key] = features_as_mapping(feature) if isinstance(feature, tfds.features.FeaturesDict) else feature
    return result


def _nested(keys: Sequence[str], value: Any) -> dict[str, Any]:
    for key in reversed(keys):
        value = {key: value}
    return value


@dataclasses.dataclass(frozen=True)
class FeatureKeys:
    """Where the image and the text of an example are, and how the image is decoded."""

    image: tuple[str, ...]
    text: tuple[str, ...]
    decoders: dict[str, Any] | None  # TFDS `decoders=` (SkipDecoding of the image), or None


def feature_keys(
    builder: Any, image_key: str, text_key: str, image_decoder: str, needs_text: bool = True
) -> FeatureKeys:
    """Checks the builder has the features the config names and returns their key paths."""
    tfds = import_tfds()
    if image_decoder not in IMAGE_DECODERS:
        raise ValueError(f"data.tfds.image_decoder must be one of {IMAGE_DECODERS}, got {image_decoder!r}")
    features = features_as_mapping(builder.info.features)
    available = ", ".join(_flat_feature_names(features))
    image_path = resolve_path(features, image_key)
    if image_path is None:
        raise ValueError(
            f"TFDS dataset {builder.name!r} has no feature {image_key!r} (data.tfds.image_key); it has: {available}"
        )
    text_path: tuple[str, ...] = ()
    if needs_text:
        candidates = (text_key,) if text_key else DEFAULT_TEXT_KEYS
        for candidate in candidates:
            text_path = resolve_path(features, candidate) or ()
            if text_path:
                break
        if not text_path:
            raise ValueError(
                f"TFDS dataset {builder.name!r} has no text feature {' or '.join(map(repr, candidates))} "
                f"(data.tfds.text_key); it has: {available}"
            )
    decoders = None
    if image_decoder == "pipeline" and isinstance(lookup(features, image_path), tfds.features.Image):
        # The encoded bytes reach the pipeline, which decodes them in its workers, skips corrupt
        # ones and decodes big JPEGs at reduced size.
        decoders = _nested(image_path, tfds.decode.SkipDecoding())
    return FeatureKeys(image_path, text_path, decoders)


def _check_reader(reader: str) -> str:
    if reader not in READERS:
        raise ValueError(f"data.tfds.reader must be one of {READERS}, got {reader!r}")
    return reader


def has_array_record(builder: Any) -> bool:
    """Whether the prepared dataset has ArrayRecord files (random access with tfds.data_source)."""
    tfds = import_tfds()
    info = builder.info
    formats = [info.file_format, *getattr(info, "alternative_file_formats", ())]
    return tfds.core.FileFormat.ARRAY_RECORD in formats


def choose_reader(builder: Any, reader: str) -> str:
    reader = _check_reader(reader)
    if reader != "auto":
        return reader
    return "data_source" if has_array_record(builder) else "tf_data"


def make_builder(name: str, data_dir: str | None) -> Any:
    """The TFDS builder of `name` (with an optional ":version"), failing clearly when the dataset
    is unknown."""
    tfds = import_tfds()
    if not name:
        raise ValueError("data.tfds.name is empty: name a TFDS dataset, e.g. 'coco_captions'")
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # DatasetNotFoundError and friends
        raise ValueError(f"cannot open TFDS dataset {name!r} (data_dir={data_dir!r}): {error}") from error


def not_prepared_message(name: str, data_dir: str | None) -> str | None:
    """One line when TFDS dataset `name` was never prepared in `data_dir` (None: TFDS's default
    directory): the dataset, the directory looked in and how to prepare it; None when it was (or
    when that cannot be told). Asked only once opening it has failed: under
    tfds.testing.mock_data a dataset reads without being prepared."""
    tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        if builder.is_prepared():
            return None
        directory = os.fspath(builder.data_dir_root)
    except Exception:  # noqa: BLE001 - unknown name, unreadable directory: the caller's own message stands
        return None
    return (
        f"TFDS dataset {name!r} is not prepared in {directory!r}: prepare it there with "
        f"`tfds build {name.split(':')[0]} --data_dir={directory}` (some, e.g. imagenet2012, need their files "
        "downloaded by hand first), or name the directory where it is prepared (--data_dir of evaluate.py, "
        "config.data.tfds.data_dir or config.eval.data_dir of train.py)"
    )


# Decoding threads open their data source lazily. Opening is not thread-safe under
# tfds.testing.mock_data, which patches classes while a source is built (two threads at once fail
# with "Cannot spec a Mock object"), and a second open of the same source is wasted work anyway.
_OPEN_LOCK = threading.RLock()


def open_data_source(name: str, split: str, data_dir: str | None, decoders: Any) -> Any:
    tfds = import_tfds()
    try:
        with _OPEN_LOCK:
            # download=False: tfds.data_source would otherwise download and prepare a missing dataset.
            return tfds.data_source(name, split=split, data_dir=data_dir or None, decoders=decoders, download=False)
    except Exception as error:
        raise ValueError(
            not_prepared_message(name, data_dir)
            or f"cannot open TFDS dataset {name!r} split {split!r} for random access (data_dir={data_dir!r}): {error}. "
            "Prepare it with ArrayRecord files (`tfds build --file_format=array_record`) or set "
            "data.tfds.reader='tf_data'."
        ) from error


def load_tf_data(
    name: str,
    split: Any,
    data_dir: str | None,
    decoders: Any,
    shuffle_files: bool,
    shuffle_seed: int | None,
) -> Any:
    """`tfds.load(...)` as a deterministic tf.data.Dataset (never downloads)."""
    tfds = import_tfds()
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    try:
        dataset = tfds.load(
            name,
            split=split,
            data_dir=data_dir or None,
            download=False,
            shuffle_files=shuffle_files,
            read_config=read_config,
            decoders=decoders,
        )
    except Exception as error:
        raise ValueError(
            not_prepared_message(name, data_dir)
            or f"cannot read TFDS dataset {name!r} split {split!r} (data_dir={data_dir!r}): {error}"
        ) from error
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def _seed_word(*parts: int) -> int:
    """A 31-bit seed (what tf.data ops accept) drawn from integers."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1)[0] & 0x7FFFFFFF)


# --------------------------------------------------------------------------------------------
# The sources.
# --------------------------------------------------------------------------------------------


class TfdsRecordReader:
    """Reads (image, text) of a record by index. Pickled into each worker process, where it opens
    its own `tfds.data_source` at the first read (worker threads share the parent's)."""

    def __init__(self, name: str, split: str, data_dir: str | None, keys: FeatureKeys, source: Any = None) -> None:
        self.name, self.split, self.data_dir, self.keys = name, split, data_dir, keys
        self._source = source

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}  # an open data source stays in its process

    def read(self, record: int) -> tuple[Any, Any]:
        if self._source is None:
            with _OPEN_LOCK:  # several decoding threads share this reader: open it once
                if self._source is None:
                    self._source = open_data_source(self.name, self.split, self.data_dir, self.keys.decoders)
        try:
            example = self._source[record]
        except Exception as error:  # a record TFDS cannot read or decode
            raise SkippedExample("undecodable_image", f"record {record}: {type(error).__name__}: {error}") from None
        return lookup(example, self.keys.image), lookup(example, self.keys.text) if self.keys.text else None


@dataclasses.dataclass(eq=False)
class _TfdsSource:
    """What both TFDS sources share: the split they read, the seed, this process's place in the run,
    and a position that starts at epoch 0 (their readers hold nothing to stop). The subclasses'
    constructors take these fields, then their own."""

    name: str
    split: str
    data_dir: str | None
    keys: FeatureKeys
    process_index: int
    process_count: int
    seed: int

    ready_sized = False  # stored images of any size: decoded, cropped and resized

    def __post_init__(self) -> None:
        check_process_layout(self.process_index, self.process_count)

    def initial_position(self) -> dict[str, int]:
        return {"epoch": 0, "offset": 0}

    def close(self) -> None:
        pass


@dataclasses.dataclass(eq=False)
class TfdsRandomAccessSource(_TfdsSource):
    """Random access in one global order: stream position t of the run is record
    `permuted_indices(t mod N)` of epoch t // N (a fresh seeded permutation of the whole split each
    epoch), global batch b is positions [b·B, (b+1)·B), and process p reads its contiguous rows
    [p·B/P, (p+1)·B/P) of each. The order of examples is a function of (seed, epoch, position)
    only, so a run resumed on any number of processes goes on with the examples an uninterrupted
    run would read (`resume_position`); one process reads the split epoch after epoch.

    Position {"epoch", "offset", "first_epoch"}: the process has read `offset` examples of the
    stream that began at epoch `first_epoch` (absent: `epoch`); `epoch` is the one of the last read.
    An example's augmentation depends on its record index and epoch, not the topology.
    """

    global_batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # Without a batch (a caption sample, a test) each global "batch" is one row per process.
        self.global_batch_size = int(self.global_batch_size or self.process_count)
        if self.global_batch_size % self.process_count:
            raise ValueError(
                f"global batch {self.global_batch_size} is not a multiple of {self.process_count} processes"
            )
        self._source = open_data_source(self.name, self.split, self.data_dir, self.keys.decoders)
        self.num_records = len(self._source)
        if self.num_records < 1:
            raise ValueError(f"TFDS {self.name!r} split {self.split!r} has no examples")

    def fingerprint(self) -> str:
        return (
            f"tfds data_source: {self.name} {self.split} ({self.num_records} examples), global order, "
            f"global batch {self.global_batch_size}"
        )

    def stream_positions(self, first_epoch: int, offsets: np.ndarray) -> np.ndarray:
        """Global stream positions of this process's `offsets`-th examples."""
        local = process_stream_index(offsets, self.global_batch_size, self.process_index, self.process_count)
        return first_epoch * self.num_records + local

    def record_indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Records at `positions` (in [0, N)) of epoch `epoch`'s permutation of the split."""
        return permuted_indices(positions, self.num_records, (self.seed, epoch, 0, self.num_records))

    def record_reader(self) -> TfdsRecordReader:
        return TfdsRecordReader(self.name, self.split, self.data_dir, self.keys, self._source)

    def resume_position(self, saved_positions: Sequence[Mapping[str, int]]) -> dict[str, int] | None:
        """This process's position continuing a run saved by `len(saved_positions)` processes: from
        the first global batch no saved process had started (see `global_batches_started`)."""
        firsts = {int(position.get("first_epoch", position["epoch"])) for position in saved_positions}
        if len(firsts) != 1:
            return None
        first = firsts.pop()
        batches, _ = global_batches_started([int(p["offset"]) for p in saved_positions], self.global_batch_size)
        epoch = (first * self.num_records + batches * self.global_batch_size) // self.num_records
        local = self.global_batch_size // self.process_count
        return {"epoch": epoch, "offset": batches * local, "first_epoch": first}

    def examples(
        self, position: Mapping[str, int], text_only: bool = False
    ) -> Iterator[tuple[RawExample, dict[str, int]]]:
        del text_only  # images stay undecoded bytes until a worker prepares them: nothing to save
        first, offset = int(position.get("first_epoch", position["epoch"])), int(position["offset"])
        while True:
            offsets = np.arange(offset, offset + _PERMUTATION_CHUNK)
            epochs, places = np.divmod(self.stream_positions(first, offsets), self.num_records)
            for epoch in np.unique(epochs).tolist():
                selected = epochs == epoch
                records = self.record_indices(epoch, places[selected])
                for record_offset, index in zip(offsets[selected].tolist(), records.tolist()):
                    example = RawExample(
                        image=None,
                        text=None,
                        identity=(int(index),),
                        epoch=epoch,
                        description=f"{self.name} {self.split} record {index}",
                        record=int(index),
                    )
                    yield example, {"epoch": epoch, "offset": record_offset + 1, "first_epoch": first}
            offset += _PERMUTATION_CHUNK


@dataclasses.dataclass(eq=False)
class TfdsStreamingSource(_TfdsSource):
    """tf.data over `tfds.split_for_jax_process(split)`: files shuffled with a per-epoch seed, then
    a seeded shuffle buffer. Position {"epoch", "offset"}: examples of the epoch already used;
    resuming skips them again (read, not decoded)."""

    shuffle_buffer: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.tfds.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        self.process_split = import_tfds().split_for_jax_process(
            self.split, process_index=self.process_index, process_count=self.process_count
        )
        self._epoch_dataset(0)  # fails now, not at the first batch, if the data is missing

    def fingerprint(self) -> str:
        return f"tfds tf.data: {self.name} {self.split}"

    def record_reader(self) -> None:
        return None  # examples carry their contents

    def _epoch_dataset(self, epoch: int, skip: int = 0) -> Any:
        dataset = load_tf_data(
            self.name,
            self.process_split,
            self.data_dir,
            self.keys.decoders,
            shuffle_files=True,
            shuffle_seed=_seed_word(self.seed, epoch, self.process_index, 1),
        )
        if self.shuffle_buffer > 1:
            dataset = dataset.shuffle(
                self.shuffle_buffer,
                seed=_seed_word(self.seed, epoch, self.process_index, 2),
                reshuffle_each_iteration=False,
            )
        if skip:
            dataset = dataset.skip(skip)
        return dataset.prefetch(2)

    def examples(
        self, position: Mapping[str, int], text_only: bool = False
    ) -> Iterator[tuple[RawExample, dict[str, int]]]:
        del text_only  # images stay undecoded bytes until a worker prepares them: nothing to save
        epoch, offset = int(position["epoch"]), int(position["offset"])
        tfds = import_tfds()
        while True:
            emitted = 0
            for record in tfds.as_numpy(self._epoch_dataset(epoch, skip=offset)):
                yield (
                    RawExample(
                        image=lookup(record, self.keys.image),
                        text=lookup(record, self.keys.text) if self.keys.text else None,
                        identity=(self.process_index, offset),
                        epoch=epoch,
                        description=f"{self.name} {self.split} epoch {epoch} example {offset} "
                        f"of process {self.process_index}",
                    ),
                    {"epoch": epoch, "offset": offset + 1},
                )
                offset += 1
                emitted += 1
            if emitted == 0 and offset == 0:
                raise RuntimeError(f"TFDS {self.name!r} {self.split!r} gave process {self.process_index} no example")
            epoch, offset = epoch + 1, 0


def source_from_config(
    data_config: DataSettings,
    process_index: int,
    process_count: int,
    global_batch_size: int | None = None,
) -> TfdsRandomAccessSource | TfdsStreamingSource:
    """The TFDS source of `config.data` (`data.tfds.*`); opens the dataset now, so a missing or
    misnamed dataset fails before training starts."""
    settings = data_config.tfds
    data_dir = settings.data_dir or None
    reader = _check_reader(settings.reader)
    builder = make_builder(settings.name, data_dir)
    keys = feature_keys(builder, settings.image_key, settings.text_key, settings.image_decoder)
    reader = choose_reader(builder, reader)
    if reader == "data_source":
        return TfdsRandomAccessSource(
            settings.name, settings.split, data_dir, keys, process_index, process_count, int(data_config.seed),
            global_batch_size,
        )  # fmt: skip
    return TfdsStreamingSource(
        settings.name,
        settings.split,
        data_dir,
        keys,
        process_index,
        process_count,
        int(data_config.seed),
        int(settings.shuffle_buffer),
    )
