"""One input pipeline for every image-text source: decode -> augment -> tokenize -> batch, with
worker processes (or threads) sized to the host, an exact resume position and skip counters.

Sources (clip_jax/data/tfds.py, clip_jax/data/webdataset.py) only say which raw examples come next;
everything after that is here, so TFDS and img2dataset shards behave the same way. Every random
choice (permutations, caption choice, crop) is a pure function of (seed, epoch, example identity),
so a batch depends on the seed, the topology and its position, never on worker timing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, Union

import ml_collections
import numpy as np
import PIL.Image

from clip_jax import transforms

logger = logging.getLogger(__name__)

SOURCE_NAMES: tuple[str, ...] = ("synthetic", "tfds", "webdataset")

# Why an example was skipped; every one is counted in the iterator state and the training log.
SKIP_REASONS: tuple[str, ...] = (
    "missing_image",  # a caption (or other file) with no image beside it
    "missing_caption",  # an image with no caption beside it
    "empty_caption",  # only whitespace, or every caption of the example empty
    "undecodable_caption",  # bytes that are not UTF-8
    "undecodable_image",  # corrupt or truncated bytes, or a format the decoder refuses
    "image_too_small",  # shorter side below data.min_image_size
    "image_too_large",  # more pixels than data.max_image_pixels (decompression bombs)
    "extreme_aspect_ratio",  # long side / short side above data.max_aspect_ratio
    "member_too_large",  # a member over data.webdataset.max_member_bytes / max_caption_bytes: not read
    "link_member",  # a symbolic or hard link (or device, FIFO) where a sample's file belongs: not followed
    "duplicate_member",  # two members of one sample with the same name: which one is meant?
    "truncated_shard",  # a tar file that ends mid-archive (the samples before the break are kept)
    "shard_too_large",  # a shard cut at data.webdataset.max_shard_bytes decompressed bytes (the same)
    "unreadable_shard",  # a shard that could not be read at all
)
# Events that are counted but do not drop the example.
CONVERTED_IMAGE_MODE = "converted_image_mode"  # grayscale, CMYK, palette, alpha or 16-bit -> RGB
COUNTER_NAMES: tuple[str, ...] = (*SKIP_REASONS, CONVERTED_IMAGE_MODE)

STATE_VERSION = 1

# A run stops when this many examples in a row are unusable (the data or the settings are wrong).
MAX_SKIPS_IN_A_ROW = 100_000

ImageData = Union[bytes, np.ndarray]


def default_data_config() -> ml_collections.ConfigDict:
    """Every `config.data` field the pipeline and its sources read, with its default."""
    config = ml_collections.ConfigDict()
    config.name = "synthetic"  # the source: "synthetic" (built-in), "tfds" or "webdataset"
    config.seed = 0  # shuffling, caption choice and crops; the same seed replays the same batches
    config.prefetch_batches = 2  # batches prepared ahead of the train step
    config.num_workers = 0  # decoding workers per training process; 0 = one per CPU core it may use
    # "process": decoding scales with the cores (the GIL caps threads at ~3x, measured on 16 cores);
    # "thread": no start-up cost, and sees in-process state such as tfds.testing.mock_data.
    config.worker_kind = "process"
    # Bad-sample limits: examples outside them are skipped and counted.
    config.min_image_size = 10  # pixels, shorter side
    config.max_image_pixels = 50_000_000
    config.max_aspect_ratio = 10.0  # long side / short side
    config.crop_scale = transforms.DEFAULT_TRAIN_SCALE  # random resized crop, area fraction
    # Decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves every crop at least the
    # model's image size (several times faster; a tiny change of pixels, none of geometry).
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
    return config


# --------------------------------------------------------------------------------------------
# Raw examples, as sources hand them over.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One example as a source read it, before any decoding.

    `identity` names the example uniquely within an epoch (e.g. (shard, member) or (record index,));
    with the seed and epoch it seeds the example's random choices. `problem` is a SKIP_REASONS
    entry when the source already knows the example is unusable (it is then only counted).
    """

    image: ImageData | None
    text: Any  # str, bytes, or a sequence / array of them (several captions: one is drawn)
    identity: tuple[int, ...]
    epoch: int
    problem: str | None = None
    description: str = ""  # where it came from, for log messages
    # Random-access sources leave image and text None and name a record instead: the worker reads
    # it with the source's record_reader(), so record reads (maybe remote) run in parallel too.
    record: int | None = None


