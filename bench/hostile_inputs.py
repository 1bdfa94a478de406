"""What hostile captions and shards cost: `python bench/hostile_inputs.py [--tokenizer-file PATH]`.

Prints
  1. ClipTokenizer(truncate=True) time (median of 3, fresh inputs each run) for one unbroken
     word of 10k, 20k and 40k random letters, and for a 1 MB caption of mixed words;
  2. the peak resident memory growth (VmHWM, Linux) and time of reading, in a fresh process, a
     .tar.gz holding a gigabyte of zeros, and a shard holding a 100 MiB caption
     (sizes: --word-lengths, --zeros-mib, --caption-mib).
`--tokenizer-file` times another copy of clip_jax/tokenizer.py (say an older one, from
`git show OLD:clip_jax/tokenizer.py > /tmp/old_tokenizer.py`); it is loaded on its own, as the
module needs nothing else of clip_jax. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIXED_WORDS = ["photo", "dog", "the", "xylophone", "café", "2024", "!!", "日本語", "&amp;", "it's", "Ã©"]

READ_IN_A_FRESH_PROCESS = """
import json, sys, time
from clip_jax.data import iterator
from clip_jax.data.config import default_data_config

def peak_mib():  # this process image's peak resident memory (ru_maxrss would include the parent's)
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024

config = default_data_config()
config.name = "webdataset"
config.webdataset.shards = sys.argv[1]
source = iterator.make_train_source(config, 0, 1)
start, before = time.perf_counter(), peak_mib()
problems = []
for count, (example, _) in enumerate(source.examples(source.initial_position()), start=1):
    problems.append(example.problem)
    if count == int(sys.argv[2]):
        break
print(json.dumps({"growth_mib": peak_mib() - before, "seconds": time.perf_counter() - start, "problems": problems}))
sys.stdout.flush()
import os; os._exit(0)
"""


def load_tokenizer_module(path: str):
    spec = importlib.util.spec_from_file_location("timed_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_seconds(function, inputs) -> float:
    times = []
    for value in inputs:
        start = time.perf_counter()
        function(value)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_tokenizer(path: str, lengths: list[int]) -> None:
    tokenizer = load_tokenizer_module(path).ClipTokenizer()
    tokenizer(["warm up"], truncate=True)
    generator = random.Random(0)
    print(f"tokenizer {path}")
    for length in lengths:
        words = ["".join(generator.choices("abcdefghijklmnopqrstuvwxyz", k=length)) for _ in range(3)]
        seconds = median_seconds(lambda text: tokenizer([text], truncate=True), words)
        print(f"  one {length:,}-letter word: {seconds * 1000:10.1f} ms")
    captions = [" ".join(generator.choices(MIXED_WORDS, k=200_000))[:1_000_000] for _ in range(3)]
    seconds = median_seconds(lambda text: tokenizer([text], truncate=True), captions)
    print(f"  a 1 MB caption of mixed words: {seconds * 1000:6.1f} ms")


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        count = self.left if size < 0 else min(size, self.left)
        self.left -= count
        return bytes(count)


def add(archive: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    archive.addfile(info, io.BytesIO(content))


def read_shard(pattern: str, examples: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", READ_IN_A_FRESH_PROCESS, pattern, str(examples)],
        cwd=REPOSITORY, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_shards(zeros_mib: int, caption_mib: int) -> None:
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), (200, 80, 20)).save(buffer, format="JPEG")
    image = buffer.getvalue()
    with tempfile.TemporaryDirectory() as directory:
        bomb = os.path.join(directory, "bomb", "00000.tar.gz")
        os.makedirs(os.path.dirname(bomb))
        with tarfile.open(bomb, "w:gz", compresslevel=1) as archive:
            add(archive, "before.jpg", image)
            add(archive, "before.txt", b"before")
            info = tarfile.TarInfo("zeros.jpg")
            info.size = zeros_mib << 20
            archive.addfile(info, Zeros(info.size))
            add(archive, "zeros.txt", b"a caption beside the zeros")
            add(archive, "after.jpg", image)
            add(archive, "after.txt", b"after")
        size = os.path.getsize(bomb) / 2**20
        print(f"a {size:.1f} MiB .tar.gz holding {zeros_mib} MiB of zeros: {read_shard(bomb, 3)}")
        caption = os.path.join(directory, "caption", "00000.tar")
        os.makedirs(os.path.dirname(caption))
        with tarfile.open(caption, "w") as archive:
            add(archive, "small.jpg", image)
            add(archive, "small.txt", b"small")
            add(archive, "huge.jpg", image)
            add(archive, "huge.txt", b"word " * ((caption_mib << 20) // 5))
        print(f"a shard with a {caption_mib} MiB caption: {read_shard(caption, 2)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-file", default=os.path.join(REPOSITORY, "clip_jax", "tokenizer.py"))
    parser.add_argument("--word-lengths", default="10000,20000,40000", help="letters of the long words timed")
    parser.add_argument("--zeros-mib", type=int, default=1024, help="zeros in the compressed shard")
    parser.add_argument("--caption-mib", type=int, default=100, help="size of the oversized caption")
    parser.add_argument("--skip-shards", action="store_true")
    arguments = parser.parse_args()
    time_tokenizer(arguments.tokenizer_file, [int(length) for length in arguments.word_lengths.split(",")])
    if not arguments.skip_shards:
        measure_shards(arguments.zeros_mib, arguments.caption_mib)


if __name__ == "__main__":
    main()
