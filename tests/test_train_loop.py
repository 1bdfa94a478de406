"""`python train.py --config.total_steps=20` (the README's short run) leaves checkpoints, TensorBoard
event files, the JSONL log and the evaluation suite's zero-shot results, which `clip_jax.load(workdir)`
and `suite.run_evaluation` reproduce; bad settings fail with clear errors before anything is compiled."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from run_helpers import default_config

from clip_jax.api import load
from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from clip_jax.evaluation import suite
from clip_jax.io import training_workdir
from clip_jax.metrics import read_jsonl
from clip_jax.training import checkpointing, loop, setup
from clip_jax.training.config import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_RUN_STEPS = 20
# The default recipe's evaluation: zero-shot on the held-out combinations with the prompt ensemble.
ZERO_SHOT_KEY = "zero_shot/synthetic/ensemble/top1"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, compilation_cache_env) -> tuple[str, subprocess.CompletedProcess]:
    """The README's shortened default run, on one CPU device as a user's machine has."""
    workdir = str(tmp_path_factory.mktemp("short_run") / "workdir")
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(compilation_cache_env)
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "train.py", f"--workdir={workdir}", f"--config.total_steps={SHORT_RUN_STEPS}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result


def test_short_run_leaves_checkpoints_event_files_and_jsonl(short_run):
    workdir, result = short_run
    checkpointer = checkpointing.TrainingCheckpointer(workdir, read_only=True)
    steps = checkpointer.all_steps()
    checkpointer.close()
    assert steps == [SHORT_RUN_STEPS]
    assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))

    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    training = [record for record in records if "loss" in record]
    assert training and training[-1]["step"] == SHORT_RUN_STEPS
    last = training[-1]
    for name in (
        "loss", "accuracy_image_to_text", "accuracy_text_to_image", "logit_scale", "learning_rate", "grad_norm",
        "pairs_per_second", "pairs_per_second_per_device", "step_seconds", "mfu",
    ):  # fmt: skip
        assert name in last, name
    assert 0 < last["loss"] < 2 * np.log(128)  # below the loss of uniform logits over the batch of 128
    assert 0 < last["logit_scale"] <= 100
    assert last["pairs_per_second"] == pytest.approx(128 / last["step_seconds"])
    assert last["mfu"] is None  # no peak is known for a CPU
    assert any(record.get("compile_seconds", 0) > 0 for record in records)
    zero_shot = [record for record in records if ZERO_SHOT_KEY in record]
    assert [record["step"] for record in zero_shot] == [SHORT_RUN_STEPS]
    for mode in ("class_name", "single"):
        assert 0.0 <= zero_shot[0][f"zero_shot/synthetic/{mode}/top1"] <= 1.0
    assert f"step {SHORT_RUN_STEPS}: zero-shot synthetic class_name" in result.stdout

    import tensorflow as tf  # the reader TensorBoard itself uses

    event_files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert len(event_files) == 1
    scalars = {}
    for event in tf.compat.v1.train.summary_iterator(event_files[0]):
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = value.simple_value
    assert scalars[("loss", SHORT_RUN_STEPS)] == pytest.approx(last["loss"], rel=1e-6)
    assert scalars[(ZERO_SHOT_KEY, SHORT_RUN_STEPS)] == pytest.approx(zero_shot[0][ZERO_SHOT_KEY], rel=1e-6)


def test_default_run_resumes_its_data_from_the_iterator_state_every_source_has(short_run):
    """The built-in dataset goes through the iterator TFDS and shards go through: the checkpoint
    holds its TrainIterator state, the one a bare iterator of the same data reaches in as many
    batches, positioned at the synthetic source's next example."""
    import json

    from clip_jax.data import iterator as data_iterator

    workdir, _ = short_run
    with open(os.path.join(workdir, "checkpoints", str(SHORT_RUN_STEPS), "progress", "metadata")) as file:
        progress = json.load(file)

    def no_tokenizer(texts, truncate):
        return np.zeros((len(texts), 4), np.int32)

    config = default_config()
    image_size = validate(config).model.model_config().vision.image_size
    with data_iterator.make_train_iterator(
        config.data, no_tokenizer, config.global_batch_size, image_size, 0, 1
    ) as iterator:
        for _ in range(SHORT_RUN_STEPS):
            next(iterator)
        expected = iterator.state
    assert progress == {"step": SHORT_RUN_STEPS, "data_states": [expected]}
    assert expected["source"] == {"epoch": 0, "offset": SHORT_RUN_STEPS * config.global_batch_size}
    assert expected["fingerprint"].startswith("synthetic:") and expected["batches"] == SHORT_RUN_STEPS


