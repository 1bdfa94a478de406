"""Elastic exact resume: a data position saved by N processes continues on M.

Random-access sources (the built-in data, TFDS data_source) read one global order that does not
depend on the process count, so a run resumed on any topology sees exactly the examples, in the
same global order, that an uninterrupted run sees; compared here by example ids (recorded from the
source as the iterator pulls them) and by the pixels of every global batch. Tar shards (sequential
reads) see each remaining example of the epoch exactly once across the interruption. End-to-end
runs of train.py (2 processes with 2 devices each, resumed in 1 process with 8 and with 2
devices), on the built-in data and on a mocked TFDS dataset, check the losses equal an
uninterrupted run's.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from run_helpers import finish, free_port

from clip_jax.data import iterator as data_iterator
from clip_jax.data.config import default_data_config
from clip_jax.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 16


def length_tokenizer(texts, truncate=True):
    return np.array([[len(text)] for text in texts], np.int32)


class RecordingSource:
    """A source that records (epoch, *identity) of every example the iterator pulls, in order."""

    def __init__(self, source) -> None:
        self._source = source
        self.seen: list[tuple[int, ...]] = []

    def __getattr__(self, name):
        return getattr(self._source, name)

    def examples(self, position, text_only=False):
        for example, after in self._source.examples(position, text_only):
            self.seen.append((example.epoch, *example.identity))
            yield example, after


Run = collections.namedtuple("Run", "ids images states")


def run(config, process_count, batches, global_batch, saved_states=None):
    """`batches` global batches read by `process_count` processes (in this one): the ids and the
    pixels of each global batch (process 0's rows first, as the loop assembles them) and every
    process's state after them (what a checkpoint's data_states holds)."""
    recorders, iterators = [], []
    for index in range(process_count):
        source = data_iterator.make_train_source(
            config, index, process_count, image_size=IMAGE_SIZE, global_batch_size=global_batch
        )
        recorders.append(RecordingSource(source))
        start = data_iterator.local_state(saved_states, index, process_count)
        iterators.append(
            data_iterator.make_train_iterator(
                config, length_tokenizer, global_batch, IMAGE_SIZE, index, process_count, start, recorders[-1]
            )
        )
    try:
        local = global_batch // process_count
        per_process = [[next(iterator) for _ in range(batches)] for iterator in iterators]
        ids = [
            [recorder.seen[b * local + row] for recorder in recorders for row in range(local)] for b in range(batches)
        ]
        images = [np.concatenate([rows[b]["images"] for rows in per_process]) for b in range(batches)]
        states = json.loads(json.dumps([iterator.state for iterator in iterators]))  # as a checkpoint stores them
    finally:
        for iterator in iterators:
            iterator.close()
    return Run(ids, images, states)


def synthetic_config():
    config = default_data_config()
    config.num_workers = 2
    return config


def tfds_config():
    config = default_data_config()
    config.name = "tfds"
    config.num_workers = 2
    config.worker_kind = "thread"  # worker processes would not see tfds.testing.mock_data
    config.min_image_size = 1  # the mocked images may be a few pixels wide
    config.max_aspect_ratio = 100.0
    config.tfds.name = "coco_captions"
    config.tfds.reader = "data_source"
    config.tfds.image_decoder = "tfds"  # the mock cannot encode coco_captions' nested sequences
    return config


@pytest.mark.parametrize("source_name", ["synthetic", "tfds"])
def test_random_access_sources_resume_on_any_process_count_in_the_same_global_order(source_name):
    import contextlib

    if source_name == "tfds":
        tfds = pytest.importorskip("tensorflow_datasets")
        config, mocked = tfds_config(), tfds.testing.mock_data(num_examples=10)
    else:
        config, mocked = synthetic_config(), contextlib.nullcontext()
    global_batch, before, after = 4, 2, 3  # TFDS: 20 examples of 10, so the resume crosses an epoch
    with mocked:
        reference = run(config, 1, before + after + 1, global_batch)
        interrupted = run(config, 2, before, global_batch)
        resumed = {count: run(config, count, after, global_batch, interrupted.states) for count in (1, 4)}
        # Saved again on 4 processes and resumed on 1: still the uninterrupted order.
        again = run(config, 1, 1, global_batch, resumed[4].states)
    if source_name == "tfds":  # the global order is a fresh permutation of the whole split each epoch
        flat = [example for batch in reference.ids for example in batch]
        assert sorted(record for _, record in flat[:10]) == list(range(10)) and {e for e, _ in flat[:10]} == {0}
        assert sorted(record for _, record in flat[10:20]) == list(range(10)) and {e for e, _ in flat[10:20]} == {1}
    assert interrupted.ids == reference.ids[:before]  # two processes read the one-process order
    for count, continued in resumed.items():
        assert interrupted.ids + continued.ids == reference.ids[: before + after], count
        for got, want in zip(interrupted.images + continued.images, reference.images):
            assert got.tobytes() == want.tobytes()  # same examples, same crops
    assert again.ids == reference.ids[before + after :]
    assert again.images[0].tobytes() == reference.images[-1].tobytes()


def test_after_skips_a_resume_on_another_topology_repeats_nothing():
    from clip_jax.data import sources

    # Process 1 of 2 skipped two examples, so it read 2 rows into global batch 2 (batches of 8).
    offsets = [8, 10]
    read = {
        int(t)
        for index, offset in enumerate(offsets)
        for t in sources.process_stream_index(np.arange(offset), 8, index, 2)
    }
    assert read == set(range(16)) | {20, 21}  # independent: rows [4, 8) of each batch are process 1's
    batches, exact = sources.global_batches_started(offsets, 8)
    assert (batches, exact) == (3, False)
    assert sources.global_batches_started([8, 8], 8) == (2, True)
    for count in (1, 4):
        starts = [
            int(sources.process_stream_index(np.array([batches * 8 // count]), 8, index, count)[0])
            for index in range(count)
        ]
        assert min(starts) == 24 > max(read)  # the next global batch no process had started


# --------------------------------------------------------------------------------------------
# Tar shards: every example of the epoch exactly once across the interruption.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """7 shards of 5 samples: 2 processes own 4 and 3 shards, so they change epochs apart."""
    from test_data_webdataset import good_samples, write_tar

    directory = tmp_path_factory.mktemp("elastic_shards")
    for shard in range(7):
        write_tar(str(directory / f"{shard:05d}.tar"), good_samples(f"s{shard}-", 5, start_seed=10 * shard))
    return str(directory / "*.tar")


def shard_config(pattern):
    config = default_data_config()
    config.name = "webdataset"
    config.webdataset.shards = pattern
    config.webdataset.shards_per_window = 2
    config.num_workers = 2
    config.worker_kind = "thread"
    return config


def plan_examples(config, saved_states, process_count, global_batch):
    """What `process_count` processes resumed from `saved_states` read before each begins an epoch
    of its own topology (the rest of the saved run's epochs), as (epoch, shard, member)."""
    read = []
    for index in range(process_count):
        start = data_iterator.local_state(saved_states, index, process_count)
        with data_iterator.make_train_iterator(
            config, length_tokenizer, global_batch, IMAGE_SIZE, index, process_count, start
        ) as iterator:
            position = iterator.state["source"]
            assert set(position) == {"epoch", "window", "offset", "plan"}, position  # not the next-epoch fallback
            for example, after in iterator.source.examples(position) if position["plan"] else ():
                if "plan" not in after:
                    break  # the first example of the new topology's own epoch
                read.append((example.epoch, *example.identity))
    return read


def every_example(epochs, shards=7, per_shard=5):
    return sorted((epoch, shard, member) for epoch in epochs for shard in range(shards) for member in range(per_shard))


def test_shards_resumed_on_another_process_count_read_every_example_of_the_epoch_once(uneven_shards):
    config = shard_config(uneven_shards)
    global_batch = 12
    # 2 processes, 18 examples each: process 1 (15 samples an epoch) is 3 into epoch 1, process 0
    # (20) is 18 into epoch 0, inside its second window.
    interrupted = run(config, 2, 3, global_batch)
    before = [example for batch in interrupted.ids for example in batch]
    assert {epoch for epoch, *_ in before} == {0, 1}
    for count in (1, 3, 4):
        after = plan_examples(config, interrupted.states, count, global_batch)
        assert sorted(before + after) == every_example((0, 1)), count
    # Resumed on 3 processes, saved after one batch (one process runs out of its part of the plan
    # and begins epoch 2 of its own topology), resumed on 2: still every example exactly once.
    middle_run = run(config, 3, 1, global_batch, interrupted.states)
    middle = [example for batch in middle_run.ids for example in batch]
    assert max(epoch for epoch, *_ in middle) == 2
    after = plan_examples(config, middle_run.states, 2, global_batch)
    assert sorted(before + middle + after) == every_example((0, 1, 2))


# --------------------------------------------------------------------------------------------
# End to end: train.py on 2 processes, resumed in 1 process with 8 and with 2 devices.
# --------------------------------------------------------------------------------------------

FLAGS = [
    "--config.global_batch_size=16",
    "--config.log_every_steps=1",
    "--config.eval.num_examples=0",  # no evaluation: only the training steps are compared
    "--config.tokenizer.training_captions=2000",
    # Warmup over step 0 only: step s < total has the same learning rate whether the run ends at
    # step 2 or 4 (the cosine starts at its peak at step 1), so a run stopped at 2 and continued
    # to 4 follows the schedule of the run that goes to 4.
    "--config.optimizer.warmup_steps=1",
]


# The mocked coco_captions (tests/mock_tfds_train.py), read by random access: 24 examples, so the
# 64 examples of 4 steps of 16 cross two epoch boundaries, one of them at the interruption.
TFDS_EXAMPLES = 24
TFDS_FLAGS = [
    "--config.data.name=tfds",
    "--config.data.tfds.name=coco_captions",
    "--config.data.tfds.reader=data_source",
    "--config.data.tfds.image_decoder=tfds",  # the mock cannot encode coco_captions' nested sequences
    "--config.data.worker_kind=thread",  # worker processes would not see the mock
    "--config.data.min_image_size=1",  # the mocked images may be a few pixels wide
    "--config.data.max_aspect_ratio=100",
    "--config.tokenizer.training_captions=200",
]


def _start(workdir, device_count, cache, total_steps, *extra, source="synthetic"):
    env = {**os.environ, **cache, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    launcher = (
        ["train.py"] if source == "synthetic" else [os.path.join("tests", "mock_tfds_train.py"), str(TFDS_EXAMPLES)]
    )
    source_flags = [] if source == "synthetic" else TFDS_FLAGS
    command = [sys.executable, *launcher, f"--workdir={workdir}", f"--config.total_steps={total_steps}", *FLAGS,
               *source_flags]  # fmt: skip
    return subprocess.Popen(
        [*command, *extra], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _losses(workdir):
    return {record["step"]: record["loss"] for record in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in record}  # fmt: skip


def _data_states(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "progress", "metadata")) as file:
        return json.load(file)["data_states"]


@pytest.mark.parametrize("source", ["synthetic", "tfds"])
def test_train_py_on_two_processes_resumed_on_eight_and_on_two_devices_matches_the_uninterrupted_run(
    source, tmp_path, compilation_cache_env
):
    cache = compilation_cache_env
    reference_dir, interrupted_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    address = f"127.0.0.1:{free_port()}"
    running = [_start(reference_dir, 4, cache, 4, source=source)] + [
        _start(interrupted_dir, 2, cache, 2, f"--coordinator_address={address}", "--num_processes=2",
               f"--process_id={index}", source=source)
        for index in range(2)
    ]  # fmt: skip
    for process in running:
        finish(process)
    saved = _data_states(interrupted_dir, 2)
    assert [state["process_count"] for state in saved] == [2, 2]
    resumed_dirs = {count: str(tmp_path / f"resumed_on_{count}") for count in (8, 2)}
    for directory in resumed_dirs.values():
        shutil.copytree(interrupted_dir, directory)
    running = [_start(directory, count, cache, 4, source=source) for count, directory in resumed_dirs.items()]
    outputs = [finish(process) for process in running]
    assert all("Resumed from the checkpoint of step 2" in output for output in outputs)
    reference = _losses(reference_dir)
    final = _data_states(reference_dir, 4)[0]["source"]
    if source == "synthetic":
        assert final == {"epoch": 0, "offset": 4 * 16}  # the built-in data: examples [0, 64) in order
    for count, directory in resumed_dirs.items():
        losses = _losses(directory)
        assert sorted(losses) == [1, 2, 3, 4], count
        # Steps 1-2 ran on 2 processes, 3-4 in one process with another device count: the sums
        # run in other orders (last-bit differences); other rows would move the loss by ~1e-2.
        np.testing.assert_allclose([losses[step] for step in range(1, 5)], [reference[step] for step in range(1, 5)],
                                   rtol=2e-5, err_msg=f"resumed on {count} devices")  # fmt: skip
        # The resumed run's data position is the uninterrupted one's: the same examples were read.
        (state,) = _data_states(directory, 4)
        assert state["source"] == final and state["batches"] == 4, count
