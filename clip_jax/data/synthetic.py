"""Built-in default dataset: procedurally drawn coloured shapes with matching captions.

Example `i` of a split is a pure function of (seed, split, i), so a data position is one
integer and resuming is exact. Some colour x shape combinations never appear in training;
the "held_out" split holds only those, to measure compositional zero-shot transfer. Captions
are sentences whose opening frame ("a photo of", "a drawing of", ...) names the image's style
(its background kind), so zero-shot prompts behave as in the CLIP paper: the class name alone
is out of distribution, and an ensemble of frames covers styles a single prompt does not.
Randomness comes from a counter-based hash of (seed, split, index), and images are drawn
for a whole batch at once with numpy.

Training reads it like any other corpus: `SyntheticSource` is an ExampleSource whose examples
are ready-sized (drawn at the model's image size), which clip_jax.data.iterator turns into
batches and resumes from its state as it does TFDS and WebDataset shards.

Downstream tasks and shifted test sets (the CLIP paper's §4 at laptop scale): `DOWNSTREAM_TASKS`
names classification tasks over one attribute of the drawn examples (shape, colour, held-out
colour x shape combination, style, size, position), each with class names and zero-shot
templates, and `SHIFTS` names renderings the training data never shows (outline-only shapes, a
grey "sketch", heavy noise, inverted colours, a new background kind), as ImageNet-R and -Sketch
shift ImageNet. `SyntheticShapes.task_batch(task, indices, shift)` draws them: the same examples
as the task's split (same labels), only rendered differently; no existing split changes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from clip_jax.data.config import DataSettings
from clip_jax.data.sources import RawExample, global_batches_started, mix64, process_stream_index

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
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium", "medium-sized"),
    "large": ("large", "big"),
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
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle"),
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "top left": ("in the top left", "in the upper left corner"),
    "top right": ("in the top right", "in the upper right corner"),
    "bottom left": ("in the bottom left", "in the lower left corner"),
    "bottom right": ("in the bottom right", "in the lower right corner"),
}

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noisy", "striped", "checkered")

# How each background kind is "taken": the image's style, which a caption names with its opening
# frame, as a web caption says "a photo of", "a drawing of" or "a rendering of". A frame is a
# statement about the whole image, so a prompt with one frame describes one style best and an
# ensemble of frames describes all of them (the CLIP paper's reason to ensemble prompts).
STYLE_FRAMES: dict[str, tuple[str, ...]] = {
    "plain": ("a photo of", "a snapshot of", "a close-up of"),
    "noisy": ("a grainy photo of", "a grainy picture of", "a dark photo of"),
    "gradient": ("a rendering of", "a render of", "a 3d model of"),
    "striped": ("a drawing of", "a sketch of", "a doodle of"),
    "checkered": ("a painting of", "an illustration of", "an artwork of"),
}

# Training captions: "{frame}" is one of the example's style frames, and the rest describes the
# object. Every caption is a sentence around the object, never its bare class name, as web alt
# text rarely is a single noun phrase; colour and shape words are always the exact class-name
# words so that zero-shot prompts use the vocabulary the text tower learned.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{frame} a {color} {shape}",
    "{frame} the {color} {shape}",
    "{frame} a {size} {color} {shape}",
    "{frame} a {color} {shape} {position}",
    "{frame} a {size} {color} {shape} {position}",
    "{frame} a {shape} coloured {color}",
    "{frame} a {size} {shape} in {color}",
    "{frame} a {color} {shape} on a {background} background",
    "{frame} a {shape}. it is {color}.",
    "{frame} a {color} {shape}, {size}, {position}",
    "{frame} one {color} {shape}",
)

# Prompts for zero-shot classification; "{}" takes a class name such as "red circle". One per
# caption frame, so that the ensemble covers every style: each style's first frame, then each
# one's second, ...; the first, "a photo of the {}.", is the "single" prompt (the paper's).
# They use "the" so no article has to agree with the colour word.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = tuple(
    f"{frame} the {{}}." for frames in zip(*STYLE_FRAMES.values()) for frame in frames
)

SPLITS: dict[str, int] = {"train": 0, "validation": 1, "held_out": 2}

# --- Downstream tasks. Each classifies one attribute of an example; its zero-shot templates put
# the class name where captions put that attribute, and ensemble over the other attributes (every
# colour and shape), so that a prompt is always a sentence of the captions' kind.
_STYLE_NAMES: dict[str, str] = {  # a style's class name: its first frame's noun ("a photo of")
    kind: frames[0][len("a ") : -len(" of")] for kind, frames in STYLE_FRAMES.items()
}
_FIRST_FRAMES: tuple[str, ...] = tuple(frames[0] for frames in STYLE_FRAMES.values())


@dataclasses.dataclass(frozen=True)
class DownstreamTask:
    """A classification task over the built-in examples: which attribute is the label, on which
    split, its class names (in label order) and zero-shot templates (one "{}" each)."""

    name: str
    attribute: str  # "shape", "color", "combination", "background", "size" or "position"
    split: str  # test and probe-training images are examples of this split
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    single_template: str


def _task_templates(attribute: str, colors: Sequence[str], shapes: Sequence[str]) -> tuple[str, ...]:
    """Templates of a task: the class name in its attribute's place, every other choice spread."""
    if attribute == "combination":
        return ZERO_SHOT_TEMPLATES
    frames = ZERO_SHOT_TEMPLATES_FRAMES
    if attribute == "shape":
        return tuple(f"{frame} the {color} {{}}." for color in colors for frame in frames)
    if attribute == "color":
        return tuple(f"{frame} the {{}} {shape}." for shape in shapes for frame in frames)
    objects = [f"{color} {shape}" for color in colors for shape in shapes]
    if attribute == "background":
        return tuple(f"a {{}} of the {thing}." for thing in objects)
    if attribute == "size":
        return tuple(f"{frame} a {{}} {thing}." for thing in objects for frame in _FIRST_FRAMES)
    if attribute == "position":
        return tuple(f"{frame} a {thing} {{}}." for thing in objects for frame in _FIRST_FRAMES)
    raise ValueError(f"unknown task attribute {attribute!r}")


