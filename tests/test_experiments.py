"""Smoke tests of the paper experiments (clip_jax/experiments) and the built-in downstream tasks and
shifted sets they use: tiny sizes only, the whole file well under a minute."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from clip_jax.data.synthetic_tasks import DOWNSTREAM_TASKS, SHIFTS
from clip_jax.data.templates import check_template
from clip_jax.experiments import __main__ as experiments_main
from clip_jax.experiments.commands import _line_fit
from clip_jax.experiments.common import compare


@pytest.fixture(scope="module")
def dataset() -> SyntheticShapes:
    return SyntheticShapes(SyntheticShapesConfig(image_size=32))


def test_tasks_have_prompts_and_labels_that_match_the_examples(dataset):
    indices = np.arange(64)
    for name in DOWNSTREAM_TASKS:
        task = dataset.downstream_task(name)
        assert len(set(task.class_names)) == len(task.class_names) >= 3
        for template in task.templates:
            check_template(template)
        labels = dataset.task_batch(name, indices)["labels"]
        assert labels.min() >= 0 and labels.max() < len(task.class_names)
    descriptions = [dataset.describe("validation", int(i)) for i in indices]
    shape_labels = dataset.task_batch("shape", indices)["labels"]
    color_labels = dataset.task_batch("color", indices)["labels"]
    assert [dataset.shape_names[i] for i in shape_labels] == [d.shape for d in descriptions]
    assert [dataset.color_names[i] for i in color_labels] == [d.color for d in descriptions]
    combination = dataset.task_batch("combination", indices)["labels"]
    held_out = [dataset.describe("held_out", int(i)) for i in indices]
    assert [dataset.held_out_class_names[i] for i in combination] == [f"{d.color} {d.shape}" for d in held_out]


def test_shifted_sets_differ_from_the_originals_but_keep_labels(dataset):
    indices = np.arange(100, 132)
    original = dataset.get_batch("validation", indices)
    # No shift draws exactly what the split always drew.
    assert dataset.get_batch("validation", indices, None)["images"].tobytes() == original["images"].tobytes()
    for shift in SHIFTS:
        shifted = dataset.get_batch("validation", indices, shift)
        again = dataset.get_batch("validation", indices[::-1], shift)  # a pure function of the index
        assert shifted["images"].tobytes() == again["images"][::-1].tobytes()
        assert shifted["captions"] == original["captions"]
        np.testing.assert_array_equal(shifted["labels"], original["labels"])
        changed = [not np.array_equal(a, b) for a, b in zip(shifted["images"], original["images"])]
        # A shape thinner than the outline's two pixels (a small cross, a thin ring) draws unchanged.
        assert np.mean(changed) >= (0.75 if shift == "outline" else 1.0), shift
    grey = dataset.get_batch("validation", indices, "grayscale")["images"]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    for name in DOWNSTREAM_TASKS:
        for shift in dataset.task_shifts(name):
            np.testing.assert_array_equal(
                dataset.task_batch(name, indices, shift)["labels"], dataset.task_batch(name, indices)["labels"]
            )
    with pytest.raises(ValueError, match="'grayscale' removes what task 'color'"):
        dataset.task_batch("color", indices, "grayscale")
    with pytest.raises(ValueError, match="unknown shift 'blurry'"):
        dataset.get_batch("validation", indices, "blurry")


def test_line_fit_and_orderings():
    slopes, intercepts = _line_fit(np.array([[0.1, 0.2], [0.3, 0.2]]), np.array([[0.2, 0.5], [0.6, 0.5]]))
    np.testing.assert_allclose(slopes, [2.0, 0.0])
    np.testing.assert_allclose(intercepts, [0.0, 0.5])
    assert compare(0.1, 0.02, 0.2, "a", "b") == "a > b"
    assert compare(-0.1, -0.2, -0.01, "a", "b") == "a < b"
    assert compare(0.1, -0.01, 0.2, "a", "b").startswith("no clear difference")


def test_efficiency_quick_trains_the_three_objectives_and_writes_their_curves(tmp_path):
    output = str(tmp_path / "paper")
    assert experiments_main.main(["efficiency", "--quick", "--output", output, "--tasks", "shape"]) == 0
    with open(os.path.join(output, "efficiency.md"), encoding="utf-8") as file:
        table = file.read()
    for loss in ("caption", "bag_of_words", "softmax"):
        assert f"| shape | {loss} |" in table
    assert "64 test images per set" in table  # the quick size scores 64 images per checkpoint
    assert os.path.getsize(os.path.join(output, "efficiency.png")) > 1000
    with open(os.path.join(output, "efficiency.json"), encoding="utf-8") as file:
        curves = json.load(file)
    # Two checkpoints per objective, at images seen = step x batch, each an accuracy in [0, 1].
    for loss in ("caption", "bag_of_words", "softmax"):
        points = curves[loss]["shape"]
        assert len(points) == 2 and points[0][0] < points[1][0] and all(0 <= a <= 1 for _, a in points)


def test_supervised_quick_writes_its_table_and_figure_and_the_baseline_learns(tmp_path):
    output = str(tmp_path / "paper")
    assert experiments_main.main(["supervised", "--quick", "--output", output, "--tasks", "shape"]) == 0
    with open(os.path.join(output, "supervised.md"), encoding="utf-8") as file:
        table = file.read()
    assert "| shape | 8 |" in table
    assert os.path.getsize(os.path.join(output, "supervised.png")) > 1000
    # The finished CLIP run is found again, not retrained.
    assert os.path.isfile(os.path.join(output, "models", "clip_default", "experiment_done.json"))
    # The supervised trainer's loss falls (its per-step losses are kept beside its parameters).
    with open(os.path.join(output, "models", "supervised_w32_l1_40_s0.msgpack.json"), encoding="utf-8") as file:
        losses = json.load(file)["losses"]
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.3
