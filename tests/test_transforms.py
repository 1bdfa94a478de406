"""Tests of clip_jax.transforms: parity with open_clip's preprocessing (torchvision on PIL),
the random-resized-crop sampler, batching of mixed inputs and the refusal of bad input."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from clip_jax import transforms

# (width, height) pairs: landscape, portrait, square, smaller than the crop, odd sizes,
# thin strips, already the target size, and crop surpluses of 1 and 3 pixels (where the
# center crop's round-half-to-even matters).
SIZES_224 = [
    (300, 200),
    (200, 300),
    (256, 256),
    (100, 60),
    (225, 223),
    (333, 517),
    (2, 150),
    (150, 2),
    (224, 224),
    (224, 225),
    (227, 224),
]
# One-pixel strips become 224 x 112000 before the crop (about a second each), so only a
# few modes run them.
ONE_PIXEL_STRIPS = [(1, 500), (500, 1)]
SIZES_OTHER = [(300, 200), (201, 333), (100, 60), (339, 341), (3, 40)]
MODES = ["RGB", "L", "RGBA", "CMYK", "P", "LA", "I;16", "I", "F", "1"]
CHANNELS = {"RGB": 3, "L": 1, "RGBA": 4, "CMYK": 4, "LA": 2}
TOLERANCE = 1e-5


def random_image(mode: str, width: int, height: int, rng: np.random.Generator) -> PIL.Image.Image:
    """An image of the given mode filled with random values over the mode's whole range."""
    if mode == "P":
        image = PIL.Image.frombytes("P", (width, height), rng.integers(0, 256, width * height, np.uint8).tobytes())
        image.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
        return image
    if mode == "I;16":
        values = rng.integers(0, 65536, (height, width)).astype("<u2")
        return PIL.Image.frombytes("I;16", (width, height), values.tobytes())
    if mode == "I":
        return PIL.Image.fromarray(rng.integers(-300, 600, (height, width)).astype(np.int32))
    if mode == "F":
        return PIL.Image.fromarray(rng.uniform(-20.0, 300.0, (height, width)).astype(np.float32))
    if mode == "1":
        return PIL.Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    values = rng.integers(0, 256, (height, width, CHANNELS[mode]), np.uint8)
    return PIL.Image.frombytes(mode, (width, height), values.tobytes())


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


def open_clip_eval(open_clip, image: PIL.Image.Image, image_size: int) -> np.ndarray:
    """open_clip's eval preprocess output as (H, W, 3) numpy."""
    preprocess = open_clip.image_transform(image_size, is_train=False)
    return preprocess(image).permute(1, 2, 0).numpy()


def test_openai_statistics_match_open_clip(open_clip):
    assert transforms.OPENAI_MEAN == tuple(open_clip.constants.OPENAI_DATASET_MEAN)
    assert transforms.OPENAI_STD == tuple(open_clip.constants.OPENAI_DATASET_STD)


@pytest.mark.parametrize("mode", MODES)
def test_eval_transform_matches_open_clip_at_224(open_clip, mode):
    rng = np.random.default_rng(sum(map(ord, mode)))
    worst = 0.0
    for width, height in SIZES_224:
        image = random_image(mode, width, height, rng)
        assert image.mode == mode
        ours = transforms.eval_transform(image, 224)
        reference = open_clip_eval(open_clip, image, 224)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        difference = float(np.max(np.abs(ours - reference)))
        assert difference <= TOLERANCE, (mode, width, height, difference)
        worst = max(worst, difference)
    print(f"eval_transform vs open_clip, mode {mode}, size 224: max abs difference {worst:.3g}")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_eval_transform_matches_open_clip_on_one_pixel_strips(open_clip, mode):
    rng = np.random.default_rng(1)
    for width, height in ONE_PIXEL_STRIPS:
        image = random_image(mode, width, height, rng)
        difference = float(np.max(np.abs(transforms.eval_transform(image) - open_clip_eval(open_clip, image, 224))))
        print(f"eval_transform vs open_clip, mode {mode}, {width}x{height}: max abs difference {difference:.3g}")
        assert difference <= TOLERANCE


@pytest.mark.parametrize("image_size", [336, 288])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_eval_transform_matches_open_clip_at_other_sizes(open_clip, mode, image_size):
    rng = np.random.default_rng(image_size)
    worst = 0.0
    for width, height in SIZES_OTHER:
        image = random_image(mode, width, height, rng)
        ours = transforms.eval_transform(image, image_size)
        reference = open_clip_eval(open_clip, image, image_size)
        assert ours.shape == (image_size, image_size, 3)
        difference = float(np.max(np.abs(ours - reference)))
        assert difference <= TOLERANCE, (mode, width, height, difference)
        worst = max(worst, difference)
    print(f"eval_transform vs open_clip, mode {mode}, size {image_size}: max abs difference {worst:.3g}")


