"""The `config.data` settings: every field the data sources and the training iterator read, with
its default and its type, written once in `DataSettings` (docs/data.md explains them). The
ConfigDict schema is made from it (`default_data_config`) and read back into it
(`data_settings`), so the data modules take a checked, typed `DataSettings`. Kept apart from the
code that reads it, so that the training config can take it over whole.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from clip_jax import settings_schema as schema
from clip_jax import transforms

SOURCE_NAMES: tuple[str, ...] = ("synthetic", "tfds", "webdataset")
WORKER_KINDS: tuple[str, ...] = ("process", "thread")


@dataclasses.dataclass(frozen=True)
class TfdsSettings:
    name: str = ""  # a TFDS builder name, e.g. "coco_captions" or "my_builder:1.0.0"
    split: str = "train"  # any TFDS split expression, e.g. "train[:95%]"
    data_dir: str = ""  # "" = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR); gs:// works
    image_key: str = "image"
    text_key: str = ""  # "/"-separated path; "" = "captions/text" if present, else "caption"
    reader: str = "auto"  # "data_source" (ArrayRecord, random access), "tf_data", or "auto"
    image_decoder: str = "pipeline"  # "pipeline" (TFDS hands over bytes) or "tfds"
    shuffle_buffer: int = 10_000  # tf_data reader only: examples in its shuffle buffer


@dataclasses.dataclass(frozen=True)
class WebDatasetSettings:
    # Globs and/or brace ranges, several separated by commas outside braces, e.g.
    # "gs://bucket/laion/{00000..01023}.tar,gs://bucket/cc12m/*.tar".
    shards: str = ""
    # Preferred first when a sample has several; the ConfigDict writes them comma-separated.
    image_extensions: tuple[str, ...] = schema.comma_separated(("jpg", "jpeg", "png", "webp"))
    text_extension: str = "txt"
    shards_per_window: int = 4  # shards read, mixed and permuted together in memory
    # Caps on what one shard may cost (bytes); a sample or shard past them is skipped and counted.
    max_member_bytes: int = 64 * 2**20  # one image (or other member) of a sample
    max_caption_bytes: int = 64 * 2**10  # the caption member (text_extension)
    max_shard_bytes: int = 4 * 2**30  # decompressed bytes of one shard


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Every `config.data` field the pipeline and its sources read, with its default."""

    name: str = "synthetic"  # the source: "synthetic" (built-in), "tfds" or "webdataset"
    seed: int = 0  # shuffling, caption choice and crops; the same seed replays the same batches
    prefetch_batches: int = 2  # batches prepared ahead of the train step
    num_workers: int = 0  # decoding workers per training process; 0 = one per CPU core it may use
    # "process": decoding scales with the cores (threads share the GIL, which caps their scaling);
    # "thread": no start-up cost, and sees in-process state such as tfds.testing.mock_data.
    worker_kind: str = "process"
    # Bad-sample limits: examples outside them are skipped and counted.
    min_image_size: int = 10  # pixels, shorter side
    max_image_pixels: int = 50_000_000
    max_aspect_ratio: float = 10.0  # long side / short side
    crop_scale: tuple[float, float] = transforms.DEFAULT_TRAIN_SCALE  # random resized crop, area fraction
    # Decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves every crop at least the
    # model's image size (fewer pixels to decode; a tiny change of pixels, none of geometry).
    reduced_jpeg_decoding: bool = True
    tfds: TfdsSettings = TfdsSettings()
    webdataset: WebDatasetSettings = WebDatasetSettings()
    num_held_out: int = 16  # synthetic only: colour x shape combinations never shown in training

    def __post_init__(self) -> None:
        if self.name not in SOURCE_NAMES:
            raise ValueError(f"unknown data.name {self.name!r}; expected one of {SOURCE_NAMES}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = one per CPU core), got {self.num_workers}")
        if self.worker_kind not in WORKER_KINDS:
            raise ValueError(f"data.worker_kind must be one of {WORKER_KINDS}, got {self.worker_kind!r}")


def default_data_config() -> ml_collections.ConfigDict:
    """Every `config.data` field the pipeline and its sources read, with its default."""
    return schema.config_dict(DataSettings)


def data_settings(config: DataSettings | ml_collections.ConfigDict) -> DataSettings:
    """The DataSettings of a `config.data` ConfigDict (ValueError naming a field of the wrong
    type), or `config` itself when it is one: the data pipeline's entry points take either."""
    return config if isinstance(config, DataSettings) else schema.read(DataSettings, config, "data.")
