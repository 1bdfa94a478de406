"""Image preprocessing for CLIP on PIL images: OpenAI's evaluation transform and the
random-resized-crop training augmentation, both giving float32 (height, width, 3) arrays.

The evaluation transform reproduces open_clip's (torchvision on PIL images) step for step:
bicubic resize of the short side, center crop, RGB conversion, scaling to [0, 1], per-channel
normalisation. Only PIL and numpy are used, so the data pipeline needs no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
from etils import epath

# Per-channel statistics of OpenAI's training images (RGB order).
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# torchvision's RandomResizedCrop defaults for the aspect ratio; open_clip's training scale.
DEFAULT_TRAIN_SCALE: tuple[float, float] = (0.9, 1.0)
DEFAULT_TRAIN_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

# torchvision tries this many random boxes before falling back to a center crop.
RANDOM_CROP_ATTEMPTS = 10

ImageInput = PIL.Image.Image | np.ndarray | str | os.PathLike

# A crop box as (top, left, height, width) in pixels, torchvision's (i, j, h, w) order.
CropBox = tuple[int, int, int, int]

_BICUBIC = PIL.Image.Resampling.BICUBIC


def _check_image_size(image_size: int) -> int:
    # bool is an int subclass; True as a size is certainly a mistake.
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}: {image_size!r}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return int(image_size)


def _check_channel_statistics(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Returns mean and std as float32 arrays of shape (3,), refusing anything else."""
    mean_array = np.asarray(mean, dtype=np.float32)
    std_array = np.asarray(std, dtype=np.float32)
    if mean_array.shape != (3,):
        raise ValueError(f"mean must hold 3 values (R, G, B), got {mean!r}")
    if std_array.shape != (3,):
        raise ValueError(f"std must hold 3 values (R, G, B), got {std!r}")
    if not np.all(std_array > 0):
        raise ValueError(f"std values must be positive, got {std!r}")
    return mean_array, std_array


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    """Checks a (lower, upper) pair of positive numbers, as scale and ratio are."""
    try:
        lower, upper = (float(bound) for bound in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (lower, upper) pair of numbers, got {value!r}") from None
    if not 0 < lower <= upper:
        raise ValueError(f"{name} must satisfy 0 < lower <= upper, got {value!r}")
    return lower, upper


def load_image(image: ImageInput) -> PIL.Image.Image:
    """Returns a PIL image for a PIL image, a uint8 array ((H, W), (H, W, 1|3|4)) or a file path.

    The mode is kept as it is (no RGB conversion here): the transforms convert after
    resizing, as open_clip does, which matters for modes such as RGBA, P and I;16.
    """
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8, got dtype {image.dtype} (shape {image.shape})")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        # Pillow reads uint8 (H, W) as L, (H, W, 3) as RGB and (H, W, 4) as RGBA.
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4)):
            return PIL.Image.fromarray(image)
        raise ValueError(f"image arrays must be (H, W) or (H, W, 1|3|4), got shape {image.shape}")
    if isinstance(image, (str, os.PathLike)):
        with epath.Path(image).open("rb") as file, PIL.Image.open(file) as opened:
            # Read the pixels now so the file is closed when this returns.
            opened.load()
        return opened
    raise TypeError(
        f"expected a PIL image, a uint8 numpy array or a file path, got {type(image).__name__}: {image!r:.200}"
    )


def _resize_short_side(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Bicubic resize so the short side is `size`, as torchvision's Resize(int) does on PIL."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    # torchvision truncates the long side (int(size * long / short)); exact integer floor
    # division gives the same value without float rounding questions.
    new_short, new_long = size, size * long // short
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), _BICUBIC)


