"""Decoding and preparing one example: image bytes or arrays to RGB under size limits, the caption
drawn among an example's captions, open_clip's random resized crop, and the per-batch
normalisation. Pure functions of their arguments: they run in the decoding workers.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image

from clip_jax import transforms
from clip_jax.data.config import DataSettings
from clip_jax.data.sources import ImageData, RawExample, RecordReader, SkippedExample, example_contents, example_rng


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Which images are used; the others are skipped with the reason named in the check."""

    min_image_size: int = 10
    max_image_pixels: int = 50_000_000
    max_aspect_ratio: float = 10.0

    def check(self, width: int, height: int) -> None:
        if min(width, height) < self.min_image_size:
            raise SkippedExample("image_too_small", f"{width}x{height}")
        if width * height > self.max_image_pixels:
            raise SkippedExample("image_too_large", f"{width}x{height}")
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise SkippedExample("extreme_aspect_ratio", f"{width}x{height}")


# 16-bit and floating-point single-channel modes, scaled to 8 bits by hand: PIL's convert("RGB")
# would clip them at 255 and give a white image.
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(image: PIL.Image.Image) -> tuple[PIL.Image.Image, bool]:
    """(RGB image, whether its mode had to be converted). 16-bit images keep their top 8 bits."""
    if image.mode == "RGB":
        return image, False
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image)
        if image.mode == "F":
            eight_bit = np.clip(values, 0, 255).astype(np.uint8)
        else:
            # "I" holds 16-bit PNGs as int32 on some Pillow versions; anything over 8 bits is scaled.
            values = values.astype(np.int64)
            shift = 8 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 0
            eight_bit = np.clip(values >> shift, 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(eight_bit, mode="L").convert("RGB"), True
    return image.convert("RGB"), True


def decode_image(
    data: ImageData, limits: ImageLimits, reduced_decoding_size: int | None = None
) -> tuple[PIL.Image.Image, bool]:
    """(RGB PIL image, converted) from encoded bytes or a uint8 array; raises SkippedExample.

    `reduced_decoding_size`: a JPEG may be decoded at 1/2..1/8 scale as long as both sides stay at
    least this many pixels (libjpeg's DCT scaling; PIL's `draft`).
    """
    if isinstance(data, np.ndarray):
        return _image_from_array(data, limits)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SkippedExample("undecodable_image", f"unsupported image value of type {type(data).__name__}")
    if len(data) == 0:
        raise SkippedExample("undecodable_image", "empty image file")
    try:
        image = PIL.Image.open(io.BytesIO(data))
        width, height = image.size
    except PIL.Image.DecompressionBombError as error:
        raise SkippedExample("image_too_large", str(error)) from None
    except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        raise SkippedExample("undecodable_image", f"{type(error).__name__}: {error}") from None
    limits.check(width, height)  # before decoding: a huge image is never decompressed
    try:
        if reduced_decoding_size is not None and image.format == "JPEG":
            image.draft("RGB", (reduced_decoding_size, reduced_decoding_size))
        image.load()
        return to_rgb(image)
    except Exception as error:
        raise SkippedExample("undecodable_image", f"{type(error).__name__}: {error}") from None


def _image_from_array(array: np.ndarray, limits: ImageLimits) -> tuple[PIL.Image.Image, bool]:
    """An already-decoded image (TFDS decoding): uint8 or uint16, (H, W) or (H, W, 1|3|4)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise SkippedExample("undecodable_image", f"image array of shape {array.shape}")
    limits.check(int(array.shape[1]), int(array.shape[0]))
    converted = False
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
        converted = True
    elif array.dtype != np.uint8:
        raise SkippedExample("undecodable_image", f"image array of dtype {array.dtype}")
    image, mode_converted = to_rgb(PIL.Image.fromarray(np.ascontiguousarray(array)))
    return image, converted or mode_converted


def _text_of(value: Any) -> str:
    """One caption as a str; raises SkippedExample for bytes that are not UTF-8."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkippedExample("undecodable_caption", str(error)) from None
    if isinstance(value, str):
        return value
    raise SkippedExample("undecodable_caption", f"caption of type {type(value).__name__}")


def choose_caption(text: Any, rng: np.random.Generator | Callable[[], np.random.Generator]) -> str:
    """The caption of an example: itself, or one drawn uniformly among its usable captions.

    `rng` may be a function that makes the example's generator: it is then only made when there
    is a choice to draw (seeding one costs more than the rest for a single caption).
    """
    if text is None:
        raise SkippedExample("missing_caption")
    several = isinstance(text, (list, tuple)) or (isinstance(text, np.ndarray) and text.ndim > 0)
    if not several:
        caption = _text_of(text).strip()
        if not caption:
            raise SkippedExample("empty_caption")
        return caption
    candidates, undecodable = [], 0
    for value in list(np.asarray(text, dtype=object).reshape(-1)):
        try:
            caption = _text_of(value).strip()
        except SkippedExample:
            undecodable += 1
            continue
        if caption:
            candidates.append(caption)
    if not candidates:
        raise SkippedExample("undecodable_caption" if undecodable else "empty_caption")
    generator = rng if isinstance(rng, np.random.Generator) else rng()
    return candidates[int(generator.integers(len(candidates)))]


@dataclasses.dataclass(frozen=True)
class ExamplePreparer:
    """Turns a RawExample into (image uint8 (size, size, 3), caption, converted): decoding, the
    caption draw, open_clip's random resized crop and bicubic resize. Normalisation happens per
    batch (`normalize_images`), so workers send back a quarter of the bytes.

    `ready_sized`: the source's images are uint8 (image_size, image_size, 3) arrays used as they are
    (ExampleSource.ready_sized): not decoded, not cropped; any other image is an error.
    """

    image_size: int
    seed: int
    limits: ImageLimits = ImageLimits()
    crop_scale: tuple[float, float] = transforms.DEFAULT_TRAIN_SCALE
    reduced_jpeg_decoding: bool = True
    ready_sized: bool = False

    def reduced_decoding_size(self) -> int | None:
        if not self.reduced_jpeg_decoding:
            return None
        # A crop's shorter side is at least sqrt(scale_min / max_ratio) of the image's shorter side
        # (max_ratio = 4/3, sqrt = 1.155): decoding to at least this size never makes a crop
        # smaller than the output, so a reduced decode is never upsampled afterwards.
        max_ratio = transforms.DEFAULT_TRAIN_RATIO[1]
        return int(math.ceil(self.image_size * math.sqrt(max_ratio / self.crop_scale[0])))

    def __call__(self, example: RawExample, reader: RecordReader | None = None) -> tuple[np.ndarray, str, bool]:
        """(pixels, caption, converted) or raises SkippedExample."""
        if example.problem is not None:
            raise SkippedExample(example.problem, example.description)
        image_data, text = example_contents(example, reader)
        if image_data is None:
            raise SkippedExample("missing_image", example.description)
        if self.ready_sized:  # no crop to draw: the generator is only made for a caption choice
            return self._ready_sized(example, image_data, text)
        rng = example_rng(self.seed, example.epoch, example.identity)
        caption = choose_caption(text, rng)  # drawn before the crop, from the same generator
        image, converted = decode_image(image_data, self.limits, self.reduced_decoding_size())
        # transforms.train_transform's crop, without its per-image normalisation.
        cropped = transforms.random_resized_crop(image, self.image_size, rng, scale=self.crop_scale)
        return np.asarray(cropped, dtype=np.uint8), caption, converted

    def _ready_sized(self, example: RawExample, image_data: ImageData, text: Any) -> tuple[np.ndarray, str, bool]:
        """The image array as it is (no decoding, no crop) and the caption."""
        expected = (self.image_size, self.image_size, 3)
        if not isinstance(image_data, np.ndarray) or image_data.dtype != np.uint8 or image_data.shape != expected:
            found = (
                f"{image_data.dtype} {image_data.shape}"
                if isinstance(image_data, np.ndarray)
                else type(image_data).__name__
            )
            raise ValueError(
                f"{example.description or 'an example'} of a ready-sized source is {found}; expected uint8 {expected}"
            )
        caption = choose_caption(text, functools.partial(example_rng, self.seed, example.epoch, example.identity))
        return image_data, caption, False


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 with OpenAI's statistics: transforms.normalize_pixels, the
    arithmetic of the evaluation transform, bit for bit. Per batch, so workers send back uint8
    (a quarter of the bytes)."""
    return transforms.normalize_pixels(images, transforms.OPENAI_MEAN, transforms.OPENAI_STD)


def preparer_from_config(data_config: DataSettings, image_size: int, ready_sized: bool = False) -> ExamplePreparer:
    """The decode + augment settings of `config.data`; `ready_sized` as the source says."""
    scale = tuple(float(value) for value in data_config.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(
            f"data.crop_scale must be (lower, upper) with 0 < lower <= upper <= 1, got {data_config.crop_scale!r}"
        )
    limits = ImageLimits(
        min_image_size=int(data_config.min_image_size),
        max_image_pixels=int(data_config.max_image_pixels),
        max_aspect_ratio=float(data_config.max_aspect_ratio),
    )
    if limits.min_image_size < 1 or limits.max_image_pixels < 1 or limits.max_aspect_ratio < 1:
        raise ValueError(
            "data.min_image_size and data.max_image_pixels must be >= 1 and data.max_aspect_ratio >= 1; "
            f"got {limits.min_image_size}, {limits.max_image_pixels}, {limits.max_aspect_ratio}"
        )
    return ExamplePreparer(
        image_size=int(image_size),
        seed=int(data_config.seed),
        limits=limits,
        crop_scale=scale,
        reduced_jpeg_decoding=bool(data_config.reduced_jpeg_decoding),
        ready_sized=ready_sized,
    )
