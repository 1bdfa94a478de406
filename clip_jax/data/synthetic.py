"""Built-in default dataset: procedurally drawn coloured shapes with matching captions, and the
training source that reads it.

Example `i` of a split is a pure function of (seed, split, i), so a data position is one
integer and resuming is exact. Some colour x shape combinations never appear in training;
the "held_out" split holds only those, to measure compositional zero-shot transfer. Captions
are sentences whose opening frame ("a photo of", "a drawing of", ...) names the image's style
(its background kind), so zero-shot prompts behave as in the CLIP paper: the class name alone
is out of distribution, and an ensemble of frames covers styles a single prompt does not.
Randomness comes from a counter-based hash of (seed, split, index), and images are drawn
for a whole batch at once with numpy (clip_jax.data.synthetic_render).

Training reads it like any other corpus: `SyntheticSource` is an ExampleSource whose examples
are ready-sized (drawn at the model's image size), which clip_jax.data.iterator turns into
batches and resumes from its state as it does TFDS and WebDataset shards.

`SyntheticShapes` also draws the downstream tasks and shifted test sets of
clip_jax.data.synthetic_tasks (`downstream_task`, `task_shifts`, `task_batch`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from clip_jax.data import synthetic_tasks
from clip_jax.data.config import DataSettings
from clip_jax.data.sources import RawExample, global_batches_started, process_stream_index
from clip_jax.data.synthetic_render import (
    BACKGROUND_KINDS,
    COLOR_PALETTE,
    DEFAULT_COLORS,
    DEFAULT_SHAPES,
    NUM_UNIFORMS,
    POSITIONS,
    SHAPE_EXTENT,
    SHAPE_MASKS,
    SIZE_RANGES,
    ShapeRenderer,
    background_palette,
    example_keys,
    uniform_floats,
)
from clip_jax.data.synthetic_tasks import (
    POSITION_PHRASES,
    SHIFTS,
    SIZE_WORDS,
    STYLE_FRAMES,
    ZERO_SHOT_TEMPLATES,
    DownstreamTask,
)

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

SPLITS: dict[str, int] = {"train": 0, "validation": 1, "held_out": 2}

_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")
_COLOR_JITTER = 12  # per-channel jitter of the shape colour, +- this many levels


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
        self._background_colors = background_palette(
            [COLOR_PALETTE[name] for name in self.color_names]
        )  # (N, 3) float32, whole numbers
        self._renderer = ShapeRenderer(config.image_size, self.shape_names)
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
        return {
            "images": self._renderer.render(parameters, shift),
            "captions": [description.caption for description in self._descriptions(parameters)],
            "labels": parameters["label"].astype(np.int32),
        }

    # --- downstream tasks and shifted sets

    def downstream_task(self, name: str) -> DownstreamTask:
        """The task called `name` (a `DOWNSTREAM_TASKS` key) of this dataset's colours and shapes."""
        return synthetic_tasks.downstream_task(name, self.color_names, self.shape_names, self.held_out_class_names)

    def task_shifts(self, name: str) -> tuple[str, ...]:
        """The shifted sets task `name` has: the `SHIFTS` that keep its attribute recognisable."""
        return synthetic_tasks.shifts_keeping(self.downstream_task(name).attribute)

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
        return {
            "images": batch["images"],
            "labels": synthetic_tasks.task_labels(task, parameters, self.held_out_labels),
        }

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
        keys = example_keys(self.config.seed, SPLITS[split], indices)
        uniforms = uniform_floats(keys, NUM_UNIFORMS)  # (n, NUM_UNIFORMS)

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
        reach = radius * SHAPE_EXTENT
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
