"""Drawing the built-in dataset's images: the palette, the shape masks, the background kinds, the
counter-based randomness every example's choices come from, and `ShapeRenderer`, which draws a batch
of examples from their choices at once with numpy, as training shows them or shifted.

An image is a pure function of its example's choices (clip_jax.data.synthetic makes them from
(seed, split, index)) and the shift, bit-identical whatever else the batch holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from clip_jax.data.sources import mix64

# Saturated colours, pairwise at least ~90 apart in RGB so a shape's colour is unambiguous.
COLOR_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (250, 135, 20),
    "yellow": (245, 225, 30),
    "green": (30, 170, 50),
    "cyan": (20, 210, 225),
    "blue": (30, 70, 225),
    "purple": (140, 50, 190),
    "pink": (255, 120, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

DEFAULT_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink",
)  # fmt: skip
DEFAULT_SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart",
)  # fmt: skip

# Shape radius as a fraction of the image side; each example jitters inside its range.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.14, 0.17),
    "medium": (0.21, 0.24),
    "large": (0.29, 0.32),
}

# Position name -> (horizontal, vertical) placement in {-1, 0, 1}; -1 is left / top.
POSITIONS: dict[str, tuple[int, int]] = {
    "center": (0, 0),
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "top left": (-1, -1),
    "top right": (1, -1),
    "bottom left": (-1, 1),
    "bottom right": (1, 1),
}

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noisy", "striped", "checkered")

# Background colours: muted (low-saturation) mid tones, far from every named colour so the
# only named colour in an image is the shape's.
_BACKGROUND_MIN_DISTANCE = 110.0
_NOISE_AMPLITUDE = 20  # grey-level noise of the "noisy" background, +- this many levels
_HEAVY_NOISE = 70  # per-channel noise of the "heavy_noise" shift, +- this many levels
_OUTLINE_WIDTH = 2  # pixels of contour kept by "outline" and "sketch" (at any image size >= 16)
_SHIFT_NOISE_STREAM = 1 << 40  # first random stream of the shift noise: far above any other


# --- Shape masks. Each takes coordinates (u, v) in units of the shape radius, v pointing up,
# and returns a boolean mask of the same shape. All fit roughly inside the unit disc.


def _circle_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)


def _triangle_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral, pointing up, vertices on a circle of radius 1.15 (to match other areas).
    return (v >= -0.575) & (v <= 1.15 - math.sqrt(3.0) * np.abs(u))


# A five-pointed star is the union of five kites (centre, inner vertex, tip, inner vertex).
_STAR_INNER_RADIUS = 0.45
_STAR_ARM_DIRECTIONS = tuple(
    (math.cos(2.0 * math.pi * arm / 5.0), math.sin(2.0 * math.pi * arm / 5.0)) for arm in range(5)
)
# Inner vertex to the right of the arm pointing up: 36 degrees off the tip direction.
_STAR_INNER_X = _STAR_INNER_RADIUS * math.sin(math.pi / 5.0)
_STAR_INNER_Y = _STAR_INNER_RADIUS * math.cos(math.pi / 5.0)


def _star_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Only + - * and comparisons: bit-identical whatever the array's length or the CPU's SIMD.
    inside = np.zeros(u.shape, dtype=bool)
    for cosine, sine in _STAR_ARM_DIRECTIONS:
        # Rotate so this arm points up: `across` is |x| and `along` is y in the arm's frame.
        across = np.abs(cosine * u - sine * v)
        along = sine * u + cosine * v
        within_wedge = across * _STAR_INNER_Y <= along * _STAR_INNER_X
        below_edges = across * (_STAR_INNER_Y - 1.0) - (along - 1.0) * _STAR_INNER_X >= 0.0
        inside |= within_wedge & below_edges
    return inside


def _cross_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    absolute_u, absolute_v = np.abs(u), np.abs(v)
    return ((absolute_u <= 0.3) & (absolute_v <= 0.95)) | ((absolute_u <= 0.95) & (absolute_v <= 0.3))


def _ring_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    squared_radius = u * u + v * v
    return (squared_radius <= 1.0) & (squared_radius >= 0.5**2)


def _diamond_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Narrower than tall so it never looks like a rotated square.
    return np.abs(u) / 0.72 + np.abs(v) <= 1.0


def _heart_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # The classic implicit heart curve (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled and shifted
    # so it sits centred in the unit disc.
    x = u * 1.25
    y = v * 1.25 + 0.15
    squared = x * x + y * y - 1.0
    return squared * squared * squared - x * x * y * y * y <= 0.0


def _hexagon_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    absolute_u, absolute_v = np.abs(u), np.abs(v)
    half_height = math.sqrt(3.0) / 2.0
    slanted_edges = half_height * absolute_u + 0.5 * absolute_v <= half_height
    return (absolute_v <= half_height) & slanted_edges


def _crescent_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    outer = u * u + v * v <= 1.0
    bite = (u - 0.45) ** 2 + (v - 0.15) ** 2 <= 0.8**2
    return outer & ~bite


SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle_mask,
    "square": _square_mask,
    "triangle": _triangle_mask,
    "star": _star_mask,
    "cross": _cross_mask,
    "ring": _ring_mask,
    "diamond": _diamond_mask,
    "heart": _heart_mask,
    "hexagon": _hexagon_mask,
    "crescent": _crescent_mask,
}
# Largest distance from the centre of any shape above, in radii, whatever its rotation:
# shape centres are placed so that this much room stays inside the image.
SHAPE_EXTENT = 1.2


def background_palette(shape_colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Muted colours at least _BACKGROUND_MIN_DISTANCE from every shape colour; (N, 3) float32."""
    tint_directions = np.array(
        [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)],
        dtype=np.float32,
    )
    candidates = []
    for grey in range(60, 200, 8):
        for tint in tint_directions:
            candidates.append(grey + 28.0 * (tint - tint.mean()))
    # Whole numbers, so drawing a plain background needs no rounding.
    candidates_array = np.round(np.asarray(candidates, dtype=np.float32))  # (N, 3)
    colors = np.asarray(shape_colors, dtype=np.float32)  # (C, 3)
    distances = np.linalg.norm(candidates_array[:, None, :] - colors[None, :, :], axis=-1)
    kept = candidates_array[distances.min(axis=1) >= _BACKGROUND_MIN_DISTANCE]
    if len(kept) < 4:
        raise ValueError(f"colours {shape_colors} leave too few distinct background colours ({len(kept)})")
    return kept