def test_workdir_loads_on_one_device_and_reproduces_the_logged_zero_shot(short_run):
    workdir, _ = short_run
    model, variables, preprocess, tokenizer = load(workdir)
    assert model.config.text.vocab_size == tokenizer.vocab_size
    assert {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(variables)} == {1}

    # Zero-shot on the held-out combinations, computed here independently of the loop's code.
    dataset = SyntheticShapes(SyntheticShapesConfig(image_size=model.config.vision.image_size))
    num_examples = 512
    images, labels = [], []
    for index in range(num_examples):
        image, _, label = dataset.held_out_example(index)
        images.append(preprocess(image))
        labels.append(label)
    image_embeddings = np.asarray(model.apply(variables, np.stack(images), normalize=True, method=model.encode_image))
    class_embeddings = []
    for label in dataset.held_out_labels:
        name = dataset.all_class_names[label]
        prompts = tokenizer([template.format(name) for template in dataset.zero_shot_templates])
        embeddings = np.asarray(model.apply(variables, prompts, normalize=True, method=model.encode_text))
        mean = embeddings.mean(axis=0)
        class_embeddings.append(mean / np.linalg.norm(mean))
    predictions = dataset.held_out_labels[np.argmax(image_embeddings @ np.stack(class_embeddings).T, axis=1)]
    accuracy = float(np.mean(predictions == np.array(labels)))

    logged = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if ZERO_SHOT_KEY in r]
    assert accuracy == pytest.approx(logged[-1][ZERO_SHOT_KEY], abs=2 / num_examples)


def test_logged_evaluation_is_the_suites_on_the_saved_checkpoint(short_run):
    """What training logged is `suite.run_evaluation` on the checkpoint, as evaluate.py runs it: the
    same metric names and values (here on this test's 8 devices, in training on one)."""
    workdir, _ = short_run
    model, variables, _, tokenizer = load(workdir)
    settings = suite.EvaluationSettings(
        tasks=("zero_shot",), datasets=("synthetic",), prompt_modes=("class_name", "single", "ensemble"),
        batch_size=128, max_examples=512,
    )  # fmt: skip
    _, record = training_workdir.read_run_record(workdir)
    synthetic = suite.synthetic_dataset_for(record["training"]["data"], model.config.vision.image_size)
    expected = suite.flatten_metrics(
        suite.run_evaluation(model, variables, tokenizer, settings, synthetic=synthetic, log=lambda message: None)
    )
    records = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if ZERO_SHOT_KEY in r]
    logged = {name: value for name, value in records[-1].items() if name not in ("step", "time")}
    assert sorted(logged) == sorted(expected)
    assert expected["zero_shot/synthetic/scored_classes"] == 16
    assert expected["zero_shot/synthetic/single/num_examples"] == 512
    for name, value in expected.items():
        # Embeddings summed in another order on 8 devices may flip a near-tie: one image in 512.
        assert logged[name] == pytest.approx(value, abs=1.5 / 512), name


@pytest.fixture
def never_compile(monkeypatch):
    """Makes creating, restoring or compiling the training state fail loudly."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the error should have been raised before the state or the step was built")

    for name in ("create_train_state", "abstract_train_state", "make_train_step"):
        monkeypatch.setattr(setup, name, forbidden)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("global_batch_size", 12, "global batch size 12 is not divisible by the 8 batch-axis devices"),
        ("mesh.data", 3, "has 3 devices but there are 8 devices"),
        ("model.name", "ViT-X-99", "unknown model 'ViT-X-99'"),
        (
            "loss.name",
            "hinge",
            # A prefix: objectives added later (one record each in clip_jax.losses) extend the list.
            "loss.name must be one of ('softmax', 'sigmoid', 'caption', 'bag_of_words', 'coca'",
        ),
        ("eval.prompt_modes", "ensemble,best", "unknown prompt mode"),
        # A negative learning rate trains uphill; the rest make AdamW or the guard meaningless.
        ("optimizer.learning_rate", -0.001, "optimizer.learning_rate must be a finite number > 0; got -0.001"),
        ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate must be a finite number > 0; got nan"),
        ("optimizer.warmup_steps", 2000, "optimizer.warmup_steps must be >= 0 and below total_steps (1500); got 2000"),
        ("optimizer.b2", 1.0, "optimizer.b2 must be in [0, 1); got 1.0"),
        ("optimizer.eps", 0.0, "optimizer.eps must be > 0; got 0.0"),
        ("optimizer.weight_decay", -0.1, "optimizer.weight_decay must be >= 0; got -0.1"),
        ("nonfinite.policy", "ignore", "nonfinite.policy must be one of ('skip', 'stop'); got 'ignore'"),
        ("nonfinite.max_consecutive_skips", 0, "nonfinite.max_consecutive_skips must be >= 1"),
    ],
)
def test_clear_errors_before_compiling(never_compile, tmp_path, field, value, message):
    config = default_config()
    config.update_from_flattened_dict({field: value})
    workdir = str(tmp_path / "workdir")
    with pytest.raises(ValueError, match=re.escape(message)):
        loop.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)


def test_workdir_of_another_model_is_refused_before_compiling(never_compile, short_run):
    workdir, _ = short_run
    config = default_config()
    config.model.name = "tiny-resnet"
    with pytest.raises(
        ValueError, match="holds checkpoints of another model .*vision.patch_size: 8 in the checkpoint, None now"
    ):
        loop.train_and_evaluate(config, workdir)
