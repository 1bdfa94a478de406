"""What every training source shares: the raw example it hands over, the source and record-reader
protocols, the reasons an example is skipped, and the seeds and permutations that make every
random choice a pure function of integers.

This is the bottom of clip_jax/data: it imports nothing else of clip_jax, and every other data
module (decode, workers, the sources, the iterator) may import it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

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

ImageData = bytes | np.ndarray

logger = logging.getLogger(__name__)


def new_counters() -> dict[str, int]:
    """Every counter of COUNTER_NAMES at zero."""
    return {name: 0 for name in COUNTER_NAMES}


class SkippedExample(Exception):
    """Raised while reading or preparing an example that cannot be used; `reason` is a
    SKIP_REASONS entry."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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
    """A deterministic, endless stream of raw examples for one process, resumable at any point.

    A source may also have `resume_position(saved_positions) -> position | None`: this process's
    position continuing a run whose processes (another number of them) saved `saved_positions`
    (elastic resume); without it, or when it returns None, such a run starts the next epoch.
    """

    # True when every image is a uint8 (size, size, 3) array already at the model's image size and
    # meant to be used as it is: no random resized crop (the built-in dataset draws at that size).
    ready_sized: bool

    def initial_position(self) -> dict[str, int]:
        """The position of the first example of epoch 0."""

    def examples(
        self, position: Mapping[str, int], text_only: bool = False
    ) -> Iterator[tuple[RawExample, dict[str, int]]]:
        """The raw examples from `position` on, each with the position just after it. `text_only`:
        the reader wants the captions alone (a tokenizer's sample), so a source may leave images
        out (None) where producing them costs more than reading the example anyway."""

    def fingerprint(self) -> str:
        """What the positions refer to (dataset, size, layout): a resume checks it is unchanged."""

    def record_reader(self) -> RecordReader | None:
        """The reader of the `record`s its examples name (None if they carry their contents)."""

    def close(self) -> None:
        """Stop background reading."""


# --------------------------------------------------------------------------------------------
# Process layout.
# --------------------------------------------------------------------------------------------


def check_process_layout(process_index: int, process_count: int) -> None:
    """Raises ValueError unless 0 <= process_index < process_count."""
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")


def even_share(total: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of process `process_index`'s contiguous share of `total` items: sizes differ by
    at most one, shares are disjoint and cover everything (what tfds.even_splits does)."""
    check_process_layout(process_index, process_count)
    start = (process_index * total) // process_count
    end = ((process_index + 1) * total) // process_count
    return start, end


def global_batches_started(offsets: Sequence[int], global_batch_size: int) -> tuple[int, bool]:
    """For a random-access source read in global batches (process p of P reads rows
    [p·B/P, (p+1)·B/P) of each global batch of B), given every saved process's offset (its examples
    read): (the first global batch that no process had started, whether every process stood exactly
    at its start). Not exact only after skipped examples, which move a process further on alone.
    """
    if not offsets or global_batch_size % len(offsets):
        raise ValueError(f"{len(offsets)} saved positions do not divide the global batch {global_batch_size}")
    local = global_batch_size // len(offsets)
    batches = max(-(-int(offset) // local) for offset in offsets)
    exact = all(int(offset) == batches * local for offset in offsets)
    if not exact:
        # Rows of the started batches that some process had not read yet are left out (never
        # repeated): after skips, the saved processes stood at different places.
        logger.warning(
            "The saved processes stood at different places (skipped examples); continuing at global batch "
            "%d, leaving out %d unread examples of the batches before it.",
            batches,
            sum(batches * local - int(offset) for offset in offsets),
        )
    return batches, exact


def process_stream_index(
    offsets: np.ndarray, global_batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
    """Global stream positions of a process's `offsets`-th examples: its contiguous rows of each
    global batch of `global_batch_size` consecutive positions."""
    local = global_batch_size // process_count
    steps, rows = np.divmod(np.asarray(offsets, dtype=np.int64), local)
    return steps * global_batch_size + process_index * local + rows


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


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a one-to-one scramble of uint64 values (wrapping arithmetic).

    The one hash of clip_jax/data: the permutations below and the built-in dataset's
    counter-based randomness both use it.
    """
    with np.errstate(over="ignore"):
        values = np.asarray(values).astype(np.uint64, copy=False)
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
            mixed = mix64(right ^ round_key) & half_mask
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