class RecordReader(Protocol):
    """Reads records of a random-access source in a worker; picklable (sent to worker processes)."""

    def read(self, record: int) -> tuple[ImageData | None, Any]:
        """(image, text) of a record; raises SkippedExample for a record that cannot be read."""


def example_contents(example: RawExample, reader: RecordReader | None) -> tuple[ImageData | None, Any]:
    """(image, text) of an example, read through `reader` for record-based examples."""
    if example.record is None:
        return example.image, example.text
    if reader is None:
        raise ValueError(f"{example.description or 'an example'} names record {example.record} but no reader was given")
    return reader.read(example.record)


class ExampleSource(Protocol):
    """A deterministic, endless stream of raw examples for one process, resumable at any point."""

    def initial_position(self) -> dict[str, int]:
        """The position of the first example of epoch 0."""

    def examples(self, position: Mapping[str, int]) -> Iterator[tuple[RawExample, dict[str, int]]]:
        """The raw examples from `position` on, each with the position just after it."""

    def fingerprint(self) -> str:
        """What the positions refer to (dataset, size, layout): a resume checks it is unchanged."""

    def record_reader(self) -> RecordReader | None:
        """The reader of the `record`s its examples name (None if they carry their contents)."""

    def close(self) -> None:
        """Stop background reading."""


# --------------------------------------------------------------------------------------------
# Seeds and permutations: pure functions of integers.
# --------------------------------------------------------------------------------------------


def example_rng(seed: int, epoch: int, identity: Sequence[int]) -> np.random.Generator:
    """The random generator of one example in one epoch (caption choice, crop)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *identity]))


def epoch_permutation(size: int, seed: int, epoch: int, *extra: int) -> np.ndarray:
    """A permutation of range(size) drawn from (seed, epoch, *extra); for sizes that fit in memory."""
    generator = np.random.default_rng(np.random.SeedSequence([seed, epoch, *extra]))
    return generator.permutation(size)


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective scramble of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        values = values.astype(np.uint64)
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def permuted_indices(positions: np.ndarray | Sequence[int], size: int, key: Sequence[int]) -> np.ndarray:
    """The images of `positions` under a random permutation of range(size) chosen by `key`.

    A 4-round Feistel network over the smallest even bit width covering `size`, with "cycle walking"
    (re-encrypting values that land outside the range). It is a bijection of range(size) computed
    per index, so epochs over hundreds of millions of records never materialise a permutation.
    """
    if size < 1:
        raise ValueError(f"permutation size must be positive, got {size}")
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= size):
        raise ValueError(f"positions must lie in [0, {size}), got {positions.min()} .. {positions.max()}")
    half_bits = max(1, math.ceil(math.log2(size) / 2)) if size > 1 else 1
    half_mask = np.uint64((1 << half_bits) - 1)
    seed_sequence = np.random.SeedSequence([int(part) for part in key])
    round_keys = seed_sequence.generate_state(4, dtype=np.uint64)

    def encrypt(values: np.ndarray) -> np.ndarray:
        left = values >> np.uint64(half_bits)
        right = values & half_mask
        for round_key in round_keys:
            with np.errstate(over="ignore"):
                mixed = _mix64(right ^ round_key) & half_mask
            left, right = right, left ^ mixed
        return (left << np.uint64(half_bits)) | right

    result = positions.astype(np.uint64)
    outside = np.ones(result.shape, dtype=bool)
    limit = np.uint64(size)
    # At most 4x the range is covered, so each walk ends after a few steps on average.
    while outside.any():
        result[outside] = encrypt(result[outside])
        outside = result >= limit
    return result.astype(np.int64)


def even_share(total: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of process `process_index`'s contiguous share of `total` items: sizes differ by
    at most one, shares are disjoint and cover everything (what tfds.even_splits does)."""
    check_process_layout(process_index, process_count)
    start = (process_index * total) // process_count
    end = ((process_index + 1) * total) // process_count
    return start, end


