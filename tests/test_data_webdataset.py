"""Tests of img2dataset / WebDataset shards: shard naming (globs, brace ranges, clear errors),
tar reading, every bad-sample case skipped or converted with exact counters, disjoint process
shares, determinism and exact resume across window and epoch boundaries."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import PIL.Image
import pytest

from clip_jax.data import pipeline, webdataset
from clip_jax.transforms import OPENAI_MEAN, OPENAI_STD

from batch_helpers import assert_same_batches, take

IMAGE_SIZE = 16
CONTEXT_LENGTH = 24


def character_tokenizer(texts, truncate=True):
    """A stand-in tokenizer: one id per character (so a caption can be read back from its row)."""
    rows = np.zeros((len(texts), CONTEXT_LENGTH), np.int32)
    for row, text in enumerate(texts):
        codes = [ord(character) for character in text][:CONTEXT_LENGTH]
        rows[row, : len(codes)] = codes
    return rows


def caption_of_row(row: np.ndarray) -> str:
    return "".join(chr(code) for code in row if code)


def encode(image: PIL.Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noise_image(seed: int, width: int = 40, height: int = 30, mode: str = "RGB") -> PIL.Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def write_tar(path: str, samples, cut_to: int | None = None) -> None:
    """Writes [(key, {extension: bytes})] as a tar; `cut_to` truncates the file to that many bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for key, files in samples:
            for extension, content in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    data = buffer.getvalue()
    with open(path, "wb") as file:
        file.write(data if cut_to is None else data[:cut_to])


def good_samples(prefix: str, count: int, start_seed: int = 0):
    """`count` valid samples cycling through JPEG, PNG and WebP; caption == key."""
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    samples = []
    for index in range(count):
        extension, image_format = formats[index % 3]
        key = f"{prefix}{index:03d}"
        image = encode(noise_image(start_seed + index), image_format)
        samples.append((key, {extension: image, "txt": key.encode(), "json": b"{}"}))
    return samples


def make_data_config(shards: str, **overrides):
    config = pipeline.default_data_config()
    config.name = "webdataset"
    config.webdataset.shards = shards
    config.num_workers = 2
    config.worker_kind = "thread"  # no start-up cost; one test below runs worker processes
    config.seed = 0
    for name, value in overrides.items():
        if name in config.webdataset:
            config.webdataset[name] = value
        else:
            config[name] = value
    return config


def make_iterator(config, global_batch_size=4, process_index=0, process_count=1, start_state=None):
    return pipeline.make_train_iterator(
        config, character_tokenizer, global_batch_size, IMAGE_SIZE, process_index, process_count, start_state
    )


# --- naming shards


def test_brace_expansion_keeps_zero_padding_and_takes_lists_and_several_groups():
    assert webdataset.expand_braces("s/{00008..00011}.tar") == [f"s/{index:05d}.tar" for index in range(8, 12)]
    assert webdataset.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert webdataset.expand_braces("{x,{y,z}}") == ["x", "y", "z"]
    assert webdataset.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        webdataset.expand_braces("s/{0..3.tar")


