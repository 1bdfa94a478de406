"""Decoded + augmented images per second per CPU core for img2dataset shards, and how many cores
keep one accelerator busy: `python bench/data_throughput.py [--source-size 256] [--workers N]`.

Writes shards of photo-like JPEGs (smooth random fields plus sensor-like noise, img2dataset's
default 256 px and quality 95 unless told otherwise) to a temporary directory, then measures
  1. one core: decode -> random resized crop -> bicubic resize -> normalise (images/s per core);
  2. the whole pipeline (tar reading, --workers worker processes or threads, OpenAI's tokenizer,
     batching, normalisation) as train.py runs it;
  3. the built-in dataset at --synthetic-image-size (32 px: the default run) through that same
     training iterator, beside drawing + normalising each batch directly with the generator
     (what train.py did before the built-in dataset became a source), so the cost of going
     through the one pipeline is visible.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_jax.data import decode  # noqa: E402
from clip_jax.data import iterator as data_iterator  # noqa: E402
from clip_jax.data.config import default_data_config  # noqa: E402
from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig, process_batch_indices  # noqa: E402
from clip_jax.data.workers import WORKER_KINDS, default_num_workers  # noqa: E402


def photo_like_jpeg(rng: np.random.Generator, size: int, quality: int) -> bytes:
    """A JPEG with the size and decode cost of a photo: low-frequency colour fields plus noise."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.Resampling.BICUBIC), np.float32)
    detail = rng.normal(0.0, 14.0, (size, size, 3))
    pixels = np.clip(smooth + detail, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shards(directory: str, num_shards: int, per_shard: int, size: int, quality: int) -> tuple[str, float]:
    """Writes the shards; returns (glob pattern, mean JPEG bytes)."""
    rng = np.random.default_rng(0)
    # A pool of distinct images reused across samples keeps the set-up short; decoding cost is
    # the same as for all-distinct images.
    pool = [photo_like_jpeg(rng, size, quality) for _ in range(64)]
    for shard in range(num_shards):
        with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w") as archive:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                caption = f"a photo of sample {key}, taken somewhere on a sunny afternoon".encode()
                for extension, content in (("jpg", pool[(shard * per_shard + index) % len(pool)]), ("txt", caption)):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(content)
                    archive.addfile(info, io.BytesIO(content))
    return os.path.join(directory, "*.tar"), float(np.mean([len(image) for image in pool]))


def single_thread_rate(pattern: str, image_size: int, count: int) -> float:
    """Images/s of decode + augment on one thread (one core)."""
    config = default_data_config()
    config.name = "webdataset"
    config.webdataset.shards = pattern
    source = data_iterator.make_train_source(config, 0, 1)
    preparer = decode.preparer_from_config(config, image_size)
    examples = []
    for example, _ in source.examples(source.initial_position()):
        examples.append(example)
        if len(examples) == count:
            break
    source.close()
    for example in examples[:20]:  # warm caches and lazy imports
        decode.normalize_images(preparer(example)[0])
    start = time.perf_counter()
    for example in examples:
        decode.normalize_images(preparer(example)[0])
    return count / (time.perf_counter() - start)


def pipeline_rate(
    pattern: str, image_size: int, workers: int, worker_kind: str, batch_size: int, batches: int
) -> float:
    """Images/s of the whole training iterator with `workers` decoding workers."""
    from clip_jax.tokenizer import ClipTokenizer

    try:
        tokenizer = ClipTokenizer(context_length=77)
    except FileNotFoundError:  # no BPE file here: a stand-in of similar (small) cost

        def tokenizer(texts, truncate=True):
            return np.zeros((len(texts), 77), np.int32)

    config = default_data_config()
    config.name = "webdataset"
    config.webdataset.shards = pattern
    config.num_workers = workers
    config.worker_kind = worker_kind
    with data_iterator.make_train_iterator(config, tokenizer, batch_size, image_size, 0, 1) as iterator:
        next(iterator)  # start-up: first window read, threads started
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * batch_size / (time.perf_counter() - start)


def synthetic_rates(image_size: int, batch_size: int, batches: int) -> tuple[float, float]:
    """Images/s of the built-in dataset (tokenizer left out): (through the training iterator,
    drawing and normalising each process batch directly)."""

    def no_tokenizer(texts, truncate=True):
        return np.zeros((len(texts), 16), np.int32)

    config = default_data_config()  # name "synthetic"
    with data_iterator.make_train_iterator(config, no_tokenizer, batch_size, image_size, 0, 1) as iterator:
        next(iterator)  # start-up: threads started
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        through_iterator = batches * batch_size / (time.perf_counter() - start)
    dataset = SyntheticShapes(SyntheticShapesConfig(image_size=image_size))
    start = time.perf_counter()
    for step in range(1, batches + 1):
        decode.normalize_images(dataset.get_batch("train", process_batch_indices(step, batch_size, 0, 1))["images"])
    return through_iterator, batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224, help="model input size")
    parser.add_argument("--source-size", type=int, default=256, help="stored JPEG size (img2dataset's default 256)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="img2dataset's default encode quality")
    parser.add_argument("--single-thread-images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=0, help="decoding workers; 0 = one per core")
    parser.add_argument("--worker-kind", choices=WORKER_KINDS, default="process")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument(
        "--synthetic-image-size", type=int, default=32, help="model input size for the built-in dataset"
    )
    parser.add_argument("--synthetic-batches", type=int, default=50)
    parser.add_argument(
        "--gpu-images-per-second",
        type=float,
        default=0.0,
        help="training throughput of one accelerator (image-text pairs/s) to size the CPU for",
    )
    arguments = parser.parse_args()
    workers = arguments.workers or default_num_workers()
    with tempfile.TemporaryDirectory(prefix="clip_jax-bench-") as directory:
        num_shards, per_shard = 8, 250
        pattern, mean_bytes = write_shards(
            directory, num_shards, per_shard, arguments.source_size, arguments.jpeg_quality
        )
        print(
            f"{num_shards} shards x {per_shard} JPEGs of {arguments.source_size}x{arguments.source_size} px "
            f"(quality {arguments.jpeg_quality}, {mean_bytes / 1024:.0f} KiB each) -> {arguments.image_size} px"
        )
        per_core = single_thread_rate(pattern, arguments.image_size, arguments.single_thread_images)
        print(f"one core: {per_core:.0f} images/s decoded + augmented + normalised")
        total = pipeline_rate(
            pattern, arguments.image_size, workers, arguments.worker_kind, arguments.batch_size, arguments.batches
        )
        print(
            f"whole pipeline, {workers} {arguments.worker_kind} workers on {default_num_workers()} cores: "
            f"{total:.0f} images/s "
            f"({total / min(workers, default_num_workers()):.0f} per core)"
        )
        if arguments.gpu_images_per_second:
            target = arguments.gpu_images_per_second
            per_core_in_pipeline = total / min(workers, default_num_workers())
            print(
                f"to feed {target:.0f} images/s: {target / per_core:.1f} cores at the one-core rate "
                f"({target / per_core_in_pipeline:.1f} at the whole-pipeline rate)"
            )
    through_iterator, direct = synthetic_rates(
        arguments.synthetic_image_size, arguments.batch_size, arguments.synthetic_batches
    )
    print(
        f"built-in dataset at {arguments.synthetic_image_size} px, batches of {arguments.batch_size}: "
        f"{through_iterator:.0f} images/s through the training iterator, {direct:.0f} drawn directly"
    )


if __name__ == "__main__":
    main()