def check_process_layout(process_index: int, process_count: int) -> None:
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")


# --------------------------------------------------------------------------------------------
# Decoding one example (runs in the workers; pure functions of their arguments).
# --------------------------------------------------------------------------------------------


class SkippedExample(Exception):
    """Raised while preparing an example that cannot be used; `reason` is a SKIP_REASONS entry."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Which images are used; the others are skipped with the reason named in the check."""

    min_image_size: int = 10
    max_image_pixels: int = 50_000_000
    max_aspect_ratio: float = 10.0

    def check(self, width: int, height: int) -> None:
        if min(width, height) < self.min_image_size:
            raise SkippedExample("image_too_small", f"{width}x{height}")
        if width * height > self.max_image_pixels:
            raise SkippedExample("image_too_large", f"{width}x{height}")
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise SkippedExample("extreme_aspect_ratio", f"{width}x{height}")


# 16-bit and floating-point single-channel modes, scaled to 8 bits by hand: PIL's convert("RGB")
# would clip them at 255 and give a white image.
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(image: PIL.Image.Image) -> tuple[PIL.Image.Image, bool]:
    """(RGB image, whether its mode had to be converted). 16-bit images keep their top 8 bits."""
    if image.mode == "RGB":
        return image, False
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image)
        if image.mode == "F":
            eight_bit = np.clip(values, 0, 255).astype(np.uint8)
        else:
            # "I" holds 16-bit PNGs as int32 on some Pillow versions; anything over 8 bits is scaled.
            values = values.astype(np.int64)
            shift = 8 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 0
            eight_bit = np.clip(values >> shift, 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(eight_bit, mode="L").convert("RGB"), True
    return image.convert("RGB"), True


def decode_image(
    data: ImageData, limits: ImageLimits, reduced_decoding_size: int | None = None
) -> tuple[PIL.Image.Image, bool]:
    """(RGB PIL image, converted) from encoded bytes or a uint8 array; raises SkippedExample.

    `reduced_decoding_size`: a JPEG may be decoded at 1/2..1/8 scale as long as both sides stay at
    least this many pixels (libjpeg's DCT scaling; PIL's `draft`).
    """
    if isinstance(data, np.ndarray):
        return _image_from_array(data, limits)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SkippedExample("undecodable_image", f"unsupported image value of type {type(data).__name__}")
    if len(data) == 0:
        raise SkippedExample("undecodable_image", "empty image file")
    try:
        image = PIL.Image.open(io.BytesIO(data))
        width, height = image.size
    except PIL.Image.DecompressionBombError as error:
        raise SkippedExample("image_too_large", str(error)) from None
    except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        raise SkippedExample("undecodable_image", f"{type(error).__name__}: {error}") from None
    limits.check(width, height)  # before decoding: a huge image is never decompressed
    try:
        if reduced_decoding_size is not None and image.format == "JPEG":
            image.draft("RGB", (reduced_decoding_size, reduced_decoding_size))
        image.load()
        return to_rgb(image)
    except Exception as error:
        raise SkippedExample("undecodable_image", f"{type(error).__name__}: {error}") from None


def _image_from_array(array: np.ndarray, limits: ImageLimits) -> tuple[PIL.Image.Image, bool]:
    """An already-decoded image (TFDS decoding): uint8 or uint16, (H, W) or (H, W, 1|3|4)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise SkippedExample("undecodable_image", f"image array of shape {array.shape}")
    limits.check(int(array.shape[1]), int(array.shape[0]))
    converted = False
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
        converted = True
    elif array.dtype != np.uint8:
        raise SkippedExample("undecodable_image", f"image array of dtype {array.dtype}")
    image, mode_converted = to_rgb(PIL.Image.fromarray(np.ascontiguousarray(array)))
    return image, converted or mode_converted


def _text_of(value: Any) -> str:
    """One caption as a str; raises SkippedExample for bytes that are not UTF-8."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkippedExample("undecodable_caption", str(error)) from None
    if isinstance(value, str):
        return value
    raise SkippedExample("undecodable_caption", f"caption of type {type(value).__name__}")


def choose_caption(text: Any, rng: np.random.Generator) -> str:
    """The caption of an example: itself, or one drawn uniformly among its usable captions."""
    if text is None:
        raise SkippedExample("missing_caption")
    several = isinstance(text, (list, tuple)) or (isinstance(text, np.ndarray) and text.ndim > 0)
    if not several:
        caption = _text_of(text).strip()
        if not caption:
            raise SkippedExample("empty_caption")
        return caption
    candidates, undecodable = [], 0
    for value in list(np.asarray(text, dtype=object).reshape(-1)):
        try:
            caption = _text_of(value).strip()
        except SkippedExample:
            undecodable += 1
            continue
        if caption:
            candidates.append(caption)
    if not candidates:
        raise SkippedExample("undecodable_caption" if undecodable else "empty_caption")
    return candidates[int(rng.integers(len(candidates)))]


@dataclasses.dataclass(frozen=True)
class ExamplePreparer:
    """Turns a RawExample into (image uint8 (size, size, 3), caption, converted): decoding, the
    caption draw, open_clip's random resized crop and bicubic resize. Normalisation happens per
    batch (`normalize_images`), so workers send back a quarter of the bytes."""

    image_size: int
    seed: int
    limits: ImageLimits = ImageLimits()
    crop_scale: tuple[float, float] = transforms.DEFAULT_TRAIN_SCALE
    reduced_jpeg_decoding: bool = True

    def reduced_decoding_size(self) -> int | None:
        if not self.reduced_jpeg_decoding:
            return None
        # A crop's shorter side is at least sqrt(scale_min / max_ratio) of the image's shorter side
        # (max_ratio = 4/3, sqrt = 1.155): decoding to at least this size never makes a crop
        # smaller than the output, so a reduced decode is never upsampled afterwards.
        max_ratio = transforms.DEFAULT_TRAIN_RATIO[1]
        return int(math.ceil(self.image_size * math.sqrt(max_ratio / self.crop_scale[0])))

    def __call__(self, example: RawExample, reader: RecordReader | None = None) -> tuple[np.ndarray, str, bool]:
        """(pixels, caption, converted) or raises SkippedExample."""
        if example.problem is not None:
            raise SkippedExample(example.problem, example.description)
        image_data, text = example_contents(example, reader)
        if image_data is None:
            raise SkippedExample("missing_image", example.description)
        rng = example_rng(self.seed, example.epoch, example.identity)
        caption = choose_caption(text, rng)
        image, converted = decode_image(image_data, self.limits, self.reduced_decoding_size())
        # transforms.train_transform's crop, without its per-image normalisation.
        top, left, height, width = transforms.sample_random_resized_crop(
            image.width, image.height, rng, scale=self.crop_scale
        )
        cropped = image.crop((left, top, left + width, top + height))
        if cropped.size != (self.image_size, self.image_size):
            cropped = cropped.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC)
        return np.asarray(cropped, dtype=np.uint8), caption, converted