def test_resolve_shards_globs_braces_and_clear_errors(tmp_path):
    for index in range(3):
        write_tar(str(tmp_path / f"{index:05d}.tar"), good_samples(f"k{index}-", 1))
    (tmp_path / "00000_stats.json").write_text("{}")  # img2dataset writes these beside the shards
    expected = [str(tmp_path / f"{index:05d}.tar") for index in range(3)]
    assert webdataset.resolve_shards(str(tmp_path / "*.tar")) == expected
    assert webdataset.resolve_shards(str(tmp_path / "{00000..00002}.tar")) == expected
    assert webdataset.resolve_shards([str(tmp_path / "00002.tar"), str(tmp_path / "0000[01].tar")]) == expected
    with pytest.raises(ValueError, match=r"no file matches .*\*\.tgz"):
        webdataset.resolve_shards(str(tmp_path / "*.tgz"))
    with pytest.raises(ValueError, match=r"1 of the 4 shards .* do not exist.*00003\.tar"):
        webdataset.resolve_shards(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(ValueError, match="does not exist"):
        webdataset.resolve_shards(str(tmp_path / "missing_directory" / "{0..1}.tar"))
    with pytest.raises(ValueError, match="empty"):
        webdataset.resolve_shards("  ")


def test_missing_shards_fail_when_the_iterator_is_made_not_at_the_first_batch(tmp_path):
    with pytest.raises(ValueError, match="no file matches"):
        pipeline.make_train_source(make_data_config(str(tmp_path / "*.tar")), 0, 1)
    write_tar(str(tmp_path / "00000.tar"), good_samples("a", 2))
    with pytest.raises(ValueError, match="1 shards cannot be shared by 2 processes"):
        pipeline.make_train_source(make_data_config(str(tmp_path / "*.tar")), 0, 2)


# --- reading tars


def test_tar_samples_group_consecutive_members_by_key_and_survive_truncation(tmp_path):
    samples = good_samples("s", 3)
    write_tar(str(tmp_path / "whole.tar"), samples)
    read, truncated = webdataset.read_tar_samples((tmp_path / "whole.tar").read_bytes())
    assert not truncated
    assert [key for key, _ in read] == ["s000", "s001", "s002"]
    assert read[1][1]["png"] == samples[1][1]["png"] and read[1][1]["txt"] == b"s001"
    # Cut inside the last sample's image: the two complete samples are kept.
    whole = (tmp_path / "whole.tar").read_bytes()
    last_image_start = whole.index(samples[2][1]["webp"][:64])
    write_tar(str(tmp_path / "cut.tar"), samples, cut_to=last_image_start + 10)
    read, truncated = webdataset.read_tar_samples((tmp_path / "cut.tar").read_bytes())
    assert truncated
    assert [key for key, _ in read] == ["s000", "s001"]
    assert webdataset.split_member_name("dir/000123.seg.PNG") == ("dir/000123", "seg.png")


# --- bad samples


def expected_pixel(value: float, channel: int) -> float:
    return (value / 255.0 - OPENAI_MEAN[channel]) / OPENAI_STD[channel]


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Three shards covering every bad case; returns (pattern, {key: expected outcome})."""
    directory = tmp_path_factory.mktemp("bad_shards")
    outcome: dict[str, str] = {}
    shard0 = good_samples("good", 6)
    jpeg = encode(noise_image(100), "JPEG")
    gray16 = PIL.Image.fromarray(np.full((30, 40), 0x8000, np.uint16))  # mid grey in 16 bits
    shard1 = [
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": b"corrupt"}),
        ("truncated_jpeg", {"jpg": jpeg[: len(jpeg) // 2], "txt": b"truncated_jpeg"}),
        ("no_caption", {"jpg": encode(noise_image(101), "JPEG"), "json": b"{}"}),
        ("no_image", {"txt": b"no_image", "json": b"{}"}),
        ("empty_caption", {"png": encode(noise_image(102), "PNG"), "txt": b" \n\t "}),
        ("latin1_caption", {"png": encode(noise_image(103), "PNG"), "txt": "caf\xe9 cr\xe8me".encode("latin-1")}),
        ("gray", {"jpg": encode(noise_image(104, mode="L"), "JPEG"), "txt": b"gray"}),
        ("cmyk", {"jpg": encode(PIL.Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"), "txt": b"cmyk"}),
        ("alpha", {"png": encode(noise_image(105, mode="RGBA"), "PNG"), "txt": b"alpha"}),
        ("gray16", {"png": encode(gray16, "PNG"), "txt": b"gray16"}),
        ("tiny", {"png": encode(noise_image(106, 3, 3), "PNG"), "txt": b"tiny"}),
        ("wide", {"png": encode(PIL.Image.new("RGB", (20_000, 40), (10, 20, 30)), "PNG"), "txt": b"wide"}),
        ("good_in_bad_shard", {"webp": encode(noise_image(107), "WEBP"), "txt": b"good_in_bad_shard"}),
    ]
    outcome.update(
        corrupt="undecodable_image",
        truncated_jpeg="undecodable_image",
        no_caption="missing_caption",
        no_image="missing_image",
        empty_caption="empty_caption",
        latin1_caption="undecodable_caption",
        gray="converted",
        cmyk="converted",
        alpha="converted",
        gray16="converted",
        tiny="image_too_small",
        wide="extreme_aspect_ratio",
        good_in_bad_shard="good",
    )
    outcome.update({key: "good" for key, _ in shard0})
    shard2 = good_samples("tail", 3, start_seed=200)
    outcome.update(tail000="good", tail001="good")  # tail002 is cut off with the end of the tar
    write_tar(str(directory / "00000.tar"), shard0)
    write_tar(str(directory / "00001.tar"), shard1)
    write_tar(str(directory / "00002.tar"), shard2)
    whole = (directory / "00002.tar").read_bytes()
    write_tar(str(directory / "00002.tar"), shard2, cut_to=whole.index(shard2[2][1]["webp"][:64]) + 5)
    return str(directory / "{00000..00002}.tar"), outcome


def keys_in_reading_order(config, epochs: int, process_index: int = 0, process_count: int = 1):
    """[(key or "shard:<path>", epoch, position)] of the raw examples of the first `epochs` epochs."""
    source = pipeline.make_train_source(config, process_index, process_count)
    result = []
    try:
        for example, position in source.examples(source.initial_position()):
            if example.epoch >= epochs:
                break
            # Samples are described as "<shard path>:<key>", shard-level events as "shard <path>".
            key = example.description if example.description.startswith("shard ") else example.description.rsplit(":", 1)[1]
            result.append((key, example.epoch, dict(position)))
    finally:
        source.close()
    return result


def test_every_bad_case_is_skipped_or_converted_with_exact_counters_and_the_run_goes_on(bad_shards):
    pattern, outcome = bad_shards
    config = make_data_config(pattern, shards_per_window=2)
    order = keys_in_reading_order(config, epochs=3)
    # 6 + 13 samples, 2 complete ones of the truncated shard, and one "truncated_shard" event.
    assert len([entry for entry in order if entry[1] == 0]) == 6 + 13 + 2 + 1
    good_total = sum(1 for value in outcome.values() if value in ("good", "converted"))
    assert good_total == 6 + 1 + 4 + 2

    iterator = make_iterator(config, global_batch_size=1)
    seen_captions = []
    with iterator:
        for _ in range(2 * good_total + 3):  # into the third epoch: the run never stops
            batch = next(iterator)
            seen_captions.append(caption_of_row(batch["texts"][0]))
            position = iterator.state["source"]
            # Expected counters: every raw example up to the current position, by the test's table.
            consumed = order[: next(index for index, entry in enumerate(order) if entry[2] == position) + 1]
            expected = {name: 0 for name in pipeline.COUNTER_NAMES}
            for key, _, _ in consumed:
                if key.startswith("shard "):
                    expected["truncated_shard"] += 1
                elif outcome[key] == "converted":
                    expected["converted_image_mode"] += 1
                elif outcome[key] != "good":
                    expected[outcome[key]] += 1
            assert iterator.counters == expected
            assert consumed[-1][0] == seen_captions[-1]  # the batch holds the example at the position
            if caption_of_row(batch["texts"][0]) == "gray16":
                # 16-bit mid grey (0x8000) becomes 8-bit 128, not the white that clipping gives.
                for channel in range(3):
                    np.testing.assert_allclose(batch["images"][0, ..., channel], expected_pixel(128, channel), atol=1e-5)
            if caption_of_row(batch["texts"][0]) == "cmyk":
                # CMYK (0, 255, 0, 0) is magenta; the crop of a flat image stays flat.
                magenta = [expected_pixel(value, channel) for channel, value in enumerate((255, 0, 255))]
                np.testing.assert_allclose(batch["images"][0, 0, 0], magenta, atol=0.05)
    first_epoch = seen_captions[:good_total]
    assert sorted(first_epoch) == sorted(key for key, value in outcome.items() if value in ("good", "converted"))
    assert sorted(seen_captions[good_total : 2 * good_total]) == sorted(first_epoch)
    assert seen_captions[good_total : 2 * good_total] != first_epoch  # a new order each epoch


# --- processes, determinism, resume


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clean_shards")
    for shard in range(5):
        write_tar(str(directory / f"{shard:05d}.tar"), good_samples(f"s{shard}-", 5 + shard, start_seed=10 * shard))
    return str(directory / "*.tar")


def test_two_processes_read_disjoint_shards_whose_union_is_everything(clean_shards):
    config = make_data_config(clean_shards, shards_per_window=2)
    everything = {key for key, _, _ in keys_in_reading_order(config, epochs=1)}
    assert len(everything) == sum(5 + shard for shard in range(5))
    for epoch in range(3):
        shares = []
        for process_index in range(2):
            order = keys_in_reading_order(config, epochs=epoch + 1, process_index=process_index, process_count=2)
            keys = [key for key, example_epoch, _ in order if example_epoch == epoch]
            assert len(keys) == len(set(keys))
            shares.append(set(keys))
        assert not shares[0] & shares[1]
        assert shares[0] | shares[1] == everything
    # Whole shards go to one process, and the assignment changes between epochs.
    source = webdataset.source_from_config(config, 0, 2)
    assert source.process_shards(0) != source.process_shards(1) or source.process_shards(1) != source.process_shards(2)
    source.close()


def test_same_seed_same_batches_other_seed_other_order(clean_shards):
    with make_iterator(make_data_config(clean_shards)) as first, make_iterator(make_data_config(clean_shards)) as again:
        reference = take(first, 4)
        assert_same_batches(reference, take(again, 4))
    with make_iterator(make_data_config(clean_shards, seed=1)) as other:
        different = take(other, 4)
    assert [caption_of_row(row) for batch in reference for row in batch["texts"]] != [
        caption_of_row(row) for batch in different for row in batch["texts"]
    ]


@pytest.mark.parametrize("stop_after,worker_kind", [(1, "thread"), (5, "process"), (9, "thread")])
def test_resume_gives_the_batches_an_uninterrupted_iterator_gives(clean_shards, stop_after, worker_kind):
    # 35 samples, batches of 4, 2 shards per window: 12 batches cross windows and an epoch boundary.
    config = make_data_config(clean_shards, shards_per_window=2, worker_kind=worker_kind)
    with make_iterator(config) as uninterrupted:
        reference = take(uninterrupted, 12)
    with make_iterator(config) as interrupted:
        take(interrupted, stop_after)
        saved = interrupted.state
    assert saved["batches"] == stop_after
    with make_iterator(config, start_state=saved) as resumed:
        assert_same_batches(take(resumed, 12 - stop_after), reference[stop_after:])


def test_batches_with_state_pairs_each_batch_with_the_state_after_it(clean_shards):
    config = make_data_config(clean_shards, shards_per_window=2)
    with make_iterator(config) as iterator:
        pairs = []
        for batch, state in iterator.batches_with_state():
            pairs.append((batch, state))
            if len(pairs) == 6:
                break
    with make_iterator(config, start_state=pairs[2][1]) as resumed:
        assert_same_batches(take(resumed, 3), [batch for batch, _ in pairs[3:6]])


def test_a_state_from_another_topology_restarts_at_the_next_epoch(clean_shards):
    config = make_data_config(clean_shards)
    with make_iterator(config, global_batch_size=4, process_count=1) as single:
        take(single, 2)
        saved = single.state
    with make_iterator(config, global_batch_size=4, process_index=1, process_count=2, start_state=saved) as moved:
        assert moved.state["source"] == {"epoch": 1, "window": 0, "offset": 0}
        take(moved, 1)


# --- captions for the tokenizer, and train.py on shards


def test_caption_sample_reads_usable_captions_without_decoding_images(bad_shards):
    pattern, outcome = bad_shards
    source = pipeline.make_train_source(make_data_config(pattern, shards_per_window=1), 0, 1)
    captions = pipeline.caption_sample(source, 100)
    source.close()
    # Captions are the keys; every sample whose caption is usable, images good or bad, once.
    caption_problems = ("missing_caption", "missing_image", "empty_caption", "undecodable_caption")
    with_caption = {key for key, value in outcome.items() if value not in caption_problems}
    assert sorted(captions) == sorted(with_caption)


def test_train_py_trains_from_shards_and_checkpoints_the_data_position(bad_shards, tmp_path):
    import json
    import subprocess
    import sys

    pattern, _ = bad_shards
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path / "workdir")
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    environment["JAX_PLATFORMS"] = "cpu"
    arguments = [
        sys.executable, "train.py", f"--workdir={workdir}", "--config.total_steps=3", "--config.global_batch_size=4",
        "--config.log_every_steps=1", "--config.checkpoint.every_steps=2", "--config.tokenizer.vocab_size=64",
        "--config.data.name=webdataset", f"--config.data.webdataset.shards={pattern}", "--config.data.num_workers=2",
    ]  # fmt: skip
    result = subprocess.run(arguments, env=environment, cwd=repository, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = [record for record in records if "loss" in record]
    assert [record["step"] for record in logged] == [1, 2, 3]
    assert all(np.isfinite(record["loss"]) for record in logged)

    # The checkpoint of step 2 holds the data position after 2 batches of 4 (tiny-vit: 32 px),
    # with the skip counters of the bad samples read so far, and these appear in the log.
    config = make_data_config(pattern)
    with pipeline.make_train_iterator(config, character_tokenizer, 4, 32, 0, 1) as iterator:
        next(iterator), next(iterator)
        expected = iterator.state
    progress = json.load(open(os.path.join(workdir, "checkpoints", "2", "progress", "metadata")))
    saved = progress["data_states"][0]
    assert saved["source"] == expected["source"] and saved["counters"] == expected["counters"]
    assert saved["batches"] == progress["step"] == 2
    assert logged[1]["data/undecodable_image"] == expected["counters"]["undecodable_image"]
    assert sum(logged[-1][f"data/{name}"] for name in pipeline.SKIP_REASONS) > 0
