"""FLIP's masked-patch training: which tokens the masked ViT runs, the noise's determinism, the
unmasked paths (p = 0, evaluation), the train step against a single-device reference with and
without GradCache, the unmasked tuning phase, and the settings' checks."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_step import (
    BATCH_SIZE,
    FAST_COMPILE,
    RELATIVE_TOLERANCE,
    assert_trees_close,
    clamped_scale,
    gradients_from_first_step,
    make_config,
    on_mesh,
    random_batch,
)

from clip_jax import create_model, losses
from clip_jax.models import CLIP
from clip_jax.models.vit import kept_patches, make_patch_noise
from clip_jax.sharding import make_mesh
from clip_jax.training import checkpointing, setup, step
from clip_jax.training.config import base_config, validate
from clip_jax.training.state import create_train_state
from clip_jax.training.step import make_train_step

PATCHES = 16  # tiny-vit: 32 px images, 8 px patches
KEPT = 8  # at patch_dropout 0.5


def flip_model(patch_dropout=0.5):
    return create_model("tiny-vit", vision=dict(layers=1, patch_dropout=patch_dropout), text=dict(layers=1))


@pytest.fixture(scope="module")
def variables():
    return nn.unbox(jax.jit(flip_model().init_variables)(jax.random.key(0)))


def images(count=4, seed=0):
    return np.random.default_rng(seed).normal(size=(count, 32, 32, 3)).astype(np.float32)


def ln_pre_output(model, variables, batch, noise):
    """What the transformer of the image tower runs on: the output of ln_pre, (B, tokens, width)."""
    _, state = model.apply(
        variables, batch, method=model.encode_image, patch_noise=noise, capture_intermediates=True, mutable=True
    )
    return np.asarray(state["intermediates"]["visual"]["ln_pre"]["__call__"][0])


def test_kept_patch_counts():
    assert kept_patches(16, 0.5) == 8
    assert kept_patches(49, 0.5) == 24 and kept_patches(49, 0.75) == 12  # ViT-B/32, floor as FLIP's code
    assert kept_patches(100, 0.9) == 10  # not 9: (1 - 0.9) * 100 is 9.999999999999998 in floats
    assert kept_patches(4, 0.99) == 1


def test_masked_vit_runs_the_class_token_and_the_patches_of_least_noise(variables):
    model, batch = flip_model(), images()
    noise = np.random.default_rng(1).random((4, PATCHES)).astype(np.float32)
    unmasked = ln_pre_output(model, variables, batch, None)
    masked = ln_pre_output(model, variables, batch, noise)
    assert unmasked.shape == (4, 1 + PATCHES, 64) and masked.shape == (4, 1 + KEPT, 64)
    for row in range(4):
        # Token 0 is the class token; patch i is token i + 1 of the unmasked sequence.
        kept = np.argsort(noise[row])[:KEPT] + 1
        assert len(set(kept)) == KEPT
        np.testing.assert_allclose(masked[row], unmasked[row, np.concatenate([[0], kept])], rtol=1e-5, atol=1e-6)
    embeddings = model.apply(variables, batch, method=model.encode_image, patch_noise=noise)
    assert not np.allclose(embeddings, model.apply(variables, batch, method=model.encode_image), atol=1e-3)


def test_patch_dropout_zero_and_the_evaluation_path_run_every_patch_bitwise(variables):
    batch, noise = images(), np.random.default_rng(1).random((4, PATCHES)).astype(np.float32)
    plain = flip_model(0.0)
    expected = np.asarray(plain.apply(variables, batch, method=plain.encode_image))
    # p = 0: noise given or not, the same numbers; and the step draws none at all.
    np.testing.assert_array_equal(plain.apply(variables, batch, method=plain.encode_image, patch_noise=noise), expected)
    assert make_patch_noise(jax.random.key(0), 4, plain.config) is None
    # p = 0.5 without noise (evaluation, clip_jax.load, the evaluator during training): unmasked.
    masked = flip_model(0.5)
    np.testing.assert_array_equal(masked.apply(variables, batch, method=masked.encode_image), expected)
    texts = np.ones((4, 16), np.int32)
    outputs = masked.apply(variables, batch, texts)
    np.testing.assert_array_equal(outputs["image_embeds"], plain.apply(variables, batch, texts)["image_embeds"])


def kept_sets(seed, step_number, batch_size=BATCH_SIZE):
    """The patches each row keeps at (seed, step), from the train step's own noise."""
    # What the step reads of the state: its raw key data and its step.
    state = types.SimpleNamespace(rng=jax.random.key_data(jax.random.key(seed)), step=jnp.int32(step_number))
    context = types.SimpleNamespace(model=flip_model(), mesh=make_mesh({"data": 8, "fsdp": 1, "model": 1}))
    noise = np.asarray(step._patch_noise(context, state, batch_size))
    return [frozenset(np.argsort(row)[:KEPT].tolist()) for row in noise], noise