_MEAN = np.asarray(transforms.OPENAI_MEAN, np.float32)
_STD = np.asarray(transforms.OPENAI_STD, np.float32)


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 with OpenAI's statistics, in the clip_jax.transforms order
    (/255, -mean, /std: the same bits). Statistics are tiled along each row, so numpy's inner loop
    runs over whole rows rather than over 3 channels (about 10x faster)."""
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., H, W, 3) images, got {images.dtype} {images.shape}")
    width = images.shape[-2]
    rows = images.reshape(-1, width * 3).astype(np.float32)
    rows /= np.float32(255)
    rows -= np.tile(_MEAN, width)
    rows /= np.tile(_STD, width)
    return rows.reshape(images.shape)


# --------------------------------------------------------------------------------------------
# Ordered parallel preparation, in worker threads or processes.
# --------------------------------------------------------------------------------------------

WORKER_KINDS: tuple[str, ...] = ("process", "thread")
# Examples per task sent to a worker: amortises the per-task cost of a process pool.
_CHUNK_SIZE = 8

# What a worker process prepares with; set once per process by its pool's initializer.
_worker_function: Callable[[RawExample], Any] | None = None


def default_num_workers() -> int:
    """One worker per CPU core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class PreparerWithReader:
    """A picklable f(example) -> preparer(example, reader)."""

    preparer: Callable[..., Any]
    reader: RecordReader | None

    def __call__(self, example: RawExample) -> Any:
        return self.preparer(example, self.reader)