def test_eval_transform_with_custom_statistics_matches_open_clip(open_clip):
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    image = random_image("RGB", 180, 250, np.random.default_rng(3))
    reference = open_clip.image_transform(160, is_train=False, mean=mean, std=std)(image).permute(1, 2, 0).numpy()
    ours = transforms.make_eval_transform(160, mean=mean, std=std)(image)
    assert np.max(np.abs(ours - reference)) <= TOLERANCE


def test_make_eval_transform_equals_eval_transform():
    image = random_image("RGBA", 150, 97, np.random.default_rng(4))
    preprocess = transforms.make_eval_transform(64)
    np.testing.assert_array_equal(preprocess(image), transforms.eval_transform(image, 64))


def test_train_transform_shape_dtype_and_determinism():
    image = random_image("RGB", 320, 240, np.random.default_rng(5))
    first = transforms.train_transform(image, 96, np.random.default_rng(0))
    again = transforms.train_transform(image, 96, np.random.default_rng(0))
    other = transforms.train_transform(image, 96, np.random.default_rng(1))
    assert first.shape == (96, 96, 3) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    box_seed_0 = transforms.sample_random_resized_crop(320, 240, np.random.default_rng(0))
    box_seed_1 = transforms.sample_random_resized_crop(320, 240, np.random.default_rng(1))
    assert box_seed_0 != box_seed_1


def test_make_train_transform_equals_train_transform():
    image = random_image("L", 200, 150, np.random.default_rng(6))
    augment = transforms.make_train_transform(48, scale=(0.5, 1.0))
    np.testing.assert_array_equal(
        augment(image, np.random.default_rng(7)),
        transforms.train_transform(image, 48, np.random.default_rng(7), scale=(0.5, 1.0)),
    )


def test_train_transform_without_randomness_is_eval_transform_on_square_image():
    # scale=(1, 1) and ratio=(1, 1) on a square image leave exactly one box, the whole image;
    # resizing it to a square equals resizing its short side, and the center crop is empty.
    for side in (224, 300, 97):
        image = random_image("RGBA", side, side, np.random.default_rng(side))
        augmented = transforms.train_transform(image, 224, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1))
        np.testing.assert_array_equal(augmented, transforms.eval_transform(image, 224))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_train_transform_matches_open_clip_for_the_same_crop_box(open_clip, monkeypatch, mode):
    """open_clip's training pipeline, with torchvision's box sampler replaced by ours,
    gives our output; the patched sampler also sees the scale and ratio open_clip uses."""
    import torchvision.transforms

    image = random_image(mode, 260, 190, np.random.default_rng(8))
    seen_arguments = []
    for seed in range(4):
        box = transforms.sample_random_resized_crop(260, 190, np.random.default_rng(seed))

        def fixed_box(image_argument, scale, ratio, box=box):
            seen_arguments.append((tuple(scale), tuple(ratio)))
            return box

        monkeypatch.setattr(torchvision.transforms.RandomResizedCrop, "get_params", staticmethod(fixed_box))
        reference = open_clip.image_transform(128, is_train=True)(image).permute(1, 2, 0).numpy()
        ours = transforms.train_transform(image, 128, np.random.default_rng(seed))
        difference = float(np.max(np.abs(ours - reference)))
        assert difference <= TOLERANCE, (seed, box, difference)
    assert seen_arguments and all(
        arguments == (transforms.DEFAULT_TRAIN_SCALE, transforms.DEFAULT_TRAIN_RATIO) for arguments in seen_arguments
    )


@pytest.mark.parametrize(
    "width, height, scale",
    [
        (1, 500, (0.9, 1.0)),
        (500, 1, (0.9, 1.0)),
        # 5 / (3/4) and 5 * (4/3) are 6.67: rounding, not truncation, of the clamped side.
        (5, 700, (0.9, 1.0)),
        (700, 5, (0.9, 1.0)),
        # No box can exceed the image: the fallback is the whole image.
        (100, 80, (2.0, 3.0)),
    ],
)
def test_fallback_box_matches_torchvision(open_clip, width, height, scale):
    # Every attempt misses for these shapes/scales, so torchvision's answer is deterministic.
    import torch
    import torchvision.transforms

    torch.manual_seed(0)
    image = PIL.Image.new("RGB", (width, height))
    expected = torchvision.transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
    ours = transforms.sample_random_resized_crop(width, height, np.random.default_rng(0), scale=scale)
    assert ours == tuple(expected)


