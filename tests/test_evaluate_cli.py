"""evaluate.py end to end: a checkpoint from a short train.py run on the built-in dataset, and
ImageNet with its shift sets from tfds.testing.mock_data; results.json, results.md and PNGs."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@functools.cache  # once per process: a second import would define evaluate.py's absl flags again
def _import_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(REPOSITORY, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """Two steps of `python train.py` (the default recipe: tiny ViT, built-in dataset). On one
    device: compiling the step for 8 virtual devices would double the test's time."""
    workdir = str(tmp_path_factory.mktemp("workdir"))
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [
            sys.executable, os.path.join(REPOSITORY, "train.py"), f"--workdir={workdir}", "--config.total_steps=2",
            "--config.global_batch_size=16", "--config.tokenizer.training_captions=2000", "--config.eval.num_examples=0",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False", "--config.log_every_steps=2",
        ],
        capture_output=True, text=True, timeout=600, cwd=REPOSITORY, env=environment,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return workdir


def _run_main(argv: list[str]) -> None:
    """evaluate.py's main() with these flags, in this process (tfds.testing.mock_data only patches
    this process)."""
    from absl import flags

    evaluate = _import_script("evaluate")
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate.py", *argv])
    try:
        evaluate.main(["evaluate.py"])
    finally:
        flags.FLAGS.unparse_flags()


def test_all_tasks_on_the_built_in_dataset_and_mock_imagenet(trained_workdir, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    output = tmp_path / "results"
    classification = "synthetic,imagenet2012,imagenet_v2,imagenet_r,imagenet_a,imagenet_sketch"
    datasets = classification + ",coco_captions"
    with tfds.testing.mock_data(num_examples=96):
        _run_main([
            f"--checkpoint={trained_workdir}", "--tasks=zero_shot,retrieval,linear_probe,few_shot",
            f"--datasets={datasets}", f"--output={output}", "--max_examples=24", "--max_train_examples=96",
            "--shots=1,2", "--seeds=0,1", "--batch_size=16", "--prompt_modes=class_name,single",
            "--tfds_reader=data_source", "--tfds_image_decoder=tfds", "--tfds_worker_kind=thread",
        ])  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert results["checkpoint"] == trained_workdir
    # Zero-shot on every classification dataset, both prompt modes, 24 images each; R and A score only
    # the images of their 200 classes (mock labels range over all 1,000).
    assert sorted(results["zero_shot"]) == sorted(classification.split(","))
    for name, entry in results["zero_shot"].items():
        for mode in ("class_name", "single"):
            assert 0.0 <= entry[mode]["top1"] <= 1.0, (name, mode)
            if name in ("imagenet_r", "imagenet_a"):
                assert 0 < entry[mode]["num_examples"] <= 24 and entry[mode]["num_classes"] == 200, (name, mode)
            else:
                assert entry[mode]["num_examples"] == 24, (name, mode)
    assert results["zero_shot"]["imagenet2012"]["single"]["num_classes"] == 1000
    assert results["zero_shot"]["synthetic"]["single"]["num_classes"] == 16  # the held-out combinations
    assert results["retrieval"]["synthetic"]["num_images"] == 24
    assert "image_to_text_R@5" in results["retrieval"]["synthetic"]
    # Mock COCO: several captions per image, all of them scored.
    coco = results["retrieval"]["coco_captions"]
    assert coco["num_images"] == 24 and coco["num_texts"] > coco["num_images"]
    assert any(entry.startswith("zero_shot") and "coco_captions" in entry for entry in results["skipped"])
    # Probes where there is a training split: the built-in dataset and (mock) ImageNet's train split,
    # whose 96 images spread over 1,000 classes allow a linear probe and 1-shot but not 2-shot.
    assert sorted(results["linear_probe"]) == ["imagenet2012", "synthetic"]
    assert results["linear_probe"]["synthetic"]["num_train"] == 96
    assert results["linear_probe"]["imagenet2012"]["num_train"] == 96
    assert sorted(results["few_shot"]["synthetic"]["shots"]) == ["1", "2"]
    assert sorted(results["few_shot"]["imagenet2012"]["shots"]) == ["1"]
    assert any("imagenet_v2" in entry and "no training split" in entry for entry in results["skipped"])
    assert any("few_shot: shots [2]" in entry and "imagenet2012" in entry for entry in results["skipped"])
    robustness = results["robustness"]
    assert sorted(robustness["shift_top1"]) == ["imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2"]
    assert robustness["imagenet_top1"] == results["zero_shot"]["imagenet2012"]["single"]["top1"]

    markdown = (output / "results.md").read_text()
    for heading in ("Zero-shot classification", "Retrieval", "Linear probe", "Few-shot", "Robustness"):
        assert f"## {heading}" in markdown
    assert "| imagenet_sketch |" in markdown
    for name in ("zero_shot_vs_few_shot.png", "per_dataset.png", "prompt_modes.png", "effective_robustness.png"):
        data = (output / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name


def test_bad_flags_fail_before_any_work(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            os.path.join(REPOSITORY, "evaluate.py"),
            f"--checkpoint={tmp_path}",
            "--tasks=zero_shot,captioning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPOSITORY,
    )
    assert completed.returncode != 0
    assert "unknown task(s) ['captioning']" in completed.stderr
    assert not (tmp_path / "results.json").exists()


def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys):
    """--output is checked first: a file where the directory belongs, or under a file. The
    checkpoint does not exist, so a check made only after loading would report that instead."""
    taken = tmp_path / "results"
    taken.write_text("not a directory")
    for output in (taken, taken / "run1"):
        with pytest.raises(SystemExit) as exited:
            _run_main([f"--checkpoint={tmp_path / 'no_model'}", f"--output={output}", "--noplots"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 1 and len(lines) == 1, lines
        assert "--output" in lines[0] and repr(str(output)) in lines[0] and "is a file" in lines[0], lines
        assert "no_model" not in lines[0]
    assert taken.read_text() == "not a directory"


def test_the_built_in_dataset_is_the_one_the_workdir_trained_on(trained_workdir, tmp_path):
    """evaluate.py takes the data settings from a training workdir's record, and gives the suite
    nothing for a path that is not one; the suite builds the dataset from those settings."""
    from clip_jax.evaluation import suite
    from clip_jax.io import training_workdir

    evaluate = _import_script("evaluate")
    _, record = training_workdir.read_run_record(trained_workdir)
    settings = evaluate._training_data_settings(trained_workdir)
    assert settings == record["training"]["data"] and settings["name"] == "synthetic"
    assert evaluate._training_data_settings(str(tmp_path)) is None

    # Settings unlike the defaults, so that taking them and ignoring them differ.
    default = suite.synthetic_dataset_for(None, 32).config
    trained = suite.synthetic_dataset_for({**settings, "seed": default.seed + 7, "num_held_out": 5}, 32).config
    assert (trained.seed, trained.num_held_out, trained.image_size) == (default.seed + 7, 5, 32)
    # A run on other data says nothing about the built-in dataset: its default configuration.
    other = suite.synthetic_dataset_for({**settings, "name": "tfds", "seed": default.seed + 7}, 32).config
    assert other == default
