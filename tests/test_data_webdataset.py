"""Tests of img2dataset / WebDataset shards: shard naming (globs, brace ranges, clear errors),
tar reading, every bad-sample case skipped or converted with exact counters, disjoint process
shares, determinism and exact resume across window and epoch boundaries."""

from __future__ import annotations

import io
import os
import tarfile
import time

import numpy as np
import PIL.Image
import pytest
from batch_helpers import assert_same_batches, take

from clip_jax.data import iterator as data_iterator
from clip_jax.data import shards, sources, webdataset
from clip_jax.data.config import data_settings, default_data_config
from clip_jax.transforms import OPENAI_MEAN, OPENAI_STD

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
    config = default_data_config()
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
    return data_iterator.make_train_iterator(
        config, character_tokenizer, global_batch_size, IMAGE_SIZE, process_index, process_count, start_state
    )


# --- naming shards


def test_brace_expansion_keeps_zero_padding_and_takes_lists_and_several_groups():
    assert shards.expand_braces("s/{00008..00011}.tar") == [f"s/{index:05d}.tar" for index in range(8, 12)]
    assert shards.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert shards.expand_braces("{x,{y,z}}") == ["x", "y", "z"]
    assert shards.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        shards.expand_braces("s/{0..3.tar")


def test_resolve_shards_globs_braces_and_clear_errors(tmp_path):
    for index in range(3):
        write_tar(str(tmp_path / f"{index:05d}.tar"), good_samples(f"k{index}-", 1))
    (tmp_path / "00000_stats.json").write_text("{}")  # img2dataset writes these beside the shards
    expected = [str(tmp_path / f"{index:05d}.tar") for index in range(3)]
    assert shards.resolve_shards(str(tmp_path / "*.tar")) == expected
    assert shards.resolve_shards(str(tmp_path / "{00000..00002}.tar")) == expected
    assert shards.resolve_shards([str(tmp_path / "00002.tar"), str(tmp_path / "0000[01].tar")]) == expected
    with pytest.raises(ValueError, match=r"no file matches .*\*\.tgz"):
        shards.resolve_shards(str(tmp_path / "*.tgz"))
    with pytest.raises(ValueError, match=r"1 of the 4 shards .* do not exist.*00003\.tar"):
        shards.resolve_shards(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(ValueError, match="does not exist"):
        shards.resolve_shards(str(tmp_path / "missing_directory" / "{0..1}.tar"))
    with pytest.raises(ValueError, match="empty"):
        shards.resolve_shards("  ")


def test_missing_shards_fail_when_the_iterator_is_made_not_at_the_first_batch(tmp_path):
    with pytest.raises(ValueError, match="no file matches"):
        data_iterator.make_train_source(make_data_config(str(tmp_path / "*.tar")), 0, 1)
    write_tar(str(tmp_path / "00000.tar"), good_samples("a", 2))
    with pytest.raises(ValueError, match="1 shards cannot be shared by 2 processes"):
        data_iterator.make_train_source(make_data_config(str(tmp_path / "*.tar")), 0, 2)


# --- reading tars


def test_tar_samples_group_consecutive_members_by_key_and_survive_truncation(tmp_path):
    samples = good_samples("s", 3)
    write_tar(str(tmp_path / "whole.tar"), samples)
    read, problem = shards.read_tar_samples((tmp_path / "whole.tar").read_bytes())
    assert problem is None
    assert [sample.key for sample in read] == ["s000", "s001", "s002"]
    assert read[1].files["png"] == samples[1][1]["png"] and read[1].files["txt"] == b"s001"
    assert all(sample.problem is None for sample in read)
    # Cut inside the last sample's image: the two complete samples are kept.
    whole = (tmp_path / "whole.tar").read_bytes()
    last_image_start = whole.index(samples[2][1]["webp"][:64])
    write_tar(str(tmp_path / "cut.tar"), samples, cut_to=last_image_start + 10)
    read, problem = shards.read_tar_samples((tmp_path / "cut.tar").read_bytes())
    assert problem == "truncated_shard"
    assert [sample.key for sample in read] == ["s000", "s001"]
    # The same from a file object, and compressed: gzip, bzip2 and xz, also cut short.
    for mode in ("gz", "bz2", "xz"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=f"w:{mode}") as archive:
            archive.addfile(tarfile.TarInfo("empty.txt"))
            with tarfile.open(str(tmp_path / "whole.tar")) as plain:
                for member in plain:
                    archive.addfile(member, plain.extractfile(member))
        compressed = buffer.getvalue()
        read, problem = shards.read_tar_samples(io.BytesIO(compressed), extensions=("png", "txt"))
        assert problem is None, mode
        assert [(sample.key, sorted(sample.files)) for sample in read] == [
            ("empty", ["txt"]),
            ("s000", ["txt"]),
            ("s001", ["png", "txt"]),
            ("s002", ["txt"]),
        ]  # only the extensions asked for are read
        read, problem = shards.read_tar_samples(compressed[: len(compressed) // 2])
        assert problem == "truncated_shard", mode
    assert shards.split_member_name("dir/000123.seg.PNG") == ("dir/000123", "seg.png")


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
    source = data_iterator.make_train_source(config, process_index, process_count)
    result = []
    try:
        for example, position in source.examples(source.initial_position()):
            if example.epoch >= epochs:
                break
            # Samples are described as "<shard path>:<key>", shard-level events as "shard <path>".
            key = (
                example.description
                if example.description.startswith("shard ")
                else example.description.rsplit(":", 1)[1]
            )
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
            expected = {name: 0 for name in sources.COUNTER_NAMES}
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
                    np.testing.assert_allclose(
                        batch["images"][0, ..., channel], expected_pixel(128, channel), atol=1e-5
                    )
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
    source = webdataset.source_from_config(data_settings(config), 0, 2)
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


def test_a_state_of_another_seed_restarts_at_the_next_epoch(clean_shards):
    # (Another topology continues exactly: tests/test_elastic_resume.py.)
    config = make_data_config(clean_shards)
    with make_iterator(config, global_batch_size=4, process_count=1) as single:
        take(single, 2)
        saved = single.state
    config.seed += 1
    with make_iterator(config, global_batch_size=4, process_index=1, process_count=2, start_state=saved) as moved:
        assert moved.state["source"] == {"epoch": 1, "window": 0, "offset": 0}
        take(moved, 1)


# --- captions for the tokenizer, and train.py on shards


def test_caption_sample_reads_usable_captions_without_decoding_images(bad_shards):
    pattern, outcome = bad_shards
    source = data_iterator.make_train_source(make_data_config(pattern, shards_per_window=1), 0, 1)
    captions = data_iterator.caption_sample(source, 100)
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
    with data_iterator.make_train_iterator(config, character_tokenizer, 4, 32, 0, 1) as iterator:
        next(iterator), next(iterator)
        expected = iterator.state
    progress = json.load(open(os.path.join(workdir, "checkpoints", "2", "progress", "metadata")))
    saved = progress["data_states"][0]
    assert saved["source"] == expected["source"] and saved["counters"] == expected["counters"]
    assert saved["batches"] == progress["step"] == 2
    assert logged[1]["data/undecodable_image"] == expected["counters"]["undecodable_image"]
    assert sum(logged[-1][f"data/{name}"] for name in sources.SKIP_REASONS) > 0


# --- hostile shards: sizes, links, duplicates


class _Zeros(io.RawIOBase):
    """`size` zero bytes, read in pieces: a huge member written without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = bytes(1 << 20)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        count = self.left if size < 0 else min(size, self.left)
        self.left -= count
        return self.block[:count] if count <= len(self.block) else bytes(count)


def add_member(archive: tarfile.TarFile, name: str, content: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    for field, value in fields.items():
        setattr(info, field, value)
    archive.addfile(info, io.BytesIO(content) if content else None)


ISOLATED_READ = """
import json, os, sys, time
from clip_jax.data import iterator as data_iterator
from clip_jax.data.config import default_data_config

def peak_mib():
    # VmHWM: this process image's peak resident memory. (ru_maxrss would carry the parent's peak
    # over fork and exec, and hide the growth.)
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

config = default_data_config()
config.name = "webdataset"
config.webdataset.shards = sys.argv[1]
source = data_iterator.make_train_source(config, 0, 1)
start, before = time.perf_counter(), peak_mib()
problems = {}
for count, (example, _) in enumerate(source.examples(source.initial_position()), start=1):
    problems[example.description.rsplit(":", 1)[-1]] = example.problem
    if count == int(sys.argv[2]):
        break
growth = peak_mib() - before
print(json.dumps({"growth_mib": growth, "seconds": time.perf_counter() - start, "problems": problems}))
sys.stdout.flush()
os._exit(0)  # the source is already reading the next epoch in the background: do not wait for it
"""


def read_in_a_fresh_process(pattern: str, examples: int) -> dict:
    """Reads the first `examples` raw examples of the shards in a new interpreter (so its peak
    resident memory is this read's alone): {"growth_mib", "seconds", "problems": {key: problem}}."""
    import json
    import subprocess
    import sys

    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", ISOLATED_READ, pattern, str(examples)],
        cwd=repository, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from Linux's /proc")
@pytest.mark.parametrize(
    "compression,zeros",
    # gzip: ~5 MB on disk for 1 GiB. bzip2: a few hundred bytes, which one decompress() call without
    # a size limit (what tarfile's own "r|*" does) would inflate whole.
    [("gz", 1 << 30), ("bz2", 1 << 29)],
)
def test_a_compressed_shard_that_inflates_to_a_gigabyte_is_read_in_bounded_memory(tmp_path, compression, zeros):
    path = str(tmp_path / f"00000.tar.{compression}")
    good = good_samples("fine", 2)
    with tarfile.open(path, f"w:{compression}", compresslevel=1) as archive:
        for extension, content in good[0][1].items():
            add_member(archive, f"{good[0][0]}.{extension}", content)
        info = tarfile.TarInfo("bomb.jpg")
        info.size = zeros
        archive.addfile(info, _Zeros(info.size))
        add_member(archive, "bomb.txt", b"a caption beside a gigabyte of zeros")
        for extension, content in good[1][1].items():
            add_member(archive, f"{good[1][0]}.{extension}", content)
    assert os.path.getsize(path) < 16 << 20
    read = read_in_a_fresh_process(path, examples=3)
    assert read["growth_mib"] < 200, read
    assert read["problems"] == {"fine000": None, "bomb": "member_too_large", "fine001": None}, read


def test_an_oversized_caption_is_skipped_unread_and_counted(tmp_path):
    samples = good_samples("ok", 3)
    huge_caption = b"word " * (20 << 20)  # 100 MiB
    samples.insert(1, ("huge", {"jpg": encode(noise_image(50), "JPEG"), "txt": huge_caption}))
    write_tar(str(tmp_path / "00000.tar"), samples)
    # Never read: a fresh process's peak memory does not grow by the caption's 100 MiB (it grew by
    # 200 MiB, and the first batch took 13 s, before the cap).
    read = read_in_a_fresh_process(str(tmp_path / "00000.tar"), examples=4)
    assert read["growth_mib"] < 50, read
    assert read["problems"] == {"ok000": None, "huge": "member_too_large", "ok001": None, "ok002": None}, read
    config = make_data_config(str(tmp_path / "*.tar"))
    with make_iterator(config, global_batch_size=3) as iterator:
        batch = next(iterator)
        counters = iterator.counters
    assert sorted(caption_of_row(row) for row in batch["texts"]) == ["ok000", "ok001", "ok002"]
    assert counters["member_too_large"] == 1
    # A caption that does pass (up to the cap) costs the real tokenizer bounded time too: this
    # process's CPU time, which other jobs on the machine do not inflate as they do wall time.
    from clip_jax.tokenizer import ClipTokenizer

    tokenizer = ClipTokenizer()
    tokenizer(["warm up"], truncate=True)
    longest_caption = "x" * default_data_config().webdataset.max_caption_bytes
    start = time.process_time()
    tokenizer([longest_caption, "y" + longest_caption[1:]], truncate=True)
    assert time.process_time() - start < 0.2


def test_member_and_shard_size_limits_apply_to_every_member(tmp_path):
    big_image = encode(noise_image(60, 200, 200), "PNG")  # ~120 KB of noise
    samples = good_samples("a", 2) + [("big", {"png": big_image, "txt": b"big"})] + good_samples("b", 4, start_seed=100)
    path = str(tmp_path / "00000.tar")
    write_tar(path, samples)
    limits = shards.ShardLimits(max_member_bytes=len(big_image) - 1, max_caption_bytes=64, max_shard_bytes=1 << 30)
    with open(path, "rb") as file:
        read, problem = shards.read_tar_samples(file, limits)
    assert problem is None
    assert [(sample.key, sample.problem) for sample in read] == [
        ("a000", None), ("a001", None), ("big", "member_too_large"), ("b000", None), ("b001", None),
        ("b002", None), ("b003", None),
    ]  # fmt: skip
    assert read[2].files == {}  # nothing of a skipped sample is kept

    # The decompressed-bytes cap: the samples wholly before it are kept, the shard is counted once.
    whole = open(path, "rb").read()
    b001_image = samples[4][1]["png"]
    cap = whole.index(b001_image[len(b001_image) // 2 :][:64])  # inside the image of b001 (noise: unique bytes)
    limits = shards.ShardLimits(max_shard_bytes=cap)
    read, problem = shards.read_tar_samples(whole, limits)
    assert problem == "shard_too_large"
    assert [sample.key for sample in read] == ["a000", "a001", "big", "b000"]
    config = make_data_config(str(tmp_path / "*.tar"), max_shard_bytes=cap)
    with make_iterator(config, global_batch_size=1) as iterator:
        take(iterator, 4)
        assert iterator.counters["shard_too_large"] == 1


def test_links_duplicates_and_special_members_are_counted_not_dropped_silently(tmp_path):
    image, other = encode(noise_image(70), "JPEG"), encode(noise_image(71), "JPEG")
    path = str(tmp_path / "00000.tar")
    with tarfile.open(path, "w") as archive:
        add_member(archive, "dir", type=tarfile.DIRTYPE)  # a directory entry is normal in a tar
        add_member(archive, "dir/good.jpg", image)
        add_member(archive, "dir/good.txt", b"good")
        add_member(archive, "dir/symbolic.jpg", type=tarfile.SYMTYPE, linkname="good.jpg")
        add_member(archive, "dir/symbolic.txt", b"symbolic")
        add_member(archive, "dir/hard.jpg", type=tarfile.LNKTYPE, linkname="dir/good.jpg")
        add_member(archive, "dir/hard.txt", b"hard")
        add_member(archive, "dir/fifo.jpg", type=tarfile.FIFOTYPE)
        add_member(archive, "dir/fifo.txt", b"fifo")
        add_member(archive, "dir/twice.jpg", image)
        add_member(archive, "dir/twice.txt", b"twice")
        add_member(archive, "dir/twice.jpg", other)  # which image is meant?
        add_member(archive, "dir/tail.jpg", other)
        add_member(archive, "dir/tail.txt", b"tail")
        add_member(archive, "dir/tail.json", type=tarfile.SYMTYPE, linkname="/etc/passwd")  # never read
    config = make_data_config(str(tmp_path / "*.tar"))
    source = data_iterator.make_train_source(config, 0, 1)
    problems, order = {}, []
    for example, position in source.examples(source.initial_position()):
        if example.epoch == 2:
            break
        key = example.description.rsplit(":", 1)[1]
        problems[key] = example.problem
        order.append((example.problem, position))
    source.close()
    assert problems == {
        "dir/good": None, "dir/symbolic": "link_member", "dir/hard": "link_member", "dir/fifo": "link_member",
        "dir/twice": "duplicate_member", "dir/tail": None,
    }  # fmt: skip
    # Through the training iterator: two epochs' batches, counters of every example read so far.
    with make_iterator(config, global_batch_size=2) as iterator:
        batches = take(iterator, 2)
        state = iterator.state
    assert [sorted(caption_of_row(row) for row in batch["texts"]) for batch in batches] == [["good", "tail"]] * 2
    consumed = order[: [position for _, position in order].index(state["source"]) + 1]
    expected = {name: 0 for name in sources.COUNTER_NAMES}
    for problem, _ in consumed:
        if problem is not None:
            expected[problem] += 1
    assert expected["link_member"] >= 3 and expected["duplicate_member"] >= 1  # all of epoch 0 at least
    assert state["counters"] == expected
    # Counters of several processes add up for the training log (data/<reason>).
    summed = data_iterator.summed_counters([state, state])
    assert (
        summed["link_member"] == 2 * expected["link_member"]
        and summed["duplicate_member"] == 2 * expected["duplicate_member"]
    )


def test_a_shard_whose_file_fails_mid_stream_is_counted_not_fatal(tmp_path, monkeypatch):
    write_tar(str(tmp_path / "00000.tar"), good_samples("a", 3))
    write_tar(str(tmp_path / "00001.tar"), good_samples("b", 3, start_seed=10))

    class FailsAfterAWhile(io.RawIOBase):
        """A remote file whose connection drops, with an exception type tarfile does not know."""

        def __init__(self, path: str) -> None:
            self.file, self.path = open(path, "rb"), path

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            if self.path.endswith("00001.tar") and self.file.tell() > 2048:
                raise RuntimeError("connection reset by peer")
            data = self.file.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)

    monkeypatch.setattr(webdataset, "open_shard", FailsAfterAWhile)
    config = make_data_config(str(tmp_path / "*.tar"), shards_per_window=2)
    with make_iterator(config, global_batch_size=3) as iterator:
        batch = next(iterator)
        counters = iterator.counters
    assert sorted(caption_of_row(row) for row in batch["texts"]) == ["a000", "a001", "a002"]
    assert counters["unreadable_shard"] == 1


def test_several_shard_patterns_in_one_string(tmp_path):
    for directory in ("laion", "coco"):
        os.makedirs(tmp_path / directory)
        for index in range(3):
            write_tar(str(tmp_path / directory / f"{index:05d}.tar"), good_samples(f"{directory}{index}-", 1))
    laion, coco = str(tmp_path / "laion"), str(tmp_path / "coco")
    expected = sorted(
        [f"{laion}/{index:05d}.tar" for index in range(3)] + [f"{coco}/{index:05d}.tar" for index in (0, 2)]
    )
    # Commas outside braces separate patterns; those inside braces are brace lists, as before.
    assert shards.resolve_shards(f"{laion}/*.tar,{coco}/{{00000,00002}}.tar") == expected
    assert shards.resolve_shards(f" {laion}/{{00000..00002}}.tar , {coco}/0000[02].tar ") == expected
    only_laion = [f"{laion}/{index:05d}.tar" for index in range(3)]
    assert shards.resolve_shards(f"{laion}/*.tar,{laion}/00001.tar,") == only_laion  # each once; empty parts ignored
    source = data_iterator.make_train_source(make_data_config(f"{laion}/*.tar,{coco}/00000.tar"), 0, 1)
    assert len(source.shards) == 4
    source.close()
    # A missing pattern says how several are written, e.g. a Python list given on the command line.
    with pytest.raises(ValueError, match="separated by commas") as error:
        shards.resolve_shards(f"['{laion}/*.tar', '{coco}/*.tar']")
    assert "\n" not in str(error.value)
