"""Tests of the shared input pipeline: permutations and process shares, caption choice, image
decoding of odd modes and sizes, reduced JPEG decoding, ordered parallel preparation, the
training iterator's batches, counters and exact resume over an in-memory source."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import numpy as np
import PIL.Image
import pytest

from clip_jax import transforms
from clip_jax.data import decode, sources, workers
from clip_jax.data import iterator as data_iterator
from clip_jax.data.config import default_data_config
from clip_jax.data.decode import ImageLimits
from clip_jax.data.sources import RawExample, SkippedExample

IMAGE_SIZE = 16


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def number_tokenizer(texts, truncate=True):
    """Caption "caption N" -> row [N, 0]; anything else fails the test."""
    return np.array([[int(text.split()[-1]), 0] for text in texts], np.int32)


# --- permutations and shares


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 4097])
def test_permuted_indices_is_a_permutation_that_depends_on_the_key(size):
    positions = np.arange(size)
    permuted = sources.permuted_indices(positions, size, (0, 1))
    assert sorted(permuted.tolist()) == list(range(size))
    np.testing.assert_array_equal(sources.permuted_indices(positions, size, (0, 1)), permuted)
    if size >= 64:
        other = sources.permuted_indices(positions, size, (0, 2))
        assert not np.array_equal(other, permuted)
        assert not np.array_equal(permuted, positions)  # shuffled, not the identity
        # Any position on its own gives the same index as in the whole.
        np.testing.assert_array_equal(sources.permuted_indices(positions[5:9], size, (0, 1)), permuted[5:9])
    with pytest.raises(ValueError, match="positions must lie"):
        sources.permuted_indices([size], size, (0, 1))


def test_even_shares_are_disjoint_cover_everything_and_differ_by_at_most_one():
    for total, processes in [(10, 3), (8, 8), (1000, 7), (5, 1)]:
        shares = [sources.even_share(total, index, processes) for index in range(processes)]
        covered = [item for start, end in shares for item in range(start, end)]
        assert covered == list(range(total))
        sizes = [end - start for start, end in shares]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="process_index"):
        sources.even_share(10, 3, 3)


# --- captions


def test_caption_choice_takes_usable_captions_only_and_names_the_skip_reason():
    rng = np.random.default_rng(0)
    assert decode.choose_caption(b"  a dog \n", rng) == "a dog"
    assert decode.choose_caption(np.str_("a cat"), rng) == "a cat"
    several = np.array([b"", b"one", "tw\u00f6".encode(), b"\xff\xfe"], dtype=object)
    drawn = {decode.choose_caption(several, np.random.default_rng(seed)) for seed in range(50)}
    assert drawn == {"one", "tw\u00f6"}
    for text, reason in [
        (None, "missing_caption"),
        ("   ", "empty_caption"),
        (b"\xff\xfe", "undecodable_caption"),
        (["", " "], "empty_caption"),
        ([b"\xff"], "undecodable_caption"),
    ]:
        with pytest.raises(SkippedExample) as raised:
            decode.choose_caption(text, rng)
        assert raised.value.reason == reason


# --- images


def test_decode_image_converts_odd_modes_and_skips_by_limits():
    limits = ImageLimits(min_image_size=4, max_image_pixels=10_000, max_aspect_ratio=5.0)
    image, converted = decode.decode_image(jpeg_bytes(20, 10), limits)
    assert image.mode == "RGB" and image.size == (20, 10) and not converted
    image, converted = decode.decode_image(np.full((8, 8), 7, np.uint8), limits)
    assert image.mode == "RGB" and converted and np.asarray(image)[0, 0].tolist() == [7, 7, 7]
    image, converted = decode.decode_image(np.full((8, 8, 3), 0x4000, np.uint16), limits)
    assert converted and np.asarray(image)[0, 0].tolist() == [64, 64, 64]
    image, converted = decode.decode_image(np.zeros((8, 8, 4), np.uint8), limits)
    assert converted and image.mode == "RGB"
    for data, reason in [
        (jpeg_bytes(3, 40), "image_too_small"),
        (jpeg_bytes(120, 100), "image_too_large"),
        (jpeg_bytes(60, 10), "extreme_aspect_ratio"),
        (b"", "undecodable_image"),
        (b"GIF89a garbage", "undecodable_image"),
        (np.zeros((8, 8, 2), np.uint8), "undecodable_image"),
        ("not bytes", "undecodable_image"),
    ]:
        with pytest.raises(SkippedExample) as raised:
            decode.decode_image(data, limits)
        assert raised.value.reason == reason, data if isinstance(data, str) else type(data)


def test_reduced_jpeg_decoding_keeps_every_crop_at_least_the_output_size():
    preparer = decode.ExamplePreparer(image_size=224, seed=0)
    reduced = preparer.reduced_decoding_size()
    # sqrt(scale_min / max_ratio) of a side: the smallest crop side torchvision's crop can draw.
    assert reduced * np.sqrt(0.9 / (4 / 3)) >= 224
    image, _ = decode.decode_image(jpeg_bytes(1200, 1000), ImageLimits(), reduced)
    assert image.size == (600, 500)  # 1/2 scale: 1/4 would leave 250 < reduced
    assert min(image.size) >= reduced
    image, _ = decode.decode_image(jpeg_bytes(1200, 1000), ImageLimits(), None)
    assert image.size == (1200, 1000)
    assert decode.ExamplePreparer(image_size=224, seed=0, reduced_jpeg_decoding=False).reduced_decoding_size() is None


def test_example_preparer_is_a_pure_function_of_seed_epoch_and_identity_and_matches_train_transform():
    data = jpeg_bytes(40, 30, seed=3)
    example = RawExample(data, b"caption 1", identity=(5, 2), epoch=0)
    preparer = decode.ExamplePreparer(image_size=IMAGE_SIZE, seed=0)
    first, caption, converted = preparer(example)
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    assert caption == "caption 1" and not converted
    again, _, _ = preparer(RawExample(data, b"caption 1", identity=(5, 2), epoch=0))
    assert first.tobytes() == again.tobytes()
    other_epoch, _, _ = preparer(RawExample(data, b"caption 1", identity=(5, 2), epoch=1))
    assert first.tobytes() != other_epoch.tobytes()
    # Crop here + normalisation per batch = clip_jax.transforms.train_transform, to the bit, given
    # the same generator state (the caption draw of a single caption takes no random number).
    reference = transforms.train_transform(
        PIL.Image.open(io.BytesIO(data)), IMAGE_SIZE, sources.example_rng(0, 0, (5, 2))
    )
    assert decode.normalize_images(first[None])[0].tobytes() == reference.tobytes()


def test_normalize_images_matches_the_transforms_normalisation_bit_for_bit():
    images = np.random.default_rng(0).integers(0, 256, (3, 7, 11, 3), dtype=np.uint8)
    expected = np.stack([transforms.eval_transform(PIL.Image.fromarray(image), 7) for image in images[:, :, 2:9]])
    np.testing.assert_array_equal(decode.normalize_images(images[:, :, 2:9].copy()), expected)
    with pytest.raises(ValueError, match="uint8"):
        decode.normalize_images(images.astype(np.float32))


def _slow_for_some(example):
    time.sleep(0.002 * (example.identity[0] % 3))  # later examples often finish first
    if example.identity[0] % 4 == 0:
        raise SkippedExample("empty_caption")
    return threading.current_thread().name, example.identity[0]


def test_prepared_in_order_keeps_order_whatever_the_worker_timing():
    items = [(RawExample(b"x", "t", (index,), 0), index) for index in range(40)]
    items = iter([*items[:30], (RawExample(None, None, (99,), 0, problem="missing_image"), 99), *items[30:]])
    pool = workers.WorkerPool(_slow_for_some, 4, "thread")
    try:
        results = list(workers.prepared_in_order(items, pool, lookahead=20))
    finally:
        pool.shutdown()
    assert [tag for _, tag, _, _ in results] == [*range(30), 99, *range(30, 40)]
    assert [(tag, reason) for _, tag, _, reason in results if reason] == [
        *[(index, "empty_caption") for index in range(0, 30, 4)],
        (99, "missing_image"),
        (32, "empty_caption"),
        (36, "empty_caption"),
    ]
    assert all(result[1] == tag for _, tag, result, _ in results if result is not None)


# --- the training iterator over an in-memory source


class ListSource:
    """A test source: the records in a seeded permutation per epoch, position {"epoch", "offset"}."""

    def __init__(self, records, seed=0):
        self.records = records
        self.seed = seed
        self.closed = False

    def fingerprint(self):
        return f"list of {len(self.records)}"

    def record_reader(self):
        return None

    def initial_position(self):
        return {"epoch": 0, "offset": 0}

    def order(self, epoch):
        return [int(index) for index in np.random.default_rng([self.seed, epoch]).permutation(len(self.records))]

    def examples(self, position):
        epoch, offset = position["epoch"], position["offset"]
        while True:
            order = self.order(epoch)
            for index in range(offset, len(order)):
                image, text = self.records[order[index]]
                yield RawExample(image, text, (int(order[index]),), epoch), {"epoch": epoch, "offset": index + 1}
            epoch, offset = epoch + 1, 0

    def close(self):
        self.closed = True


def make_records(count: int, bad_every: int = 0):
    records = []
    for index in range(count):
        bad = bad_every and index % bad_every == bad_every - 1
        records.append((b"corrupt" if bad else jpeg_bytes(24, 20, seed=index), f"caption {index}".encode()))
    return records


def make_iterator(source, local_batch_size=4, start_state=None, num_workers=2, worker_kind="thread"):
    preparer = decode.ExamplePreparer(image_size=IMAGE_SIZE, seed=0)
    return data_iterator.TrainIterator(
        source, number_tokenizer, preparer, local_batch_size, 0, 1, num_workers, start_state, worker_kind=worker_kind
    )


def test_iterator_batches_counts_skips_and_resumes_exactly():
    records = make_records(23, bad_every=5)  # records 4, 9, 14, 19 are corrupt: 19 good per epoch
    with make_iterator(ListSource(records)) as iterator:
        batches = [next(iterator) for _ in range(10)]  # 40 examples: over two epochs
    assert batches[0]["images"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and batches[0]["texts"].dtype == np.int32
    numbers = [int(number) for batch in batches for number in batch["texts"][:, 0]]
    assert all(number % 5 != 4 for number in numbers)
    assert sorted(numbers[:19]) == [number for number in range(23) if number % 5 != 4]
    assert sorted(numbers[19:38]) == sorted(numbers[:19]) and numbers[19:38] != numbers[:19]

    with make_iterator(ListSource(records)) as iterator:
        pairs = []
        for _batch, state in iterator.batches_with_state():
            pairs.append(state)
            if len(pairs) == 10:
                break
    json.dumps(pairs)  # states are JSON
    # Corrupt records consumed so far, by the state's position (records are read in the source's order).
    for state in pairs:
        epoch, offset = state["source"]["epoch"], state["source"]["offset"]
        consumed = [index for past in range(epoch) for index in ListSource(records).order(past)]
        consumed += ListSource(records).order(epoch)[:offset]
        assert state["counters"]["undecodable_image"] == sum(1 for index in consumed if index % 5 == 4)
        assert state["examples_read"] == len(consumed)
    for stop in (3, 4, 7):
        with make_iterator(ListSource(records), start_state=pairs[stop - 1]) as resumed:
            for expected in batches[stop:]:
                batch = next(resumed)
                assert batch["images"].tobytes() == expected["images"].tobytes()
                np.testing.assert_array_equal(batch["texts"], expected["texts"])


def test_iterator_results_do_not_depend_on_the_kind_or_number_of_workers():
    records = make_records(12, bad_every=5)
    with (
        make_iterator(ListSource(records), num_workers=1) as one,
        make_iterator(ListSource(records), num_workers=2, worker_kind="process") as processes,
    ):
        for _ in range(4):
            from_threads, from_processes = next(one), next(processes)
            assert from_threads["images"].tobytes() == from_processes["images"].tobytes()
            np.testing.assert_array_equal(from_threads["texts"], from_processes["texts"])
        assert one.counters == processes.counters and one.counters["undecodable_image"] >= 2


def test_iterator_refuses_a_source_where_everything_is_bad():
    iterator = make_iterator(ListSource([(b"corrupt", b"caption 0")]), local_batch_size=1)
    with iterator, pytest.raises(RuntimeError, match="were all skipped"):
        next(iterator)


def test_state_helpers_for_checkpoints():
    states = [{"counters": {"empty_caption": 2, "undecodable_image": 1}}, {"counters": {"empty_caption": 3}}]
    summed = data_iterator.summed_counters(states)
    assert summed["empty_caption"] == 5 and summed["undecodable_image"] == 1 and summed["missing_image"] == 0
    states = [{**state, "source": {"epoch": 0, "offset": 4 + index}} for index, state in enumerate(states)]
    positions = [state["source"] for state in states]
    assert data_iterator.local_state(states, 1, 2) == {**states[1], "saved_positions": positions}
    # Another topology: every saved position goes along (the source continues from them), and the
    # skip counters all go to process 0, so their sum over the new processes stays the same.
    moved = [data_iterator.local_state(states, index, 4) for index in range(4)]
    assert all(state["saved_positions"] == positions for state in moved)
    assert data_iterator.summed_counters(moved) == summed and moved[1]["counters"]["empty_caption"] == 0
    assert data_iterator.local_state([], 0, 1) is None
    assert data_iterator.gather_states({"batches": 3}) == [{"batches": 3}]  # one process: itself


def test_config_checks_name_the_offending_field():
    config = default_data_config()
    config.name = "webdataset"
    config.worker_kind = "fiber"
    with pytest.raises(ValueError, match="data.worker_kind"):
        data_iterator.make_train_iterator(config, number_tokenizer, 4, IMAGE_SIZE, 0, 1)
    config.worker_kind = "thread"
    config.crop_scale = (0.9, 1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        decode.preparer_from_config(config, IMAGE_SIZE)
    config = default_data_config()
    config.name = "imagenet_folder"
    with pytest.raises(ValueError, match="unknown data.name 'imagenet_folder'"):
        data_iterator.make_train_source(config, 0, 1)
    config.name = "webdataset"
    with pytest.raises(ValueError, match="global_batch_size 6 must be a positive multiple of the 4"):
        data_iterator.make_train_iterator(config, number_tokenizer, 6, IMAGE_SIZE, 0, 4)


# --- the training loop on mocked TFDS data: train, stop, resume


def test_train_and_evaluate_on_mock_tfds_resumes_the_data_where_it_stopped(tmp_path):
    import shutil

    tfds = pytest.importorskip("tensorflow_datasets")
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from clip_jax.training import loop
    from clip_jax.training.config import base_config

    def config():
        config = base_config()
        config.total_steps = 2
        config.optimizer.warmup_steps = 0
        config.global_batch_size = 8  # one row per virtual device
        config.log_every_steps = 1
        config.checkpoint.every_steps = 1
        config.checkpoint.async_save = False
        config.tokenizer.vocab_size = 64
        config.data.name = "tfds"
        config.data.tfds.name = "coco_captions"
        config.data.tfds.reader = "data_source"
        config.data.tfds.image_decoder = "tfds"  # the mock cannot encode coco_captions' sequences
        config.data.min_image_size = 1  # mocked images can be a few pixels wide
        config.data.max_aspect_ratio = 100.0
        config.data.num_workers = 2
        config.data.worker_kind = "thread"  # worker processes would not see the mock
        return config

    def saved_data_states(workdir, step):
        with open(os.path.join(workdir, "checkpoints", str(step), "progress", "metadata")) as file:
            return json.load(file)["data_states"]

    workdir = str(tmp_path / "workdir")
    # The resumed run compiles the same step again: a persistent cache saves that second compile.
    # (reset_cache: the cache decides once per process whether it is on; undo that on both ends.)
    previous_cache = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        with tfds.testing.mock_data(num_examples=10):
            loop.train_and_evaluate(config(), workdir)
            uninterrupted = saved_data_states(workdir, 2)
            shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))
            loop.train_and_evaluate(config(), workdir)  # resumes at step 1 and trains step 2 again
            # The iterator restored from checkpoint 1 went on exactly: its state after step 2 is that
            # of the uninterrupted run and of a bare iterator after 2 batches of 8 (16 of 10 examples).
            data_config = config().data

            def no_tokenizer(texts, truncate):
                return np.zeros((len(texts), 4), np.int32)

            with data_iterator.make_train_iterator(data_config, no_tokenizer, 8, 32, 0, 1) as iterator:
                next(iterator), next(iterator)
                expected = iterator.state
    finally:
        jax.config.update("jax_compilation_cache_dir", previous_cache[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous_cache[1])
        compilation_cache.reset_cache()
    assert saved_data_states(workdir, 1)[0]["batches"] == 1
    resumed = saved_data_states(workdir, 2)
    assert resumed == uninterrupted == [expected]
    # 16 examples of the stream that began at epoch 0 read: 6 into epoch 1 of the 10 mocked.
    assert resumed[0]["source"] == {"epoch": 1, "offset": 16, "first_epoch": 0}


# --- prefetching


def test_prefetcher_keeps_order_reraises_the_sources_error_and_stops_on_close():
    from clip_jax.data.prefetch import Prefetcher

    def failing():
        yield from range(5)
        raise OSError("shard 7 vanished")

    prefetcher = Prefetcher(failing(), size=2)
    assert [next(prefetcher) for _ in range(5)] == list(range(5))
    with pytest.raises(OSError, match="shard 7 vanished"):
        next(prefetcher)
    prefetcher.close()

    taken = []

    def endless():
        for number in range(10**9):
            taken.append(number)
            yield number

    prefetcher = Prefetcher(endless(), size=3)
    assert next(prefetcher) == 0
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    assert len(taken) <= 6  # at most the queue's size ahead of the consumer (plus one in hand)