# --- Counter-based randomness: a value is a hash of (seed, split, index, stream), so any
# example can be drawn alone or in any batch with the same result.

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment
_INDEX_MULTIPLIER = np.uint64(0xD1B54A32D192ED03)  # odd, so index -> key stays one-to-one
NUM_UNIFORMS = 19  # per-example random numbers; see SyntheticShapes._parameters
_PIXELS_PER_CHUNK = 1 << 20  # bounds the temporaries of one vectorised drawing pass


def example_keys(seed: int, split_id: int, indices: np.ndarray) -> np.ndarray:
    """One uint64 key per example, (n,); distinct indices give distinct keys."""
    seed_key = mix64(np.array([seed], dtype=np.uint64))
    split_key = mix64(seed_key + np.array([split_id + 1], dtype=np.uint64) * _GOLDEN_GAMMA)
    return mix64(split_key ^ (indices.astype(np.uint64) * _INDEX_MULTIPLIER))


def random_words(keys: np.ndarray, first_stream: int, count: int) -> np.ndarray:
    """Streams first_stream .. first_stream+count-1 of each key: uint64 (n, count)."""
    streams = np.arange(first_stream + 1, first_stream + count + 1, dtype=np.uint64)
    return mix64(keys[:, None] + streams[None, :] * _GOLDEN_GAMMA)


def uniform_floats(keys: np.ndarray, count: int) -> np.ndarray:
    """Uniform floats in [0, 1), float64 (n, count): the top 53 bits of each random word."""
    return (random_words(keys, 0, count) >> np.uint64(11)).astype(np.float64) * 2.0**-53