def _center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Crops a size x size square from the middle; the image must be at least that large."""
    width, height = image.size
    # Python's round() rounds halves to even, as in torchvision: a surplus of 1 row starts
    # the crop at row 0 (the spare row goes at the bottom), a surplus of 3 starts it at row 2
    # (two rows go at the top, one at the bottom).
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize_pixels(
    pixels: np.ndarray, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
) -> np.ndarray:
    """uint8 (..., H, W, 3) RGB -> float32 scaled to [0, 1] and normalised per channel.

    The one normalisation of clip_jax: the transforms below and the training batches
    (clip_jax.data.decode.normalize_images) both go through it, so they agree bit for bit.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-1] != 3:
        shape = getattr(pixels, "shape", None)
        raise ValueError(f"expected uint8 (..., H, W, 3) images, got {getattr(pixels, 'dtype', type(pixels))} {shape}")
    mean_array, std_array = _check_channel_statistics(mean, std)
    width = pixels.shape[-2]
    # float32 throughout, with the same operation order as torch (divide, subtract, divide),
    # so results match open_clip to the last bit. In place on a (rows, W*3) view with the channel
    # constants tiled along the row: numpy's inner loop then spans whole rows rather than
    # 3-element pixels, so the same operations pay far fewer loop starts.
    out = pixels.reshape(-1, width * 3).astype(np.float32)
    out /= np.float32(255)
    out -= np.tile(mean_array, width)
    out /= np.tile(std_array, width)
    return out.reshape(pixels.shape)