# Frames in the order ZERO_SHOT_TEMPLATES uses them (each style's first, then each one's second, ...).
ZERO_SHOT_TEMPLATES_FRAMES: tuple[str, ...] = tuple(frame for frames in zip(*STYLE_FRAMES.values()) for frame in frames)
# Task name -> (attribute, split). "combination" is the default run's compositional task.
DOWNSTREAM_TASKS: dict[str, tuple[str, str]] = {
    "shape": ("shape", "validation"),
    "color": ("color", "validation"),
    "combination": ("combination", "held_out"),
    "style": ("background", "validation"),
    "size": ("size", "validation"),
    "position": ("position", "validation"),
}

# --- Shifted renderings: name -> the attributes the shift leaves recognisable. A shifted set of a
# task exists only where the task's attribute survives (grey images have no colour to classify).
_ALL_ATTRIBUTES = frozenset({"shape", "color", "combination", "background", "size", "position"})
SHIFTS: dict[str, frozenset[str]] = {
    "outline": _ALL_ATTRIBUTES,  # only a 2-pixel contour of the shape, in its colour
    "grayscale": _ALL_ATTRIBUTES - {"color", "combination"},
    "sketch": frozenset({"shape", "size", "position"}),  # a dark contour on white paper
    "heavy_noise": _ALL_ATTRIBUTES - {"background"},  # per-channel noise, +- _HEAVY_NOISE levels
    "inverted": _ALL_ATTRIBUTES - {"color", "combination"},  # 255 - every channel
    "dotted": _ALL_ATTRIBUTES - {"background"},  # a background kind training never draws
}
_HEAVY_NOISE = 70
_OUTLINE_WIDTH = 2  # pixels of contour kept by "outline" and "sketch" (at any image size >= 16)
_SHIFT_NOISE_STREAM = 1 << 40  # first random stream of the shift noise: far above any other

_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")

# Background colours: muted (low-saturation) mid tones, far from every named colour so the
# only named colour in an image is the shape's.
_BACKGROUND_MIN_DISTANCE = 110.0
_NOISE_AMPLITUDE = 20  # grey-level noise of the "noisy" background, +- this many levels
_COLOR_JITTER = 12  # per-channel jitter of the shape colour, +- this many levels


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
_SHAPE_EXTENT = 1.2


