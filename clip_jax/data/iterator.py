"""The training iterator: one process's endless stream of ready batches from any source (the
built-in dataset, TFDS, WebDataset shards), with its exact position and skip counters as a JSON
state; the factory that picks the source by `config.data.name`; the caption sample a tokenizer is
trained on; and the helpers that save every process's state in one checkpoint.

Every random choice (permutations, caption choice, crop) is a pure function of (seed, epoch,
example identity), so a batch depends on the seed, the topology and its position, never on
worker timing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from clip_jax.data import synthetic, webdataset
from clip_jax.data import tfds as tfds_source
from clip_jax.data.config import DataSettings, data_settings
from clip_jax.data.decode import ExamplePreparer, choose_caption, normalize_images, preparer_from_config
from clip_jax.data.sources import (
    CONVERTED_IMAGE_MODE,
    ExampleSource,
    RawExample,
    RecordReader,
    SkippedExample,
    check_process_layout,
    example_contents,
    example_rng,
    new_counters,
)
from clip_jax.data.workers import (
    CHUNK_SIZE,
    PreparerWithReader,
    WorkerPool,
    default_num_workers,
    prepared_in_order,
)

logger = logging.getLogger(__name__)


STATE_VERSION = 1

# A run stops when this many examples in a row are unusable (the data or the settings are wrong).
MAX_SKIPS_IN_A_ROW = 100_000


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
            raise ValueError(
                f"unknown data iterator state version {start_state.get('version')!r}: {start_state!r:.300}"
            )
        changed = [
            f"{field}: {start_state.get(field)!r} saved, {fresh[field]!r} now"
            for field in ("fingerprint", "seed", "process_index", "process_count")
            if start_state.get(field) != fresh[field]
        ]
        counters = {**new_counters(), **start_state.get("counters", {})}
        # Every saved process's position (local_state adds them); a state saved alone has its own.
        saved_positions = start_state.pop("saved_positions", None) or [start_state.get("source", {})]
        if not changed:
            start_state["counters"] = counters
            return start_state
        fresh.update(
            batches=int(start_state.get("batches", 0)),
            counters=counters,
            examples_read=int(start_state.get("examples_read", 0)),
        )
        position = self._resumed_elsewhere(changed, saved_positions)
        if position is not None:
            fresh["source"] = position
            return fresh
        # Positions are per source layout: they mean nothing in another one. Go on from the start
        # of the next epoch (after every saved process's) rather than repeat or guess.
        next_epoch = max(int(saved.get("epoch", -1)) for saved in saved_positions) + 1
        logger.warning(
            "The saved data position belongs to another source (%s); continuing from the start of "
            "epoch %d instead of the exact next batch.",
            "; ".join(changed),
            next_epoch,
        )
        fresh["source"] = {**fresh["source"], "epoch": next_epoch}
        return fresh

    def _resumed_elsewhere(self, changed: list[str], saved_positions: list[dict[str, Any]]) -> dict[str, Any] | None:
        """This process's position continuing a run saved on another topology (same source, seed
        and settings), from the source's `resume_position`; None where the source has none."""
        if any(not reason.startswith(("process_index", "process_count")) for reason in changed):
            return None
        resume_position = getattr(self.source, "resume_position", None)
        position = resume_position(saved_positions) if resume_position is not None else None
        if position is not None:
            logger.info(
                "Data resumed on %d process(es) from a state saved by %d: %s for process %d",
                self.process_count, len(saved_positions), position, self.process_index,
            )  # fmt: skip
        return position

    def _generate(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        state = json.loads(json.dumps(self.state))
        counters = state["counters"]
        size = self.preparer.image_size
        lookahead = max(2 * self.local_batch_size, 4 * CHUNK_SIZE * self.num_workers)
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
            logger.warning(
                "Skipping %s: %s; further skips are only counted.", example.description or "an example", reason
            )

    def batches_with_state(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """(batch, state after it) pairs; iterate this OR the iterator itself, not both."""
        if self._generator is None:
            self._generator = self._generate()
        for batch, state in self._generator:
            self.state = state
            yield batch, state

    def __iter__(self) -> TrainIterator:
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

    def __enter__(self) -> TrainIterator:
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
        examples = source.examples(source.initial_position(), text_only=True)
        stream = prepared_in_order(examples, pool, 8 * CHUNK_SIZE * pool.num_workers)
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
        return choose_caption(text, functools.partial(example_rng, self.seed, example.epoch, example.identity))


def make_train_source(
    data_config: DataSettings | ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    *,
    image_size: int | None = None,
    global_batch_size: int | None = None,
) -> ExampleSource:
    """The raw-example source `config.data.name` names, for this process; checks the data exists
    (shards found, TFDS dataset prepared) so a bad path fails before anything is compiled.

    The built-in dataset ("synthetic") also needs the model's `image_size` (it draws at that size)
    and the `global_batch_size` (each process reads its rows of every global batch).
    """
    check_process_layout(process_index, process_count)
    data_config = data_settings(data_config)
    if data_config.name == "tfds":
        return tfds_source.source_from_config(data_config, process_index, process_count, global_batch_size)
    if data_config.name == "webdataset":
        return webdataset.source_from_config(data_config, process_index, process_count)
    # "synthetic", the last of SOURCE_NAMES (DataSettings admits no other name)
    if image_size is None or global_batch_size is None:
        raise ValueError(
            f"data.name='synthetic' needs the model's image_size and the global_batch_size; got "
            f"image_size={image_size!r}, global_batch_size={global_batch_size!r}"
        )
    return synthetic.source_from_config(data_config, process_index, process_count, image_size, global_batch_size)


def make_train_iterator(
    data_config: DataSettings | ml_collections.ConfigDict,
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
    data_config = data_settings(data_config)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the {process_count} processes"
        )
    num_workers = data_config.num_workers or default_num_workers()  # DataSettings checked both
    if source is None:
        source = make_train_source(
            data_config, process_index, process_count, image_size=image_size, global_batch_size=global_batch_size
        )
    preparer = preparer_from_config(data_config, image_size, ready_sized=source.ready_sized)
    # Ready-sized examples need no decoding, only a copy: threads do that at no start-up cost,
    # where worker processes would take seconds to start and a pickled copy of every image.
    worker_kind = "thread" if source.ready_sized else data_config.worker_kind
    return TrainIterator(
        source,
        tokenizer,
        preparer,
        global_batch_size // process_count,
        process_index,
        process_count,
        num_workers,
        start_state,
        worker_kind=worker_kind,
    )


def tokenizer_captions(
    data_config: DataSettings | ml_collections.ConfigDict, count: int, *, image_size: int, global_batch_size: int
) -> list[str]:
    """Up to `count` captions from the start of the training data as a single process reads it:
    the sample a tokenizer is trained on, the same whatever the number of processes of the run
    (so a run on 2 hosts tokenizes as one on 1 host does)."""
    data_config = data_settings(data_config)
    source = make_train_source(data_config, 0, 1, image_size=image_size, global_batch_size=global_batch_size)
    try:
        return caption_sample(source, count, data_config.seed)
    finally:
        source.close()


def gather_states(local_state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every process's iterator state, in process order, on every process (a checkpoint written by
    process 0 must hold them all). A collective: every process must call it at the same step."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(local_state))]
    encoded = np.frombuffer(json.dumps(local_state).encode("utf-8"), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size], np.int64))).reshape(-1)
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[: encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(gathered[index, : lengths[index]].tobytes().decode("utf-8")) for index in range(len(lengths))]


def local_state(
    saved_states: Sequence[Mapping[str, Any]] | None, process_index: int, process_count: int
) -> dict | None:
    """This process's start state from `gather_states`' list (None when nothing was saved), with
    every saved process's position under "saved_positions". With another process count than the
    saved run, process 0's state is the base and TrainIterator sees the changed topology: the
    source continues the saved run's positions (`resume_position`) or the next epoch begins.
    The skip counters then all go to process 0, so their sum over processes stays the same."""
    if not saved_states:
        return None
    positions = [dict(state.get("source", {})) for state in saved_states]
    if len(saved_states) == process_count:
        return {**saved_states[process_index], "saved_positions": positions}
    counters = summed_counters(saved_states) if process_index == 0 else new_counters()
    examples_read = sum(int(state.get("examples_read", 0)) for state in saved_states) if process_index == 0 else 0
    return {**saved_states[0], "saved_positions": positions, "counters": counters, "examples_read": examples_read}


def summed_counters(states: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Skip counters of all processes added up (for the training log)."""
    total = new_counters()
    for state in states:
        for name, count in state.get("counters", {}).items():
            total[name] = total.get(name, 0) + int(count)
    return total
