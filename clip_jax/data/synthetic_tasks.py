"""What the built-in dataset's examples are called, and the tasks and shifted sets built on that.

The words: each size, position and style (background kind) has the phrases captions use for it,
and `ZERO_SHOT_TEMPLATES` are the prompts of zero-shot classification, one per caption frame.

Downstream tasks and shifted test sets (the CLIP paper's §4 at laptop scale): `DOWNSTREAM_TASKS`
names classification tasks over one attribute of the drawn examples (shape, colour, held-out
colour x shape combination, style, size, position), each with class names and zero-shot
templates, and `SHIFTS` names renderings the training data never shows (outline-only shapes, a
grey "sketch", heavy noise, inverted colours, a new background kind), as ImageNet-R and -Sketch
shift ImageNet. `SyntheticShapes.task_batch(task, indices, shift)` draws them: the same examples
as the task's split (same labels), only rendered differently (clip_jax.data.synthetic_render); no
existing split changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from clip_jax.data.synthetic_render import BACKGROUND_KINDS

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium", "medium-sized"),
    "large": ("large", "big"),
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

# Prompts for zero-shot classification; "{}" takes a class name such as "red circle". One per
# caption frame, so that the ensemble covers every style: each style's first frame, then each
# one's second, ...; the first, "a photo of the {}.", is the "single" prompt (the paper's).
# They use "the" so no article has to agree with the colour word.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = tuple(
    f"{frame} the {{}}." for frames in zip(*STYLE_FRAMES.values()) for frame in frames
)

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
    "heavy_noise": _ALL_ATTRIBUTES - {"background"},  # strong per-channel noise
    "inverted": _ALL_ATTRIBUTES - {"color", "combination"},  # 255 - every channel
    "dotted": _ALL_ATTRIBUTES - {"background"},  # a background kind training never draws
}


def downstream_task(
    name: str, colors: Sequence[str], shapes: Sequence[str], held_out_class_names: Sequence[str]
) -> DownstreamTask:
    """The task called `name` (a `DOWNSTREAM_TASKS` key) of a dataset of these colours and shapes,
    whose held-out combinations are `held_out_class_names`."""
    if name not in DOWNSTREAM_TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(DOWNSTREAM_TASKS)}")
    attribute, split = DOWNSTREAM_TASKS[name]
    class_names = {
        "shape": shapes,
        "color": colors,
        "combination": held_out_class_names,
        "background": tuple(_STYLE_NAMES[kind] for kind in BACKGROUND_KINDS),
        "size": tuple(words[0] for words in SIZE_WORDS.values()),
        "position": tuple(phrases[0] for phrases in POSITION_PHRASES.values()),
    }[attribute]
    templates = _task_templates(attribute, colors, shapes)
    return DownstreamTask(name, attribute, split, tuple(class_names), templates, templates[0])


def shifts_keeping(attribute: str) -> tuple[str, ...]:
    """The `SHIFTS` that keep `attribute` recognisable: the shifted sets of a task on it."""
    return tuple(shift for shift, kept in SHIFTS.items() if attribute in kept)


def task_labels(task: DownstreamTask, parameters: dict[str, np.ndarray], held_out_labels: np.ndarray) -> np.ndarray:
    """Labels of examples under `task` (indices into its class names), from their random choices
    (`SyntheticShapes._parameters`) and the dataset's held-out labels: int32 (n,)."""
    if task.attribute == "combination":
        positions = {int(label): row for row, label in enumerate(held_out_labels)}
        labels = np.array([positions[int(label)] for label in parameters["label"]], dtype=np.int64)
    else:
        column = {"shape": "shape_index", "color": "color_index", "background": "background_index"}
        labels = parameters[column.get(task.attribute, f"{task.attribute}_index")]
    return np.asarray(labels, np.int32)