@dataclasses.dataclass(frozen=True)
class SyntheticShapesConfig:
    """What the synthetic dataset draws; every field is validated on construction."""

    image_size: int = 64
    seed: int = 0
    colors: tuple[str, ...] = DEFAULT_COLORS
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    # Colour x shape combinations kept out of "train" and "validation"; the default holds
    # out two shapes per colour (and two colours per shape), so that naming a held-out
    # combination takes both its colour and its shape.
    num_held_out: int = 16
    # Random rotation of each shape, +- this many degrees. Small, so that a square never
    # turns into a diamond.
    max_rotation_degrees: float = 15.0

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        for color in self.colors:
            if color not in COLOR_PALETTE:
                raise ValueError(f"unknown colour {color!r}; known: {sorted(COLOR_PALETTE)}")
        for shape in self.shapes:
            if shape not in SHAPE_MASKS:
                raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPE_MASKS)}")
        if len(set(self.colors)) != len(self.colors) or len(self.colors) < 2:
            raise ValueError(f"colors must be at least 2 distinct names, got {self.colors}")
        if len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 2:
            raise ValueError(f"shapes must be at least 2 distinct names, got {self.shapes}")
        if not 0 <= self.num_held_out <= len(self.colors) * len(self.shapes):
            raise ValueError(f"num_held_out out of range: {self.num_held_out}")
        if not 0.0 <= self.max_rotation_degrees <= 45.0:
            raise ValueError(f"max_rotation_degrees must be in [0, 45], got {self.max_rotation_degrees}")


@dataclasses.dataclass(frozen=True)
class ExampleDescription:
    """Everything drawn for one example before rendering; the caption is built from it."""

    label: int
    color: str
    shape: str
    size: str
    position: str
    background: str
    caption: str