def test_masks_differ_per_example_and_per_step_and_repeat_for_the_same_seed_and_step():
    first, noise = kept_sets(seed=0, step_number=3)
    again, noise_again = kept_sets(seed=0, step_number=3)
    np.testing.assert_array_equal(noise, noise_again)  # a resumed run masks as the uninterrupted one
    assert first == again
    assert len(set(first)) > BATCH_SIZE // 2  # rows of one batch keep different patches
    assert kept_sets(seed=0, step_number=4)[0] != first  # the next step draws anew
    assert kept_sets(seed=1, step_number=3)[0] != first  # another seed draws other masks


def masked_reference_loss_and_gradients(model, params, images, texts, noise):
    """Single-device softmax loss and gradients of the masked model, from the model alone."""

    def loss(params):
        outputs = model.apply({"params": params}, images, texts, patch_noise=noise)
        return losses.softmax_contrastive_loss(outputs["image_embeds"], outputs["text_embeds"], clamped_scale(params))

    return jax.jit(jax.value_and_grad(loss))(params)


def documented_noise(state, batch_size):
    """The noise docs/training.md describes: the state's key folded with the step, then with the
    patch-dropout stream (1), uniform over (batch, patches)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 1)
    return jax.random.uniform(key, (batch_size, PATCHES), jnp.float32)


def tuning_config(tuning_steps=3, patch_dropout=0.5):
    """A training config of `flip_model()`: 10 steps, the last `tuning_steps` unmasked."""
    config = small_config()
    config.model.overrides.vision = {"layers": 1, "patch_dropout": patch_dropout}
    config.model.overrides.text = {"layers": 1}
    config.global_batch_size, config.unmasked_tuning_steps = BATCH_SIZE, tuning_steps
    return config


@pytest.fixture(scope="module")
def masked_steps():
    """One step from the same state and batch: masked with 1 and with 2 micro-batches, and the
    unmasked tuning phase's step (the model setup.unmasked_tuning_model gives it)."""
    model = flip_model()
    images, texts = random_batch(model)
    tuning_model = setup.unmasked_tuning_model(validate(tuning_config()), model)
    assert tuning_model is not None
    results = {}
    for accumulation_steps, step_model in ((1, model), (2, model), ("tuning", tuning_model)):
        config = make_config(
            mesh=(2, 4, 1), accumulation_steps=1 if accumulation_steps == "tuning" else accumulation_steps
        )
        mesh = make_mesh(config.mesh)
        state, shardings = create_train_state(model, config.tx, config.seed, mesh)
        # A step other than 0 picks its own masks.
        state = state.replace(step=jax.device_put(jnp.int32(5), shardings.step))
        host_state = jax.device_get(state)
        batch = on_mesh(images, texts, mesh)
        compiled = make_train_step(step_model, config.step, mesh, shardings).lower(state, batch).compile(FAST_COMPILE)
        new_state, metrics = compiled(state, batch)
        results[accumulation_steps] = (float(metrics["loss"]), gradients_from_first_step(new_state))
    return model, images, texts, host_state, results


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_masked_step_equals_the_reference_with_and_without_grad_cache(masked_steps, accumulation_steps):
    model, images, texts, host_state, results = masked_steps
    noise = documented_noise(host_state, BATCH_SIZE)
    expected_loss, expected_gradients = masked_reference_loss_and_gradients(
        model, host_state.params, images, texts, noise
    )
    loss, gradients = results[accumulation_steps]
    assert loss == pytest.approx(float(expected_loss), rel=RELATIVE_TOLERANCE)
    assert_trees_close(gradients, jax.device_get(expected_gradients))
    unmasked_loss, _ = masked_reference_loss_and_gradients(model, host_state.params, images, texts, None)
    assert abs(loss - float(unmasked_loss)) > 1e-4  # the step did mask