def _set_worker_function(function: Callable[[RawExample], Any]) -> None:
    global _worker_function
    _worker_function = function


def _run_chunk(
    examples: list[RawExample], function: Callable[[RawExample], Any] | None = None
) -> list[tuple[Any, str | None]]:
    """[(result or None, skip reason or None)] of `function` (the process's own one if None)."""
    function = function or _worker_function
    results = []
    for example in examples:
        try:
            results.append((function(example), None))
        except SkippedExample as skipped:
            results.append((None, skipped.reason))
    return results


class WorkerPool:
    """Runs `function` over chunks of examples in `num_workers` threads or processes.

    Processes come from a "forkserver" (forking the training process itself, whose JAX runtime
    holds threads, is unsafe); `function` is pickled once per worker, not per task.
    """

    def __init__(self, function: Callable[[RawExample], Any], num_workers: int, worker_kind: str) -> None:
        if worker_kind not in WORKER_KINDS:
            raise ValueError(f"data.worker_kind must be one of {WORKER_KINDS}, got {worker_kind!r}")
        if num_workers < 1:
            raise ValueError(f"the number of workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.worker_kind = worker_kind
        if worker_kind == "process":
            import multiprocessing

            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._executor: concurrent.futures.Executor = concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=context, initializer=_set_worker_function, initargs=(function,)
            )
            self._function = None
        else:
            self._executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="clip_jax-data")
            self._function = function

    def submit(self, examples: list[RawExample]) -> concurrent.futures.Future:
        return self._executor.submit(_run_chunk, examples, self._function)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def prepared_in_order(
    items: Iterator[tuple[RawExample, Any]],
    pool: WorkerPool,
    lookahead: int,
) -> Iterator[tuple[RawExample, Any, Any, str | None]]:
    """(example, tag, result or None, skip reason or None) in the order of `items`, with up to
    `lookahead` examples being prepared by `pool` ahead of the consumer."""
    pending: collections.deque = collections.deque()  # (example, tag, future or None, index in chunk)
    chunk: list[tuple[RawExample, Any]] = []
    exhausted = False

    def send_chunk() -> None:
        future = pool.submit([example for example, _ in chunk])
        pending.extend((example, tag, future, index) for index, (example, tag) in enumerate(chunk))
        chunk.clear()

    while True:
        while not exhausted and len(pending) + len(chunk) < lookahead:
            try:
                example, tag = next(items)
            except StopIteration:
                exhausted = True
                break
            if example.problem is not None:  # nothing to decode: never sent to a worker
                if chunk:
                    send_chunk()
                pending.append((example, tag, None, 0))
                continue
            chunk.append((example, tag))
            if len(chunk) == _CHUNK_SIZE:
                send_chunk()
        if chunk:
            send_chunk()
        if not pending:
            return
        example, tag, future, index = pending.popleft()
        if future is None:
            yield example, tag, None, example.problem
        else:
            result, reason = future.result()[index]
            yield example, tag, result, reason