def test_sampled_boxes_fit_and_follow_torchvision_distribution(open_clip):
    import torch
    import torchvision.transforms

    width, height, scale, ratio = 640, 480, (0.3, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(9)
    ours = np.array([transforms.sample_random_resized_crop(width, height, rng, scale, ratio) for _ in range(3000)])
    torch.manual_seed(9)
    image = PIL.Image.new("L", (width, height))
    theirs = np.array([torchvision.transforms.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(3000)])
    top, left, crop_height, crop_width = ours.T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + crop_height <= height) and np.all(left + crop_width <= width)
    # Rounding the sides to integers moves area and aspect a little outside the ranges.
    area_fraction = crop_height * crop_width / (width * height)
    assert area_fraction.min() >= scale[0] - 0.01 and area_fraction.max() <= 1.0
    assert np.all(crop_width / crop_height >= ratio[0] - 0.02) and np.all(crop_width / crop_height <= ratio[1] + 0.02)
    assert len(set(top.tolist())) > 50 and len(set(left.tolist())) > 50

    def summary(boxes: np.ndarray) -> np.ndarray:
        box_top, box_left, box_height, box_width = boxes.T.astype(float)
        return np.array(
            [
                np.mean(box_height * box_width / (width * height)),
                np.mean(np.log(box_width / box_height)),
                np.mean((box_top + box_height / 2) / height),
                np.mean((box_left + box_width / 2) / width),
            ]
        )

    ours_summary, theirs_summary = summary(ours), summary(theirs)
    print(f"box statistics (area, log aspect, center y, center x): ours {ours_summary}, torchvision {theirs_summary}")
    np.testing.assert_allclose(ours_summary, theirs_summary, atol=0.012)


def test_preprocess_batch_accepts_mixed_inputs(tmp_path):
    rng = np.random.default_rng(10)
    pil_image = random_image("RGB", 120, 90, rng)
    color_array = rng.integers(0, 256, (70, 110, 3), np.uint8)
    gray_array = rng.integers(0, 256, (80, 50), np.uint8)
    rgba_array = rng.integers(0, 256, (64, 64, 4), np.uint8)
    saved = random_image("P", 75, 130, rng)
    path = tmp_path / "image.png"
    saved.save(path)
    batch = transforms.preprocess_batch([pil_image, color_array, gray_array, rgba_array, str(path), path], 64)
    assert batch.shape == (6, 64, 64, 3) and batch.dtype == np.float32
    expected_images = [
        pil_image,
        PIL.Image.frombytes("RGB", (110, 70), color_array.tobytes()),
        PIL.Image.frombytes("L", (50, 80), gray_array.tobytes()),
        PIL.Image.frombytes("RGBA", (64, 64), rgba_array.tobytes()),
        saved,
        saved,
    ]
    for row, expected_image in zip(batch, expected_images):
        np.testing.assert_array_equal(row, transforms.eval_transform(expected_image, 64))

    stacked = rng.integers(0, 256, (3, 40, 50, 3), np.uint8)
    assert transforms.preprocess_batch(stacked, 32).shape == (3, 32, 32, 3)
    assert transforms.preprocess_batch([], 32).shape == (0, 32, 32, 3)


@pytest.mark.parametrize("image_size", [0, -3])
def test_non_positive_image_size_is_refused(image_size):
    image = PIL.Image.new("RGB", (10, 10))
    for call in (
        lambda: transforms.eval_transform(image, image_size),
        lambda: transforms.make_eval_transform(image_size),
        lambda: transforms.train_transform(image, image_size, np.random.default_rng(0)),
        lambda: transforms.make_train_transform(image_size),
        lambda: transforms.preprocess_batch([image], image_size),
    ):
        with pytest.raises(ValueError, match=str(image_size)):
            call()


@pytest.mark.parametrize("image_size", [22.5, "224", True])
def test_non_integer_image_size_is_refused(image_size):
    with pytest.raises(TypeError, match="image_size"):
        transforms.make_eval_transform(image_size)


@pytest.mark.parametrize("bad_image", [object(), 3.5, None, b"not an image", [[1, 2], [3, 4]]])
def test_non_image_is_refused(bad_image):
    with pytest.raises(TypeError, match=type(bad_image).__name__):
        transforms.eval_transform(bad_image)
    with pytest.raises(TypeError, match=type(bad_image).__name__):
        transforms.preprocess_batch([bad_image])


def test_bad_arrays_and_settings_are_refused():
    with pytest.raises(TypeError, match="float64"):
        transforms.eval_transform(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"\(8, 8, 2\)"):
        transforms.eval_transform(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\(1\.0, 0\.5\)"):
        transforms.make_train_transform(64, scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="-1"):
        transforms.sample_random_resized_crop(10, 10, np.random.default_rng(0), ratio=(-1, 1))
    with pytest.raises(TypeError, match="int: 0"):
        transforms.train_transform(PIL.Image.new("RGB", (10, 10)), 8, rng=0)
    with pytest.raises(ValueError, match=r"\(0\.5, 0\.5\)"):
        transforms.make_eval_transform(64, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        transforms.eval_transform(PIL.Image.new("RGB", (10, 10)), 8, std=(0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match="image.png"):
        transforms.preprocess_batch("image.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        transforms.preprocess_batch(["missing.png"])