def process_batch_indices(step: int, global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Example indices this process loads at `step`: its contiguous slice of the global batch.

    The global batch of step s is examples [s * B, (s + 1) * B); process p takes rows
    [p * B / P, (p + 1) * B / P) of it.
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count <= 0:
        raise ValueError(f"process_count must be positive, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size % process_count != 0:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    local_batch_size = global_batch_size // process_count
    start = step * global_batch_size + process_index * local_batch_size
    return np.arange(start, start + local_batch_size, dtype=np.int64)


def _choose_held_out_combinations(
    num_colors: int, num_shapes: int, num_held_out: int, seed: int
) -> list[tuple[int, int]]:
    """Picks (colour, shape) index pairs to hold out, spread evenly over colours and shapes.

    Walks "diagonals" of a randomly permuted colour x shape grid: the k-th pick is colour
    k mod C paired with shape (k mod C + k div C) mod S, so consecutive picks change both
    colour and shape and no colour or shape loses more partners than needed.
    """
    rng = np.random.default_rng([seed, 0x5EED, 0xC0FFEE])
    color_order = rng.permutation(num_colors)
    shape_order = rng.permutation(num_shapes)
    combinations = []
    for k in range(num_held_out):
        color_slot = k % num_colors
        shape_slot = (color_slot + k // num_colors) % num_shapes
        combinations.append((int(color_order[color_slot]), int(shape_order[shape_slot])))
    if len(set(combinations)) != len(combinations):
        raise ValueError(
            f"cannot hold out {num_held_out} distinct combinations of {num_colors} colours and {num_shapes} shapes"
        )
    held_out = set(combinations)
    for color_index in range(num_colors):
        if all((color_index, s) in held_out for s in range(num_shapes)):
            raise ValueError(f"num_held_out={num_held_out} leaves a colour with no training shape")
    for shape_index in range(num_shapes):
        if all((c, shape_index) in held_out for c in range(num_colors)):
            raise ValueError(f"num_held_out={num_held_out} leaves a shape with no training colour")
    return sorted(combinations)


def _background_palette(shape_colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
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
_NUM_UNIFORMS = 19  # per-example random numbers; see SyntheticShapes._parameters
_PIXELS_PER_CHUNK = 1 << 20  # bounds the temporaries of one vectorised drawing pass


def _example_keys(seed: int, split_id: int, indices: np.ndarray) -> np.ndarray:
    """One uint64 key per example, (n,); distinct indices give distinct keys."""
    seed_key = mix64(np.array([seed], dtype=np.uint64))
    split_key = mix64(seed_key + np.array([split_id + 1], dtype=np.uint64) * _GOLDEN_GAMMA)
    return mix64(split_key ^ (indices.astype(np.uint64) * _INDEX_MULTIPLIER))


def _random_words(keys: np.ndarray, first_stream: int, count: int) -> np.ndarray:
    """Streams first_stream .. first_stream+count-1 of each key: uint64 (n, count)."""
    streams = np.arange(first_stream + 1, first_stream + count + 1, dtype=np.uint64)
    return mix64(keys[:, None] + streams[None, :] * _GOLDEN_GAMMA)


def _uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """Uniform floats in [0, 1), float64 (n, count): the top 53 bits of each random word."""
    return (_random_words(keys, 0, count) >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SyntheticShapes:
    """Random-access source of (image, caption, label) examples of coloured shapes.

    Splits: "train" (combinations not held out), "validation" (the same combinations, a
    separate stream of examples) and "held_out" (only the held-out combinations). Labels
    index `all_class_names`, which lists every colour x shape combination.
    """

    def __init__(self, config: SyntheticShapesConfig = SyntheticShapesConfig()) -> None:
        self.config = config
        self.color_names: tuple[str, ...] = tuple(config.colors)
        self.shape_names: tuple[str, ...] = tuple(config.shapes)
        self.all_class_names: tuple[str, ...] = tuple(
            f"{color} {shape}" for color in self.color_names for shape in self.shape_names
        )
        held_out_pairs = _choose_held_out_combinations(
            len(self.color_names), len(self.shape_names), config.num_held_out, config.seed
        )
        self.held_out_labels = np.array(
            [self.label_of(color, shape) for color, shape in held_out_pairs], dtype=np.int32
        )
        held_out_set = set(self.held_out_labels.tolist())
        self.train_labels = np.array(
            [label for label in range(len(self.all_class_names)) if label not in held_out_set],
            dtype=np.int32,
        )
        self.held_out_class_names: tuple[str, ...] = tuple(
            self.all_class_names[label] for label in self.held_out_labels
        )
        self.zero_shot_templates: tuple[str, ...] = ZERO_SHOT_TEMPLATES
        self._labels_by_split = {
            "train": self.train_labels,
            "validation": self.train_labels,
            "held_out": self.held_out_labels,
        }
        self._color_values = np.array(
            [COLOR_PALETTE[name] for name in self.color_names], dtype=np.int16
        )  # (colours, 3)
        self._background_colors = _background_palette(
            [COLOR_PALETTE[name] for name in self.color_names]
        )  # (N, 3) float32, whole numbers
        size = config.image_size
        # Pixel-centre coordinates shared by every example: (size, size) each.
        self._pixel_y, self._pixel_x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        self._size_ranges = np.array(list(SIZE_RANGES.values()), dtype=np.float64)  # (3, 2)
        self._position_offsets = np.array(list(POSITIONS.values()), dtype=np.float64)  # (9, 2)

    # --- class bookkeeping

    @property
    def class_names(self) -> tuple[str, ...]:
        """Every colour x shape name, e.g. "red circle"; labels index this tuple."""
        return self.all_class_names

    def label_of(self, color_index: int, shape_index: int) -> int:
        """The label (index into all_class_names) of a colour and shape, given by index."""
        return color_index * len(self.shape_names) + shape_index

    def color_and_shape_of(self, label: int) -> tuple[str, str]:
        """The colour and shape names of a label (an index into all_class_names)."""
        color_index, shape_index = divmod(int(label), len(self.shape_names))
        return self.color_names[color_index], self.shape_names[shape_index]

    # --- single examples

    def describe(self, split: str, index: int) -> ExampleDescription:
        """What example `index` of `split` shows, and its caption, without drawing it."""
        parameters = self._parameters(split, self._checked_indices(split, [index]))
        return self._descriptions(parameters)[0]

    def example(self, split: str, index: int) -> tuple[np.ndarray, str, int]:
        """(image uint8 (H, W, 3), caption, label) of example `index` of `split`."""
        batch = self.get_batch(split, [index])
        return batch["images"][0], batch["captions"][0], int(batch["labels"][0])

    def train_example(self, index: int) -> tuple[np.ndarray, str, int]:
        return self.example("train", index)

    def validation_example(self, index: int) -> tuple[np.ndarray, str, int]:
        return self.example("validation", index)

    def held_out_example(self, index: int) -> tuple[np.ndarray, str, int]:
        return self.example("held_out", index)

    # --- batches

    def get_batch(self, split: str, indices: Sequence[int] | np.ndarray, shift: str | None = None) -> dict:
        """Examples `indices` of `split`: dict(images uint8 (n, H, W, 3), captions list[str],
        labels int32 (n,)). `shift` (a `SHIFTS` name) draws the same examples rendered that way."""
        if shift is not None and shift not in SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; expected one of {sorted(SHIFTS)}")
        indices = self._checked_indices(split, indices)
        parameters = self._parameters(split, indices)
        size = self.config.image_size
        images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
        chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
        for start in range(0, len(indices), chunk):
            rows = slice(start, start + chunk)
            self._draw({name: values[rows] for name, values in parameters.items()}, images[rows], shift)
        return {
            "images": images,
            "captions": [description.caption for description in self._descriptions(parameters)],
            "labels": parameters["label"].astype(np.int32),
        }

    # --- downstream tasks and shifted sets

    def downstream_task(self, name: str) -> DownstreamTask:
        """The task called `name` (a `DOWNSTREAM_TASKS` key) of this dataset's colours and shapes."""
        if name not in DOWNSTREAM_TASKS:
            raise ValueError(f"unknown task {name!r}; expected one of {sorted(DOWNSTREAM_TASKS)}")
        attribute, split = DOWNSTREAM_TASKS[name]
        class_names = {
            "shape": self.shape_names,
            "color": self.color_names,
            "combination": self.held_out_class_names,
            "background": tuple(_STYLE_NAMES[kind] for kind in BACKGROUND_KINDS),
            "size": tuple(words[0] for words in SIZE_WORDS.values()),
            "position": tuple(phrases[0] for phrases in POSITION_PHRASES.values()),
        }[attribute]
        templates = _task_templates(attribute, self.color_names, self.shape_names)
        return DownstreamTask(name, attribute, split, tuple(class_names), templates, templates[0])

    def task_shifts(self, name: str) -> tuple[str, ...]:
        """The shifted sets task `name` has: the `SHIFTS` that keep its attribute recognisable."""
        attribute = self.downstream_task(name).attribute
        return tuple(shift for shift, kept in SHIFTS.items() if attribute in kept)

    def task_batch(self, name: str, indices: Sequence[int] | np.ndarray, shift: str | None = None) -> dict:
        """Examples `indices` of task `name`'s split as dict(images uint8 (n, H, W, 3), labels int32
        (n,) indexing the task's class names); `shift` renders the same examples shifted."""
        task = self.downstream_task(name)
        if shift is not None and shift not in self.task_shifts(name):
            raise ValueError(
                f"shift {shift!r} removes what task {name!r} classifies; its shifts: {self.task_shifts(name)}"
            )
        batch = self.get_batch(task.split, indices, shift)
        parameters = self._parameters(task.split, self._checked_indices(task.split, indices))
        if task.attribute == "combination":
            positions = {int(label): row for row, label in enumerate(self.held_out_labels)}
            labels = np.array([positions[int(label)] for label in parameters["label"]], dtype=np.int64)
        else:
            column = {"shape": "shape_index", "color": "color_index", "background": "background_index"}
            labels = parameters[column.get(task.attribute, f"{task.attribute}_index")]
        return {"images": batch["images"], "labels": np.asarray(labels, np.int32)}

    def batch_iterator(
        self,
        split: str,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        start_step: int = 0,
    ) -> SyntheticBatchIterator:
        """Endless iterator over this process's share of each global batch, from `start_step`."""
        return SyntheticBatchIterator(self, split, global_batch_size, process_index, process_count, start_step)

    def all_captions_sample(self, count: int) -> list[str]:
        """Captions of train examples 0 .. count-1 (no images drawn), e.g. to fit a tokenizer."""
        if count < 0:
            raise ValueError(f"count must be non-negative, got {count}")
        return self.captions("train", np.arange(count, dtype=np.int64))

    def captions(self, split: str, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Captions of examples `indices` of `split`, without drawing their images."""
        parameters = self._parameters(split, self._checked_indices(split, indices))
        return [description.caption for description in self._descriptions(parameters)]

    # --- generation

    def _checked_indices(self, split: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        if len(self._labels_by_split[split]) == 0:
            raise ValueError(f"split {split!r} is empty with num_held_out={self.config.num_held_out}")
        array = np.asarray(indices)
        if array.size == 0:
            return np.zeros((0,), dtype=np.int64)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"indices must be a 1-D array of integers, got {indices!r}")
        if array.min() < 0:
            raise ValueError(f"example indices must be non-negative, got {array.min()}")
        return array.astype(np.int64)

    def _parameters(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Every random choice of each example, as arrays with a leading example axis."""
        keys = _example_keys(self.config.seed, SPLITS[split], indices)
        uniforms = _uniforms(keys, _NUM_UNIFORMS)  # (n, _NUM_UNIFORMS)

        def choice(column: int, count: int) -> np.ndarray:
            return np.minimum((uniforms[:, column] * count).astype(np.int64), count - 1)

        split_labels = self._labels_by_split[split]
        label = split_labels[choice(0, len(split_labels))].astype(np.int64)
        color_index, shape_index = np.divmod(label, len(self.shape_names))
        size_index = choice(1, len(SIZE_RANGES))
        position_index = choice(2, len(POSITIONS))
        num_backgrounds = len(self._background_colors)
        first_background = choice(7, num_backgrounds)
        # Offset by 1 .. N-1 places so a two-colour background never repeats its colour.
        second_background = (first_background + 1 + choice(8, num_backgrounds - 1)) % num_backgrounds

        background_angle = uniforms[:, 9] * 2.0 * math.pi
        jitter = np.stack(
            [choice(column, 2 * _COLOR_JITTER + 1) - _COLOR_JITTER for column in (15, 16, 17)],
            axis=1,
        )  # (n, 3)
        shape_color = np.clip(self._color_values[color_index] + jitter, 0, 255)
        return {
            "key": keys,
            "label": label,
            "color_index": color_index,
            "shape_index": shape_index,
            "size_index": size_index,
            "position_index": position_index,
            "background_index": choice(3, len(BACKGROUND_KINDS)),
            "template_index": choice(4, len(CAPTION_TEMPLATES)),
            "frame_uniform": uniforms[:, 18],
            "size_word_uniform": uniforms[:, 5],
            "position_phrase_uniform": uniforms[:, 6],
            "first_background_color": self._background_colors[first_background],  # (n, 3)
            "second_background_color": self._background_colors[second_background],  # (n, 3)
            # Python's math for sines and cosines: the same bits whatever the batch holds,
            # where numpy's vectorised kernels may round the last bit by array length.
            "background_cosine": np.array([math.cos(a) for a in background_angle]),
            "background_sine": np.array([math.sin(a) for a in background_angle]),
            "period_fraction": 0.08 + 0.08 * uniforms[:, 10],  # of the image side
            **self._placement(size_index, position_index, uniforms),
            "shape_color": shape_color.astype(np.uint8),  # (n, 3)
        }

    def _placement(self, size_index: np.ndarray, position_index: np.ndarray, uniforms: np.ndarray) -> dict:
        """Each shape's radius, centre (pixels) and rotation, from its size and position names and
        its uniforms; arrays of shape (n,)."""
        size = self.config.image_size
        low, high = self._size_ranges[size_index, 0], self._size_ranges[size_index, 1]
        radius = size * (low + (high - low) * uniforms[:, 11])  # pixels, (n,)
        reach = radius * _SHAPE_EXTENT
        margin = 0.04 * size
        # Room between the image centre and the farthest centre that keeps the shape inside.
        free = np.maximum(0.0, size / 2.0 - reach - margin)
        horizontal = self._position_offsets[position_index, 0]
        vertical = self._position_offsets[position_index, 1]
        rotation_degrees = (uniforms[:, 14] * 2.0 - 1.0) * self.config.max_rotation_degrees
        rotation = rotation_degrees * (math.pi / 180.0)
        return {
            "radius": radius,
            "center_x": size / 2.0 + horizontal * free + (uniforms[:, 12] - 0.5) * 0.4 * free,
            "center_y": size / 2.0 + vertical * free + (uniforms[:, 13] - 0.5) * 0.4 * free,
            # Python's math, as for the background angle above.
            "rotation_cosine": np.array([math.cos(a) for a in rotation]),
            "rotation_sine": np.array([math.sin(a) for a in rotation]),
        }

    def _descriptions(self, parameters: dict[str, np.ndarray]) -> list[ExampleDescription]:
        size_names = tuple(SIZE_RANGES)
        position_names = tuple(POSITIONS)
        descriptions = []
        for row in range(len(parameters["label"])):
            color, shape = self.color_and_shape_of(parameters["label"][row])
            size = size_names[parameters["size_index"][row]]
            position = position_names[parameters["position_index"][row]]
            background = BACKGROUND_KINDS[parameters["background_index"][row]]
            size_words = SIZE_WORDS[size]
            phrases = POSITION_PHRASES[position]
            frames = STYLE_FRAMES[background]
            caption = CAPTION_TEMPLATES[parameters["template_index"][row]].format(
                frame=frames[int(parameters["frame_uniform"][row] * len(frames))],
                color=color,
                shape=shape,
                size=size_words[int(parameters["size_word_uniform"][row] * len(size_words))],
                position=phrases[int(parameters["position_phrase_uniform"][row] * len(phrases))],
                background=background,
            )
            descriptions.append(
                ExampleDescription(
                    label=int(parameters["label"][row]),
                    color=color,
                    shape=shape,
                    size=size,
                    position=position,
                    background=background,
                    caption=_ARTICLE_BEFORE_VOWEL.sub("an ", caption),
                )
            )
        return descriptions

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
            size = self.config.image_size
            words = _random_words(parameters["key"], _SHIFT_NOISE_STREAM, size * size * 3)
            levels = (words >> np.uint64(32)) % np.uint64(2 * _HEAVY_NOISE + 1)
            noise = (levels.astype(np.float32) - _HEAVY_NOISE).reshape(images.shape)
            images[...] = np.clip(images.astype(np.float32) + noise, 0.0, 255.0).astype(np.uint8)

    def _dotted_weights(self, parameters: dict[str, np.ndarray]) -> np.ndarray:
        """Polka dots on a hexagonal-ish grid (a background kind no split draws): float32 (n, H, W),
        1 inside a dot. The dot spacing comes from the example's period fraction."""
        size = self.config.image_size
        spacing = np.maximum(4.0, np.floor(size * parameters["period_fraction"])).astype(np.float32)[:, None, None]
        row = np.floor(self._pixel_y / spacing)
        across = (self._pixel_x / spacing + 0.5 * (row % 2.0)) % 1.0 - 0.5
        down = (self._pixel_y / spacing) % 1.0 - 0.5
        return (across * across + down * down <= 0.3**2).astype(np.float32)

    def _background_weights(self, parameters: dict[str, np.ndarray]) -> np.ndarray:
        """How far each pixel is from the first towards the second background colour:
        float32 (n, H, W) in [0, 1]."""
        size = self.config.image_size
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
        size = self.config.image_size
        words = _random_words(keys, _NUM_UNIFORMS, size * size)  # (m, H * W)
        levels = (words >> np.uint64(32)) % np.uint64(2 * _NOISE_AMPLITUDE + 1)
        noise = levels.astype(np.float32) - _NOISE_AMPLITUDE
        return noise.reshape(len(keys), size, size)

    def _shape_masks(self, parameters: dict[str, np.ndarray]) -> np.ndarray:
        """Which pixels each example's shape covers: bool (n, H, W)."""
        size = self.config.image_size
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


class SyntheticBatchIterator:
    """Endless iterator over one process's share of each global batch of a split.

    `step` is the step whose batch the next `next()` returns: save it to resume exactly by
    passing it back as `start_step`.
    """

    def __init__(
        self,
        dataset: SyntheticShapes,
        split: str,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        start_step: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        # Validates batch size, process layout and step before any work is done.
        process_batch_indices(start_step, global_batch_size, process_index, process_count)
        self.dataset = dataset
        self.split = split
        self.global_batch_size = global_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.step = start_step

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        indices = process_batch_indices(self.step, self.global_batch_size, self.process_index, self.process_count)
        batch = self.dataset.get_batch(self.split, indices)
        self.step += 1
        return batch


# --------------------------------------------------------------------------------------------
# The built-in dataset as a training source (clip_jax.data.sources.ExampleSource).
# --------------------------------------------------------------------------------------------

# Train examples between the starts of two epochs of SyntheticSource. The stream is endless, so an
# epoch only begins anew when a resume changes the topology (the iterator then moves to the next
# epoch); this is more than any run reads, so epochs never overlap.
EPOCH_STRIDE = 2**40
# Examples drawn in one vectorised pass: as fast per example as a whole batch (measured at 32 px),
# with a bounded amount of memory whatever the batch size. Captions alone are cheap and small, so
# a tokenizer's sample takes them in larger passes.
_DRAW_CHUNK = 64
_CAPTION_CHUNK = 1024


class SyntheticSource:
    """The "train" split of the built-in dataset as this process's stream of raw examples.

    The global batch of step s is train examples [s * B, (s + 1) * B) and process p reads its
    contiguous rows of it (`process_batch_indices`), so the batches a TrainIterator makes from
    this source are those of every earlier version of the default run, in any topology. Position
    {"epoch", "offset"}: the next example is this process's `offset`-th of epoch `epoch`.
    Images are drawn at the model's size, so they are ready-sized (no random resized crop).
    """

    ready_sized = True

    def __init__(
        self, dataset: SyntheticShapes, global_batch_size: int, process_index: int, process_count: int
    ) -> None:
        process_batch_indices(0, global_batch_size, process_index, process_count)  # raises on a bad layout
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = global_batch_size // process_count

    def fingerprint(self) -> str:
        config = self.dataset.config
        return (
            f"synthetic: seed {config.seed}, {config.num_held_out} held out, {config.image_size} px, "
            f"global batch {self.global_batch_size}"
        )

    def initial_position(self) -> dict[str, int]:
        return {"epoch": 0, "offset": 0}

    def record_reader(self) -> None:
        return None  # examples carry their pixels

    def resume_position(self, saved_positions: Sequence[Mapping[str, int]]) -> dict[str, int] | None:
        """This process's position continuing a run saved by `len(saved_positions)` processes (any
        number): the next global batch is the one no saved process had started, so the global order
        of examples goes on unchanged. None when the saved processes were in different epochs."""
        epochs = {int(position["epoch"]) for position in saved_positions}
        if len(epochs) != 1:
            return None
        offsets = [int(position["offset"]) for position in saved_positions]
        batches, _ = global_batches_started(offsets, self.global_batch_size)
        return {"epoch": epochs.pop(), "offset": batches * self.local_batch_size}

    def example_indices(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        """Train example indices of this process's `offsets`-th examples of epoch `epoch`."""
        positions = process_stream_index(offsets, self.global_batch_size, self.process_index, self.process_count)
        return epoch * EPOCH_STRIDE + positions

    def examples(
        self, position: Mapping[str, int], text_only: bool = False
    ) -> Iterator[tuple[RawExample, dict[str, int]]]:
        epoch, offset = int(position["epoch"]), int(position["offset"])
        if epoch < 0 or offset < 0:
            raise ValueError(f"invalid synthetic position {dict(position)!r}")
        while True:
            chunk = _CAPTION_CHUNK if text_only else _DRAW_CHUNK
            indices = self.example_indices(epoch, np.arange(offset, offset + chunk))
            if text_only:  # a tokenizer's sample: captions cost a fraction of drawing
                images: Sequence[np.ndarray | None] = [None] * len(indices)
                captions = self.dataset.captions("train", indices)
            else:
                batch = self.dataset.get_batch("train", indices)
                images, captions = batch["images"], batch["captions"]
            for row, index in enumerate(indices.tolist()):
                description = f"synthetic train example {index}"
                example = RawExample(images[row], captions[row], (index,), epoch, description=description)
                yield example, {"epoch": epoch, "offset": offset + row + 1}
            offset += len(indices)

    def close(self) -> None:
        pass


def source_from_config(
    data_config: DataSettings,
    process_index: int,
    process_count: int,
    image_size: int,
    global_batch_size: int,
) -> SyntheticSource:
    """The built-in dataset of `config.data` (seed, num_held_out) drawn at the model's image size,
    laid out in the run's global batches."""
    dataset = SyntheticShapes(
        SyntheticShapesConfig(
            image_size=int(image_size), seed=int(data_config.seed), num_held_out=int(data_config.num_held_out)
        )
    )
    return SyntheticSource(dataset, int(global_batch_size), process_index, process_count)