def _to_normalized_array(image: PIL.Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """RGB-converts, scales to [0, 1] and normalises; (H, W, 3) float32."""
    return normalize_pixels(np.asarray(image.convert("RGB"), dtype=np.uint8), mean, std)


def eval_transform(
    image: ImageInput,
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> np.ndarray:
    """OpenAI's evaluation preprocessing of one image; (image_size, image_size, 3) float32."""
    image_size = _check_image_size(image_size)
    mean_array, std_array = _check_channel_statistics(mean, std)
    pil_image = load_image(image)
    # Resize and crop in the image's own mode; RGB conversion comes last, as in open_clip.
    cropped = _center_crop(_resize_short_side(pil_image, image_size), image_size)
    return _to_normalized_array(cropped, mean_array, std_array)


def sample_random_resized_crop(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_TRAIN_SCALE,
    ratio: Sequence[float] = DEFAULT_TRAIN_RATIO,
) -> CropBox:
    """Draws a crop box (top, left, height, width) the way torchvision's RandomResizedCrop does.

    Up to 10 tries: an area fraction uniform in `scale`, an aspect ratio (width / height)
    log-uniform in `ratio`, a uniform position; a box that does not fit is retried. After 10
    misses, the largest centered box whose aspect ratio is clamped into `ratio`.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}: {rng!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image width and height must be positive, got {width} x {height}")
    scale_lower, scale_upper = _check_range("scale", scale)
    ratio_lower, ratio_upper = _check_range("ratio", ratio)
    area = width * height
    log_ratio_lower, log_ratio_upper = math.log(ratio_lower), math.log(ratio_upper)
    for _ in range(RANDOM_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale_lower, scale_upper)
        aspect_ratio = math.exp(rng.uniform(log_ratio_lower, log_ratio_upper))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            # integers() excludes the upper bound, like torch.randint.
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    input_ratio = width / height
    if input_ratio < ratio_lower:
        crop_width, crop_height = width, int(round(width / ratio_lower))
    elif input_ratio > ratio_upper:
        crop_width, crop_height = int(round(height * ratio_upper)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop(
    image: PIL.Image.Image,
    image_size: int,
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_TRAIN_SCALE,
    ratio: Sequence[float] = DEFAULT_TRAIN_RATIO,
) -> PIL.Image.Image:
    """open_clip's random resized crop of a PIL image: a box drawn by sample_random_resized_crop,
    resized bicubically to image_size x image_size (not resized when already that size). The
    one crop of clip_jax: the training transform and the data pipeline's workers both use it."""
    top, left, crop_height, crop_width = sample_random_resized_crop(image.width, image.height, rng, scale, ratio)
    cropped = image.crop((left, top, left + crop_width, top + crop_height))
    if cropped.size != (image_size, image_size):
        cropped = cropped.resize((image_size, image_size), _BICUBIC)
    return cropped


def train_transform(
    image: ImageInput,
    image_size: int,
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_TRAIN_SCALE,
    ratio: Sequence[float] = DEFAULT_TRAIN_RATIO,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> np.ndarray:
    """Random resized crop, bicubic resize to image_size, RGB, normalise; open_clip's training
    augmentation. (image_size, image_size, 3) float32, a function of the image and rng state."""
    image_size = _check_image_size(image_size)
    mean_array, std_array = _check_channel_statistics(mean, std)
    cropped = random_resized_crop(load_image(image), image_size, rng, scale, ratio)
    return _to_normalized_array(cropped, mean_array, std_array)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """The `preprocess` callable: PIL image (or array, or path) -> (size, size, 3) float32."""

    image_size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        _check_channel_statistics(self.mean, self.std)

    def __call__(self, image: ImageInput) -> np.ndarray:
        return eval_transform(image, self.image_size, self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Training augmentation callable: (image, rng) -> (size, size, 3) float32."""

    image_size: int
    scale: tuple[float, float] = DEFAULT_TRAIN_SCALE
    ratio: tuple[float, float] = DEFAULT_TRAIN_RATIO
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        _check_range("scale", self.scale)
        _check_range("ratio", self.ratio)
        _check_channel_statistics(self.mean, self.std)

    def __call__(self, image: ImageInput, rng: np.random.Generator) -> np.ndarray:
        return train_transform(image, self.image_size, rng, self.scale, self.ratio, self.mean, self.std)


def make_eval_transform(
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> Callable[[ImageInput], np.ndarray]:
    """Returns the evaluation transform bound to its settings (checked now, not at first use)."""
    _check_channel_statistics(mean, std)
    return EvalTransform(image_size, tuple(mean), tuple(std))


def make_train_transform(
    image_size: int,
    scale: Sequence[float] = DEFAULT_TRAIN_SCALE,
    ratio: Sequence[float] = DEFAULT_TRAIN_RATIO,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> Callable[[ImageInput, np.random.Generator], np.ndarray]:
    """Returns the training augmentation bound to its settings; call it as f(image, rng)."""
    _check_range("scale", scale)
    _check_range("ratio", ratio)
    _check_channel_statistics(mean, std)
    return TrainTransform(image_size, tuple(scale), tuple(ratio), tuple(mean), tuple(std))


def preprocess_batch(
    images: Sequence[ImageInput],
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> np.ndarray:
    """Evaluation transform over a list of PIL images, uint8 arrays and/or file paths, or over a
    uint8 (n, H, W, C) array; returns (n, image_size, image_size, 3) float32."""
    image_size = _check_image_size(image_size)
    _check_channel_statistics(mean, std)
    # A lone path or image is itself iterable (characters, rows); refuse it rather than
    # silently treating it as many images.
    if isinstance(images, (str, os.PathLike, PIL.Image.Image)) or (isinstance(images, np.ndarray) and images.ndim != 4):
        raise TypeError(
            "preprocess_batch takes a sequence of images (or an (n, H, W, C) array); "
            f"wrap a single image in a list, got {type(images).__name__}: {images!r:.200}"
        )
    if not isinstance(images, (Sequence, np.ndarray)):
        raise TypeError(f"images must be a sequence, got {type(images).__name__}: {images!r:.200}")
    batch = np.empty((len(images), image_size, image_size, 3), dtype=np.float32)
    for index, image in enumerate(images):
        batch[index] = eval_transform(image, image_size, mean, std)
    return batch


def as_image_batch(images: Any) -> Any:
    """One image (PIL, path, (H, W[, C]) array) becomes a batch of one; batches pass through."""
    if isinstance(images, (PIL.Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images]
    return images


def preprocess_images(images: Any, image_size: int, preprocess: Callable | None = None) -> np.ndarray:
    """float32 (n, image_size, image_size, 3) model inputs from a batch of images.

    A uint8 array already `image_size` square is only normalised (what `preprocess` would do to
    it); a float array of that shape is taken as already preprocessed; anything else (a list of
    PIL images, paths or arrays of other sizes) goes through `preprocess` (default: the
    evaluation transform) one image at a time.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (image_size, image_size, 3):
        if images.dtype == np.uint8:
            return normalize_pixels(images)  # the evaluation transform's arithmetic, bit for bit
        if np.issubdtype(images.dtype, np.floating):
            return images.astype(np.float32)
    if preprocess is None:
        preprocess = make_eval_transform(image_size)
    processed = [np.asarray(preprocess(image), np.float32) for image in images]
    if not processed:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return np.stack(processed)