class ShapeRenderer:
    """Draws examples from their random choices (the arrays `SyntheticShapes._parameters` makes,
    with a leading example axis) at one image size, for the dataset's shape names (a "shape_index"
    indexes them)."""

    def __init__(self, image_size: int, shape_names: Sequence[str]) -> None:
        self.image_size = image_size
        self.shape_names = tuple(shape_names)
        # Pixel-centre coordinates shared by every example: (size, size) each.
        self._pixel_y, self._pixel_x = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5

    def render(self, parameters: dict[str, np.ndarray], shift: str | None = None) -> np.ndarray:
        """The images of `parameters`: uint8 (n, H, W, 3), rendered as `shift` says (None: as
        training shows them), drawn in passes of bounded memory."""
        size = self.image_size
        images = np.empty((len(parameters["label"]), size, size, 3), dtype=np.uint8)
        chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
        for start in range(0, len(images), chunk):
            rows = slice(start, start + chunk)
            self._draw({name: values[rows] for name, values in parameters.items()}, images[rows], shift)
        return images

    def _draw(self, parameters: dict[str, np.ndarray], images: np.ndarray, shift: str | None = None) -> None:
        """Draws the examples of `parameters` into `images` (n, H, W, 3) uint8, in place, rendered
        as `shift` says (None: as training shows them).

        Works on whole-batch arrays: each background kind only fills a per-pixel mixing
        weight and each shape only a mask, so the colour arithmetic runs once, contiguously.
        """
        if shift == "dotted":  # every example on the background kind training never draws
            weight = self._dotted_weights(parameters)
            parameters = {**parameters, "background_index": np.full_like(parameters["background_index"], -1)}
        else:
            weight = self._background_weights(parameters)  # (n, H, W), 0 = first colour
        masks = self._shape_masks(parameters)  # (n, H, W)
        if shift in ("outline", "sketch"):
            masks = _contour(masks, _OUTLINE_WIDTH)
        noisy_rows = np.flatnonzero(parameters["background_index"] == BACKGROUND_KINDS.index("noisy"))
        noise = self._grey_noise(parameters["key"][noisy_rows])  # (m, H, W)
        # One colour channel at a time: numpy's inner loops then run along image rows,
        # where a trailing axis of 3 would make them three elements long (several times slower).
        for channel in range(3):
            first = parameters["first_background_color"][:, channel, None, None]  # (n, 1, 1)
            second = parameters["second_background_color"][:, channel, None, None]
            canvas = first + (second - first) * weight  # (n, H, W) float32
            if noisy_rows.size:
                canvas[noisy_rows] = np.clip(canvas[noisy_rows] + noise, 0.0, 255.0)
            images[..., channel] = canvas  # truncates to uint8
            shape_color = parameters["shape_color"][:, channel, None, None]  # (n, 1, 1)
            np.copyto(images[..., channel], shape_color, where=masks)
        if shift is not None:
            self._shift_pixels(parameters, images, masks, shift)

    def _shift_pixels(
        self, parameters: dict[str, np.ndarray], images: np.ndarray, masks: np.ndarray, shift: str
    ) -> None:
        """The shifts that act on the drawn pixels, in place (outline and dotted act while drawing)."""
        if shift in ("grayscale", "sketch"):
            # ITU-R 601 luma, the grey a photo editor makes.
            luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            images[...] = np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
        if shift == "sketch":  # a dark pencil contour on white paper
            images[...] = 245
            images[masks] = 25
        elif shift == "inverted":
            np.subtract(255, images, out=images)
        elif shift == "heavy_noise":
            size = self.image_size
            words = random_words(parameters["key"], _SHIFT_NOISE_STREAM, size * size * 3)
            levels = (words >> np.uint64(32)) % np.uint64(2 * _HEAVY_NOISE + 1)
            noise = (levels.astype(np.float32) - _HEAVY_NOISE).reshape(images.shape)
            images[...] = np.clip(images.astype(np.float32) + noise, 0.0, 255.0).astype(np.uint8)

    def _dotted_weights(self, parameters: dict[str, np.ndarray]) -> np.ndarray:
        """Polka dots on a hexagonal-ish grid (a background kind no split draws): float32 (n, H, W),
        1 inside a dot. The dot spacing comes from the example's period fraction."""
        size = self.image_size
        spacing = np.maximum(4.0, np.floor(size * parameters["period_fraction"])).astype(np.float32)[:, None, None]
        row = np.floor(self._pixel_y / spacing)
        across = (self._pixel_x / spacing + 0.5 * (row % 2.0)) % 1.0 - 0.5
        down = (self._pixel_y / spacing) % 1.0 - 0.5
        return (across * across + down * down <= 0.3**2).astype(np.float32)

    def _background_weights(self, parameters: dict[str, np.ndarray]) -> np.ndarray:
        """How far each pixel is from the first towards the second background colour:
        float32 (n, H, W) in [0, 1]."""
        size = self.image_size
        weight = np.zeros((len(parameters["label"]), size, size), dtype=np.float32)
        for kind_index, kind in enumerate(BACKGROUND_KINDS):
            rows = np.flatnonzero(parameters["background_index"] == kind_index)
            if rows.size == 0 or kind in ("plain", "noisy"):
                continue  # one colour only: weight stays 0
            if kind == "checkered":
                cell = np.maximum(2.0, np.floor(size * parameters["period_fraction"][rows])).astype(np.float32)[
                    :, None, None
                ]  # pixels, (m, 1, 1)
                parity = np.floor(self._pixel_x / cell) + np.floor(self._pixel_y / cell)
                weight[rows] = parity % 2.0
                continue
            cosine = parameters["background_cosine"][rows].astype(np.float32)[:, None, None]
            sine = parameters["background_sine"][rows].astype(np.float32)[:, None, None]
            along = self._pixel_x * cosine + self._pixel_y * sine  # pixels, (m, H, W)
            if kind == "gradient":
                lowest = along.min(axis=(1, 2), keepdims=True)
                highest = along.max(axis=(1, 2), keepdims=True)
                weight[rows] = (along - lowest) / (highest - lowest)
            elif kind == "striped":
                half_period = (size * parameters["period_fraction"][rows] / 2.0).astype(np.float32)[:, None, None]
                weight[rows] = np.floor(along / half_period) % 2.0
            else:
                raise AssertionError(f"unhandled background kind {kind!r}")
        return weight

    def _grey_noise(self, keys: np.ndarray) -> np.ndarray:
        """Per-pixel grey noise in [-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE]: float32 (m, H, W)."""
        size = self.image_size
        words = random_words(keys, NUM_UNIFORMS, size * size)  # (m, H * W)
        levels = (words >> np.uint64(32)) % np.uint64(2 * _NOISE_AMPLITUDE + 1)
        noise = levels.astype(np.float32) - _NOISE_AMPLITUDE
        return noise.reshape(len(keys), size, size)

    def _shape_masks(self, parameters: dict[str, np.ndarray]) -> np.ndarray:
        """Which pixels each example's shape covers: bool (n, H, W)."""
        size = self.image_size
        masks = np.zeros((len(parameters["label"]), size, size), dtype=bool)
        # All examples of one shape go through one vectorised pass over whole images.
        for shape_index, shape in enumerate(self.shape_names):
            rows = np.flatnonzero(parameters["shape_index"] == shape_index)
            if rows.size == 0:
                continue

            def per_example(name: str, rows: np.ndarray = rows) -> np.ndarray:
                return parameters[name][rows].astype(np.float32)[:, None, None]  # (m, 1, 1)

            radius = per_example("radius")
            offset_x = (self._pixel_x - per_example("center_x")) / radius  # (m, H, W)
            offset_y = (per_example("center_y") - self._pixel_y) / radius  # rows grow down
            cosine, sine = per_example("rotation_cosine"), per_example("rotation_sine")
            u = cosine * offset_x + sine * offset_y
            v = cosine * offset_y - sine * offset_x
            masks[rows] = SHAPE_MASKS[shape](u, v)
        return masks


def _contour(masks: np.ndarray, width: int) -> np.ndarray:
    """The pixels of `masks` (n, H, W) within `width` pixels (4-neighbour steps) of their outside."""
    interior = masks.copy()
    for _ in range(width):
        padded = np.pad(interior, ((0, 0), (1, 1), (1, 1)), constant_values=False)
        interior = interior & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    return masks & ~interior