# --------------------------------------------------------------------------------------------
# The training iterator.
# --------------------------------------------------------------------------------------------


def new_counters() -> dict[str, int]:
    return {name: 0 for name in COUNTER_NAMES}


class TrainIterator:
    """Endless iterator over this process's rows of each global batch:
    {"images": float32 (local_batch, size, size, 3) normalised, "texts": int32 (local_batch, L)}.

    `state` is the JSON-serialisable position after the last batch returned (with the skip
    counters); `make_train_iterator(..., start_state=state)` continues with the batch that would
    have come next. Behind a prefetching consumer, use `batches_with_state()`, which pairs each
    batch with the state just after it.
    """

    def __init__(
        self,
        source: ExampleSource,
        tokenizer: Callable[..., np.ndarray],
        preparer: ExamplePreparer,
        local_batch_size: int,
        process_index: int,
        process_count: int,
        num_workers: int,
        start_state: Mapping[str, Any] | None = None,
        worker_kind: str = "process",
    ) -> None:
        if local_batch_size < 1:
            raise ValueError(f"the per-process batch size must be >= 1, got {local_batch_size}")
        self.source = source
        self.tokenizer = tokenizer
        self.preparer = preparer
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.num_workers = num_workers
        self.state = self._starting_state(start_state)
        self._pool = WorkerPool(PreparerWithReader(preparer, source.record_reader()), num_workers, worker_kind)
        self._generator: Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]] | None = None
        self._warned_reasons: set[str] = set()

    def _starting_state(self, start_state: Mapping[str, Any] | None) -> dict[str, Any]:
        fresh = {
            "version": STATE_VERSION,
            "source": dict(self.source.initial_position()),
            "fingerprint": self.source.fingerprint(),
            "seed": self.preparer.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "batches": 0,
            "examples_read": 0,
            "counters": new_counters(),
        }
        if start_state is None:
            return fresh
        start_state = json.loads(json.dumps(start_state))  # a private copy
        if start_state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data iterator state version {start_state.get('version')!r}: {start_state!r:.300}")
        changed = [
            f"{field}: {start_state.get(field)!r} saved, {fresh[field]!r} now"
            for field in ("fingerprint", "seed", "process_index", "process_count")
            if start_state.get(field) != fresh[field]
        ]
        counters = {**new_counters(), **start_state.get("counters", {})}
        if changed:
            # Positions are per process and per source layout: they mean nothing in another one.
            # Go on from the start of the next epoch rather than repeat or guess.
            next_epoch = int(start_state.get("source", {}).get("epoch", -1)) + 1
            logger.warning(
                "The saved data position belongs to another source or topology (%s); continuing "
                "from the start of epoch %d instead of the exact next batch.",
                "; ".join(changed),
                next_epoch,
            )
            fresh["source"] = {**fresh["source"], "epoch": next_epoch}
            fresh.update(batches=int(start_state.get("batches", 0)), counters=counters)
            return fresh
        start_state["counters"] = counters
        return start_state

    def _generate(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        state = json.loads(json.dumps(self.state))
        counters = state["counters"]
        size = self.preparer.image_size
        lookahead = max(2 * self.local_batch_size, 4 * _CHUNK_SIZE * self.num_workers)
        stream = prepared_in_order(self.source.examples(state["source"]), self._pool, lookahead)
        images = np.empty((self.local_batch_size, size, size, 3), dtype=np.uint8)
        captions: list[str] = []
        # Data where nothing is usable (a wrong text extension, say) must stop the run, not spin:
        # after a whole epoch, or very many examples in a row, without one usable example.
        examples_since_last_use = 0
        epoch_of_last_use = int(state["source"].get("epoch", 0)) - 1
        for example, position, result, skipped in stream:
            state["examples_read"] += 1
            state["source"] = position
            if skipped is not None:
                counters[skipped] = counters.get(skipped, 0) + 1
                self._log_first_skip(skipped, example)
                examples_since_last_use += 1
                if example.epoch >= epoch_of_last_use + 2 or examples_since_last_use > MAX_SKIPS_IN_A_ROW:
                    raise RuntimeError(
                        f"The last {examples_since_last_use} examples of {self.source.fingerprint()} were all "
                        f"skipped (counters: {counters}); check the data and the data.* settings."
                    )
                continue
            examples_since_last_use = 0
            epoch_of_last_use = example.epoch
            pixels, caption, converted = result
            if converted:
                counters[CONVERTED_IMAGE_MODE] += 1
            images[len(captions)] = pixels
            captions.append(caption)
            if len(captions) == self.local_batch_size:
                state["batches"] += 1
                batch = {
                    "images": normalize_images(images),
                    "texts": np.asarray(self.tokenizer(captions, truncate=True), np.int32),
                }
                yield batch, json.loads(json.dumps(state))
                captions = []
        raise RuntimeError(f"the source {self.source.fingerprint()} ended; training sources are endless")

    def _log_first_skip(self, reason: str, example: RawExample) -> None:
        if reason not in self._warned_reasons:
            self._warned_reasons.add(reason)
            logger.warning("Skipping %s: %s; further skips are only counted.", example.description or "an example", reason)

    def batches_with_state(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """(batch, state after it) pairs; iterate this OR the iterator itself, not both."""
        if self._generator is None:
            self._generator = self._generate()
        for batch, state in self._generator:
            self.state = state
            yield batch, state

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._generator is None:
            self._generator = self._generate()
        batch, self.state = next(self._generator)
        return batch

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.state["counters"])

    def close(self) -> None:
        """Stops the decoding workers and the source's readers (pending work is dropped)."""
        if self._generator is not None:
            try:
                self._generator.close()
            except ValueError:  # still running in a consumer's thread (a prefetcher): it stops on its own
                pass
        self._pool.shutdown()
        self.source.close()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def caption_sample(source: ExampleSource, count: int, seed: int = 0, num_workers: int = 0) -> list[str]:
    """Up to `count` usable captions from the start of `source` (at most one epoch; no image is
    decoded), e.g. to train a SentencePiece tokenizer on the training text."""
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")

    captions: list[str] = []
    if count == 0:
        return captions
    # Threads: reading text is I/O and light parsing, and a process pool would cost its start-up.
    pool = WorkerPool(
        PreparerWithReader(_CaptionReader(seed), source.record_reader()), num_workers or default_num_workers(), "thread"
    )
    try:
        stream = prepared_in_order(source.examples(source.initial_position()), pool, 8 * _CHUNK_SIZE * pool.num_workers)
        for example, _, caption, skipped in stream:
            if example.epoch > 0:
                break
            if skipped is None:
                captions.append(caption)
                if len(captions) == count:
                    break
    finally:
        pool.shutdown()
    return captions


@dataclasses.dataclass(frozen=True)
class _CaptionReader:
    """The caption an example would be trained with (no image decoded)."""

    seed: int

    def __call__(self, example: RawExample, reader: RecordReader | None = None) -> str:
        if example.problem is not None:
            raise SkippedExample(example.problem)
        _, text = example_contents(example, reader)
        return choose_caption(text, example_rng(self.seed, example.epoch, example.identity))


def preparer_from_config(data_config: ml_collections.ConfigDict, image_size: int) -> ExamplePreparer:
    """The decode + augment settings of `config.data`."""
    scale = tuple(float(value) for value in data_config.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(
            f"data.crop_scale must be (lower, upper) with 0 < lower <= upper <= 1, got {data_config.crop_scale!r}"
        )
    limits = ImageLimits(
        min_image_size=int(data_config.min_image_size),
        max_image_pixels=int(data_config.max_image_pixels),
        max_aspect_ratio=float(data_config.max_aspect_ratio),
    )
    if limits.min_image_size < 1 or limits.max_image_pixels < 1 or limits.max_aspect_ratio < 1:
        raise ValueError(
            "data.min_image_size and data.max_image_pixels must be >= 1 and data.max_aspect_ratio >= 1; "
            f"got {limits.min_image_size}, {limits.max_image_pixels}, {limits.max_aspect_ratio}"
        )
    return ExamplePreparer(
        image_size=int(image_size),
        seed=int(data_config.seed),
        limits=limits,
        crop_scale=scale,
        reduced_jpeg_decoding=bool(data_config.reduced_jpeg_decoding),
    )


def make_train_source(
    data_config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> ExampleSource:
    """The raw-example source `config.data.name` names, for this process; checks the data exists
    (shards found, TFDS dataset prepared) so a bad path fails before anything is compiled."""
    check_process_layout(process_index, process_count)
    if data_config.name == "tfds":
        from clip_jax.data import tfds as tfds_source

        return tfds_source.source_from_config(data_config, process_index, process_count)
    if data_config.name == "webdataset":
        from clip_jax.data import webdataset

        return webdataset.source_from_config(data_config, process_index, process_count)
    if data_config.name == "synthetic":
        raise ValueError(
            "data.name='synthetic' is served by clip_jax.data.synthetic (SyntheticShapes.batch_iterator), "
            "not by this pipeline"
        )
    raise ValueError(f"unknown data.name {data_config.name!r}; expected one of {SOURCE_NAMES}")


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    tokenizer: Callable[..., np.ndarray],
    global_batch_size: int,
    image_size: int,
    process_index: int,
    process_count: int,
    start_state: Mapping[str, Any] | None = None,
    source: ExampleSource | None = None,
) -> TrainIterator:
    """The training iterator of `config.data` for one process (see TrainIterator).

    `start_state`: a `TrainIterator.state` saved earlier (None = the beginning). `source`: one made
    beforehand by `make_train_source` (to fail early on missing data); made here otherwise.
    """
    check_process_layout(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the {process_count} processes"
        )
    preparer = preparer_from_config(data_config, image_size)
    if int(data_config.num_workers) < 0:
        raise ValueError(f"data.num_workers must be >= 0 (0 = one per CPU core), got {data_config.num_workers}")
    num_workers = int(data_config.num_workers) or default_num_workers()
    if data_config.worker_kind not in WORKER_KINDS:
        raise ValueError(f"data.worker_kind must be one of {WORKER_KINDS}, got {data_config.worker_kind!r}")
    if source is None:
        source = make_train_source(data_config, process_index, process_count)
    return TrainIterator(
        source,
        tokenizer,
        preparer,
        global_batch_size // process_count,
        process_index,
        process_count,
        num_workers,
        start_state,
        worker_kind=str(data_config.worker_kind),
    )


# --------------------------------------------------------------------------------------------
# Saving states of all processes in one checkpoint.
# --------------------------------------------------------------------------------------------


def gather_states(local_state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every process's iterator state, in process order, on every process (a checkpoint written by
    process 0 must hold them all). A collective: every process must call it at the same step."""
    import jax

    if jax.process_count() == 1:
        return [json.loads(json.dumps(local_state))]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(local_state).encode("utf-8"), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size], np.int64))).reshape(-1)
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[: encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(gathered[index, : lengths[index]].tobytes().decode("utf-8")) for index in range(len(lengths))]


def local_state(saved_states: Sequence[Mapping[str, Any]] | None, process_index: int, process_count: int) -> dict | None:
    """This process's entry of `gather_states`' list (None when nothing was saved). With another
    process count than the saved run, process 0's state is returned: TrainIterator sees the
    changed topology and goes on from the next epoch."""
    if not saved_states:
        return None
    if len(saved_states) == process_count:
        return dict(saved_states[process_index])
    return dict(saved_states[0])


def summed_counters(states: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Skip counters of all processes added up (for the training log)."""
    total = new_counters()
    for state in states:
        for name, count in state.get("counters", {}).items():
            total[name] = total.get(name, 0) + int(count)
    return total
