"""The `config.data` schema: every field the data sources and the training iterator read, with its
default (docs/data.md explains them). Kept apart from the code that reads it, so that the
training config can take it over whole.
"""

from __future__ import annotations

import ml_collections

from clip_jax import transforms


def default_data_config() -> ml_collections.ConfigDict:
    """Every `config.data` field the pipeline and its sources read, with its default."""
    config = ml_collections.ConfigDict()
    config.name = "synthetic"  # the source: "synthetic" (built-in), "tfds" or "webdataset"
    config.seed = 0  # shuffling, caption choice and crops; the same seed replays the same batches
    config.prefetch_batches = 2  # batches prepared ahead of the train step
    config.num_workers = 0  # decoding workers per training process; 0 = one per CPU core it may use
    # "process": decoding scales with the cores (threads share the GIL, which caps their scaling);
    # "thread": no start-up cost, and sees in-process state such as tfds.testing.mock_data.
    config.worker_kind = "process"
    # Bad-sample limits: examples outside them are skipped and counted.
    config.min_image_size = 10  # pixels, shorter side
    config.max_image_pixels = 50_000_000
    config.max_aspect_ratio = 10.0  # long side / short side
    config.crop_scale = transforms.DEFAULT_TRAIN_SCALE  # random resized crop, area fraction
    # Decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves every crop at least the
    # model's image size (fewer pixels to decode; a tiny change of pixels, none of geometry).
    config.reduced_jpeg_decoding = True

    config.tfds = ml_collections.ConfigDict()
    config.tfds.name = ""  # a TFDS builder name, e.g. "coco_captions" or "my_builder:1.0.0"
    config.tfds.split = "train"  # any TFDS split expression, e.g. "train[:95%]"
    config.tfds.data_dir = ""  # "" = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR); gs:// works
    config.tfds.image_key = "image"
    config.tfds.text_key = ""  # "/"-separated path; "" = "captions/text" if present, else "caption"
    config.tfds.reader = "auto"  # "data_source" (ArrayRecord, random access), "tf_data", or "auto"
    config.tfds.image_decoder = "pipeline"  # "pipeline" (TFDS hands over bytes) or "tfds"
    config.tfds.shuffle_buffer = 10_000  # tf_data reader only: examples in its shuffle buffer

    config.webdataset = ml_collections.ConfigDict()
    # Globs and/or brace ranges, several separated by commas outside braces, e.g.
    # "gs://bucket/laion/{00000..01023}.tar,gs://bucket/cc12m/*.tar".
    config.webdataset.shards = ""
    config.webdataset.image_extensions = "jpg,jpeg,png,webp"  # preferred first when a sample has several
    config.webdataset.text_extension = "txt"
    config.webdataset.shards_per_window = 4  # shards read, mixed and permuted together in memory
    # Caps on what one shard may cost (bytes); a sample or shard past them is skipped and counted.
    config.webdataset.max_member_bytes = 64 * 2**20  # one image (or other member) of a sample
    config.webdataset.max_caption_bytes = 64 * 2**10  # the caption member (text_extension)
    config.webdataset.max_shard_bytes = 4 * 2**30  # decompressed bytes of one shard

    config.num_held_out = 16  # synthetic only: colour x shape combinations never shown in training
    return config