def test_the_unmasked_tuning_phase_runs_the_step_of_a_model_without_patch_dropout(masked_steps):
    model, images, texts, host_state, results = masked_steps
    run = types.SimpleNamespace(compiled_step="masked", unmasked_step="unmasked", unmasked_from_step=7)
    assert setup.Run.step_function(run, 6) == "masked"  # of 10 steps with 3 to tune: 0..6 masked
    assert setup.Run.step_function(run, 7) == setup.Run.step_function(run, 9) == "unmasked"
    # The tuning step (compiled in the fixture from setup.unmasked_tuning_model) gives the loss and
    # gradients of the model without masking, from the same state and batch as the masked step.
    expected_loss, expected_gradients = masked_reference_loss_and_gradients(
        model, host_state.params, images, texts, None
    )
    loss, gradients = results["tuning"]
    assert loss == pytest.approx(float(expected_loss), rel=RELATIVE_TOLERANCE)
    assert_trees_close(gradients, jax.device_get(expected_gradients))
    assert abs(loss - results[1][0]) > 1e-4
    # No tuning steps, or no patch dropout: no second step.
    settings = validate(tuning_config(tuning_steps=0))
    assert setup.unmasked_tuning_model(settings, model) is None
    settings = validate(tuning_config(patch_dropout=0.0))
    assert setup.unmasked_tuning_model(settings, CLIP(settings.model.model_config())) is None


def small_config():
    config = base_config()
    config.model.name = "tiny-vit"
    config.total_steps, config.optimizer.warmup_steps = 10, 1
    return config


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, "half", True])
def test_bad_patch_dropout_is_one_clear_error(value):
    config = small_config()
    config.model.overrides.vision = {"patch_dropout": value}
    with pytest.raises(ValueError, match=r"vision patch_dropout must be a number in \[0, 1\); got"):
        validate(config)


def test_patch_dropout_on_a_resnet_and_too_many_tuning_steps_are_errors():
    config = small_config()
    config.model.name = "tiny-resnet"
    config.model.overrides.vision = {"patch_dropout": 0.5}
    with pytest.raises(ValueError, match="vision patch_dropout 0.5 needs a ViT"):
        validate(config)
    config = small_config()
    config.unmasked_tuning_steps = config.total_steps + 1
    with pytest.raises(ValueError, match=r"unmasked_tuning_steps must be >= 0 and at most total_steps \(10\); got 11"):
        validate(config)


def test_patch_dropout_does_not_change_which_model_a_workdir_holds():
    """A workdir resumes with another patch dropout, or from before the field existed; another width does not."""
    before = flip_model(0.0).config.to_dict()
    del before["vision"]["patch_dropout"]  # a model config saved before FLIP
    checkpointing.check_same_model(before, flip_model(0.5).config.to_dict(), "workdir")
    wider = flip_model(0.5).config.replace(vision={"width": 128}).to_dict()
    with pytest.raises(ValueError, match="width"):
        checkpointing.check_same_model(before, wider, "workdir")
