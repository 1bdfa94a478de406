"""Tests of the optimizer, the sharded train state and the train step: on 8 virtual CPU devices the
sharded step's loss and gradients equal those of the single-device loss on the same global batch,
for both losses, both loss implementations, data-parallel and FSDP meshes, and with GradCache
accumulation."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import create_model, losses
from clip_jax.evaluation.features import Encoder
from clip_jax.sharding import batch_sharding, make_mesh
from clip_jax.training.config import LossSettings, NonFiniteSettings, OptimizerSettings, StepSettings
from clip_jax.training.optimizer import learning_rate_schedule, make_optimizer, regex_mask
from clip_jax.training.state import abstract_train_state, create_train_state
from clip_jax.training.step import make_train_step

# The programs here are tiny and run once: XLA's LLVM optimisation is most of their compile time
# on CPU and buys nothing, so the tests compile without it (numerics stay IEEE float32).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
WARMUP_STEPS = 4
NO_DECAY_REGEX = r"(bias|norm|scale|embedding|logit_scale|logit_bias)"
RELATIVE_TOLERANCE = 1e-5


def make_config(
    loss="softmax", impl="all_gather", mesh=(8, 1, 1), accumulation_steps=1, policy="skip", train_batch_norm=False,
    global_batch_size=BATCH_SIZE, **optimizer,
):  # fmt: skip
    """The settings a test step runs with: `.step` (StepSettings), `.optimizer`, `.mesh`, `.seed`."""
    optimizer_settings = OptimizerSettings(
        **{
            "learning_rate": LEARNING_RATE,
            "warmup_steps": WARMUP_STEPS,
            "total_steps": 20,
            # b1 = 0: Adam's first moment after one step is the gradient itself, which is how the
            # tests read the gradient the step computed.
            "b1": 0.0,
            "b2": 0.98,
            "eps": 1e-6,
            "weight_decay": 0.2,
            "no_decay_regex": NO_DECAY_REGEX,
            "grad_clip_norm": 0.0,
            "freeze_regex": "",
            **optimizer,
        }
    )
    step = StepSettings(
        global_batch_size=global_batch_size,
        optimizer=optimizer_settings,
        loss=LossSettings(name=loss, impl=impl, max_logit_scale=100.0),
        nonfinite=NonFiniteSettings(policy=policy, max_consecutive_skips=10),
        accumulation_steps=accumulation_steps,
        train_batch_norm=train_batch_norm,
    )
    # The optimizer is built once and travels with the state; a compiled step takes states
    # carrying this very optimizer.
    tx = make_optimizer(optimizer_settings)
    mesh = dict(zip(("data", "fsdp", "model"), mesh))
    return types.SimpleNamespace(step=step, optimizer=optimizer_settings, tx=tx, mesh=mesh, seed=0)


def create_state(config, model, mesh):
    return create_train_state(model, config.tx, config.seed, mesh)


def abstract_state(config, model, mesh):
    return abstract_train_state(model, config.tx, config.seed, mesh)


def vit_model():
    # One layer per tower keeps compilation short; the logit bias lets one set of parameters serve
    # both losses (the softmax loss ignores it).
    return create_model("tiny-vit", logit_bias_init=-10.0, vision=dict(layers=1), text=dict(layers=1))


def random_batch(model, seed=0):
    rng = np.random.default_rng(seed)
    size = model.config.vision.image_size
    images = rng.normal(size=(BATCH_SIZE, size, size, 3)).astype(np.float32)
    texts = rng.integers(1, model.config.text.vocab_size, size=(BATCH_SIZE, model.config.text.context_length))
    return images, texts.astype(np.int32)


def on_mesh(images, texts, mesh):
    return jax.device_put({"images": images, "texts": texts}, batch_sharding(mesh))


def gradients_from_first_step(state):
    """With b1 = 0, Adam's first moment after the first update is exactly the gradient."""
    return jax.device_get(optax.tree_utils.tree_get(state.opt_state, "mu"))


def assert_trees_close(actual, expected, tolerance=RELATIVE_TOLERANCE):
    """Whole-tree relative difference <= tolerance, and per leaf relative to its own norm (or to a
    thousandth of the whole norm for leaves that are zero in theory, such as attention key
    biases, whose gradient is pure rounding noise)."""
    actual_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(actual)]
    expected_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(expected)]
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    total = math.sqrt(sum(np.sum(e**2) for e in expected_leaves))
    difference = math.sqrt(sum(np.sum((a - e) ** 2) for a, e in zip(actual_leaves, expected_leaves)))
    assert difference <= tolerance * total, f"relative difference {difference / total:.3g}"
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(expected)]
    for path, a, e in zip(paths, actual_leaves, expected_leaves):
        scale = max(np.linalg.norm(e), 1e-3 * total)
        assert np.linalg.norm(a - e) <= tolerance * scale, f"{path}: {np.linalg.norm(a - e) / scale:.3g}"


def clamped_scale(params):
    # open_clip clamps the log-temperature to [0, ln 100] (`logit_scale.clamp_(0, math.log(100))`).
    return jnp.exp(jnp.clip(params["logit_scale"], 0.0, jnp.log(100.0)))


def make_vit_reference(model):
    """Single-device loss, gradients and in-batch accuracy of both losses, written from the
    reference losses and the model alone."""

    def loss(params, images, texts, name):
        outputs = model.apply({"params": params}, images, texts)
        image_embeds, text_embeds = outputs["image_embeds"], outputs["text_embeds"]
        if name == "softmax":
            value = losses.softmax_contrastive_loss(image_embeds, text_embeds, clamped_scale(params))
        else:
            value = losses.sigmoid_contrastive_loss(
                image_embeds, text_embeds, clamped_scale(params), params["logit_bias"]
            )
        return value, (losses.in_batch_accuracy(image_embeds, text_embeds), (image_embeds, text_embeds))

    def reference(params, images, texts):
        results = {}
        for name in losses.LOSSES:
            (value, (accuracy, embeddings)), gradients = jax.value_and_grad(loss, has_aux=True)(
                params, images, texts, name
            )
            results[name] = (value, gradients, accuracy)
        results["embeddings"] = embeddings
        return results

    return reference


@pytest.fixture(scope="module")
def vit():
    """The model, a batch, the initial state created on an FSDP mesh and its host copy, and the
    single-device reference (compiled once, on one device)."""
    model = vit_model()
    images, texts = random_batch(model)
    config = make_config(mesh=(2, 4, 1))
    mesh = make_mesh(config.mesh)
    state, state_shardings = create_state(config, model, mesh)
    host_state = jax.device_get(state)
    device = jax.devices()[0]
    reference_inputs = jax.device_put((host_state.params, images, texts), device)
    reference = jax.jit(make_vit_reference(model)).lower(*reference_inputs).compile(FAST_COMPILE)
    return dict(
        model=model,
        images=images,
        texts=texts,
        state=state,
        state_shardings=state_shardings,
        host_state=host_state,
        reference=reference,
        device=device,
    )


# ---- optimizer ---------------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_decays_as_a_cosine():
    schedule = learning_rate_schedule(OptimizerSettings(learning_rate=1.0, warmup_steps=4, total_steps=12))
    # As open_clip: (step + 1) / warmup during warmup, then a half cosine over the remaining 8.
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: (1 + math.cos(math.pi / 4)) / 2, 8: 0.5, 12: 0.0}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step
    with pytest.raises(ValueError, match=r"optimizer.warmup_steps must be >= 0 and below total_steps \(12\); got 12"):
        OptimizerSettings(learning_rate=1.0, warmup_steps=12, total_steps=12)


def toy_params():
    ones = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
    return {
        "visual": {"conv": {"kernel": ones(2, 2)}, "ln_pre": {"norm": {"scale": ones(2)}}},
        "text": {"proj": {"kernel": ones(2, 2), "bias": ones(2)}, "token_embedding": ones(3, 2)},
        "logit_scale": jnp.ones((), jnp.float32),
    }


def test_regex_mask_matches_slash_joined_paths():
    mask = regex_mask(toy_params(), r"^text/.*kernel")
    assert mask["text"]["proj"]["kernel"] and not mask["visual"]["conv"]["kernel"]
    assert not any(jax.tree.leaves(regex_mask(toy_params(), "")))


def test_weight_decay_mask_and_freeze_regex_select_the_right_leaves():
    config = make_config(warmup_steps=0, weight_decay=0.5, learning_rate=0.1, freeze_regex="^visual/", total_steps=10)
    optimizer = config.tx
    params = toy_params()
    state = optimizer.init(params)
    # Zero gradients: Adam's step is 0, so only decoupled weight decay moves a parameter, by
    # learning_rate * weight_decay * value = 0.05 at step 0 (the cosine starts at its peak).
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    assert float(new["text"]["proj"]["kernel"][0, 0]) == pytest.approx(0.95)
    for undecayed in (new["text"]["proj"]["bias"], new["text"]["token_embedding"], new["logit_scale"]):
        np.testing.assert_array_equal(undecayed, 1.0)
    # Frozen: the visual kernel is neither decayed nor moved by a gradient.
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["visual"]["conv"]["kernel"], 1.0)
    np.testing.assert_array_equal(new["visual"]["ln_pre"]["norm"]["scale"], 1.0)
    assert float(new["text"]["proj"]["bias"][0]) < 1.0


def test_a_freeze_regex_matching_nothing_is_an_error():
    optimizer = make_config(freeze_regex="^vision/", total_steps=10).tx
    with pytest.raises(ValueError, match=r"freeze_regex '\^vision/' matches no parameter"):
        optimizer.init(toy_params())


def test_gradients_are_clipped_by_their_global_norm():
    optimizer = make_config(grad_clip_norm=1.0, b1=0.0, total_steps=10).tx
    params = {"w": jnp.zeros(4)}
    _, state = optimizer.update({"w": jnp.full(4, 3.0)}, optimizer.init(params), params)
    # The gradient (norm 6) is scaled to norm 1 before Adam sees it.
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], np.full(4, 0.5), rtol=1e-6)


# ---- state -------------------------------------------------------------------------------------


def test_state_is_created_sharded_over_fsdp(vit):
    state = vit["state"]
    kernel = state.params["text"]["transformer"]["block_0"]["mlp"]["fc"]["kernel"]  # (64, 256)
    assert kernel.sharding.spec == P("fsdp", "model")
    # The (2, 4, 1) mesh: each device holds a quarter of the rows, and the 4 fsdp shards differ.
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(16, 256)}
    assert {shard.index[0].start for shard in kernel.addressable_shards} == {0, 16, 32, 48}
    second_moments = optax.tree_utils.tree_get(state.opt_state, "nu")
    assert second_moments["text"]["transformer"]["block_0"]["mlp"]["fc"]["kernel"].sharding.spec == P("fsdp", "model")
    assert int(state.step) == 0 and state.batch_stats == {}
    assert state.rng.dtype == jnp.uint32


def test_abstract_state_has_shapes_and_shardings_and_float32_master_weights():
    model = create_model("tiny-vit", dtype="bfloat16")
    config = make_config(mesh=(1, 8, 1))
    abstract, shardings = abstract_state(config, model, make_mesh(config.mesh))
    projection = abstract.params["visual"]["projection"]
    assert projection.shape == (64, 32) and projection.dtype == jnp.float32
    assert projection.sharding == shardings.params["visual"]["projection"]
    assert projection.sharding.spec == P("fsdp", None)


# ---- the step ----------------------------------------------------------------------------------


def state_on(host_state, config, model, mesh):
    _, shardings = abstract_state(config, model, mesh)
    host_state = host_state.replace(tx=shardings.tx)
    return jax.device_put(host_state, shardings), shardings


# (loss, (data, fsdp, model) mesh, loss implementation, micro-batches). Three cases carry a twist
# that costs no extra compilation: a temperature beyond either end of the clamp, and a frozen image
# tower (LiT).
CASES = {
    "softmax-data_parallel-all_gather-negative_temperature": ("softmax", (8, 1, 1), "all_gather", 1),
    "sigmoid-data_parallel-ring-clamped_temperature": ("sigmoid", (8, 1, 1), "ring", 1),
    "softmax-fsdp-ring-frozen_image_tower": ("softmax", (2, 4, 1), "ring", 1),
    "sigmoid-fsdp-all_gather": ("sigmoid", (2, 4, 1), "all_gather", 1),
    "softmax-fsdp-4_micro_batches": ("softmax", (2, 4, 1), "all_gather", 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_equals_the_single_device_loss_and_gradients(vit, case):
    loss, mesh_shape, impl, accumulation_steps = CASES[case]
    model, host_state = vit["model"], vit["host_state"]
    clamped, frozen = case.endswith("clamped_temperature"), case.endswith("frozen_image_tower")
    negative = case.endswith("negative_temperature")
    if clamped:
        # A temperature beyond the clamp: the forward uses 100 and the parameter is clamped back.
        host_state = host_state.replace(params={**host_state.params, "logit_scale": np.float32(np.log(200.0))})
    if negative:
        # A log-temperature below 0: the forward uses a scale of 1 and the parameter is clamped to 0.
        host_state = host_state.replace(params={**host_state.params, "logit_scale": np.float32(-1.0)})
    config = make_config(loss, impl, mesh_shape, accumulation_steps, freeze_regex="^visual/" if frozen else "")
    mesh = make_mesh(config.mesh)
    if frozen:  # the optimizer state of a frozen tower is empty: start from zeros of its shape
        abstract, _ = abstract_state(config, model, mesh)
        zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract.opt_state)
        host_state = host_state.replace(opt_state=zeros)
    state, shardings = state_on(host_state, config, model, mesh)
    batch = on_mesh(vit["images"], vit["texts"], mesh)
    train_step = make_train_step(model, config.step, mesh, shardings).lower(state, batch).compile(FAST_COMPILE)
    new_state, metrics = train_step(state, batch)

    reference = vit["reference"](*jax.device_put((host_state.params, vit["images"], vit["texts"]), vit["device"]))
    expected_loss, expected_gradients, (expected_i2t, expected_t2i) = jax.device_get(reference[loss])
    assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=RELATIVE_TOLERANCE)
    gradients = gradients_from_first_step(new_state)
    if frozen:
        visual_after = jax.device_get(new_state.params["visual"])
        for before, after in zip(jax.tree.leaves(host_state.params["visual"]), jax.tree.leaves(visual_after)):
            np.testing.assert_array_equal(before, after)
        assert not jax.tree.leaves(gradients["visual"])  # no optimizer state for the frozen tower
        # The text tower and the temperature still get their full gradient.
        gradients = {name: value for name, value in gradients.items() if name != "visual"}
        expected_gradients = {name: value for name, value in expected_gradients.items() if name != "visual"}
    assert_trees_close(gradients, expected_gradients)
    expected_norm = optax.tree.norm(expected_gradients)
    assert float(metrics["grad_norm"]) == pytest.approx(float(expected_norm), rel=RELATIVE_TOLERANCE)
    # Accuracies may differ by one near-tie flipped by rounding.
    assert abs(float(metrics["accuracy_image_to_text"]) - float(expected_i2t)) <= 1 / BATCH_SIZE + 1e-6
    assert abs(float(metrics["accuracy_text_to_image"]) - float(expected_t2i)) <= 1 / BATCH_SIZE + 1e-6
    assert float(metrics["learning_rate"]) == pytest.approx(LEARNING_RATE / WARMUP_STEPS)
    assert int(new_state.step) == 1
    if clamped:
        assert float(metrics["logit_scale"]) == pytest.approx(100.0, rel=1e-6)
        assert float(expected_gradients["logit_scale"]) == 0.0
        assert float(new_state.params["logit_scale"]) == pytest.approx(math.log(100.0), rel=1e-6)
        assert float(metrics["logit_bias"]) == pytest.approx(-10.0)
    elif negative:
        assert float(metrics["logit_scale"]) == 1.0
        assert float(expected_gradients["logit_scale"]) == 0.0
        assert float(new_state.params["logit_scale"]) == 0.0
    else:
        assert float(metrics["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-6)
    # The state was donated: its buffers now belong to the new state.
    assert state.params["logit_scale"].is_deleted()
    # The new state keeps the layout of the old.
    kernel = new_state.params["text"]["transformer"]["block_0"]["mlp"]["fc"]["kernel"]
    assert kernel.sharding == shardings.params["text"]["transformer"]["block_0"]["mlp"]["fc"]["kernel"]


def assert_trees_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(expected)]
    for path, a, e in zip(paths, jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert np.array_equal(np.asarray(a), np.asarray(e)), path


def poisoned(images, row=5):
    """`images` with one NaN image: its embedding, then every logit of the contrastive loss, is NaN."""
    images = np.array(images)
    images[row] = np.nan
    return images


@pytest.mark.parametrize("accumulation_steps, policy", [(1, "skip"), (4, "stop")])
def test_a_non_finite_step_leaves_the_state_as_it_was_and_is_counted(vit, accumulation_steps, policy):
    model = vit["model"]
    config = make_config(mesh=(2, 4, 1), accumulation_steps=accumulation_steps, policy=policy)
    mesh = make_mesh(config.mesh)
    state, shardings = state_on(vit["host_state"], config, model, mesh)
    batch = on_mesh(vit["images"], vit["texts"], mesh)
    nan_batch = on_mesh(poisoned(vit["images"]), vit["texts"], mesh)
    train_step = make_train_step(model, config.step, mesh, shardings).lower(state, batch).compile(FAST_COMPILE)
    before = jax.device_get(state)

    for skipped in (1, 2):
        state, metrics = train_step(state, nan_batch)
        after = jax.device_get(state)
        for field in ("params", "opt_state", "batch_stats", "rng"):
            assert_trees_bitwise_equal(getattr(after, field), getattr(before, field))
        # The step counter still advances, so the data position and the loop's step stay aligned.
        assert int(after.step) == skipped
        assert int(after.skipped_steps) == int(after.consecutive_skipped_steps) == skipped
        assert float(metrics["nonfinite"]) == 1.0 and float(metrics["skipped_steps"]) == skipped
        assert not np.isfinite(float(metrics["loss"]))  # the step's own loss is reported as it was

    state, metrics = train_step(state, batch)
    after = jax.device_get(state)
    assert float(metrics["nonfinite"]) == 0.0 and int(after.step) == 3
    if policy == "skip":
        # Applied, and reset the run of skips; the optimizer never saw the skipped steps, so this
        # update is bit for bit the first update of a fresh state on the same batch.
        assert int(after.consecutive_skipped_steps) == 0 and int(after.skipped_steps) == 2
        fresh, _ = state_on(vit["host_state"], config, model, mesh)
        expected, expected_metrics = train_step(fresh, batch)
        expected = jax.device_get(expected)
        assert_trees_bitwise_equal(after.params, expected.params)
        assert_trees_bitwise_equal(after.opt_state, expected.opt_state)
        assert float(metrics["learning_rate"]) == float(expected_metrics["learning_rate"])
    else:
        # "stop": after the first non-finite step nothing is applied until the loop stops the run.
        assert int(after.consecutive_skipped_steps) == int(after.skipped_steps) == 3
        assert_trees_bitwise_equal(after.params, before.params)
        assert_trees_bitwise_equal(after.opt_state, before.opt_state)


def resnet_host_state(model, config, mesh, seed=1):
    """Random parameters and BatchNorm statistics of a tiny ResNet filled on the host: cheaper than
    compiling the model's initialiser, and any values serve the comparison."""
    abstract, _ = abstract_state(config, model, mesh)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda leaf: rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype), abstract.params)
    batch_stats = {
        "visual": jax.tree.map(
            lambda leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype), abstract.batch_stats["visual"]
        )
    }
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
    return zeros.replace(params=params, batch_stats=batch_stats)


def test_resnet_batch_norm_statistics_flow_through_the_step():
    model = create_model("tiny-resnet", vision=dict(image_size=32), text=dict(layers=1))
    config = make_config("softmax", "all_gather", (2, 4, 1), train_batch_norm=True)
    mesh = make_mesh(config.mesh)
    host_state = resnet_host_state(model, config, mesh)
    state, shardings = state_on(host_state, config, model, mesh)
    images, texts = random_batch(model, seed=2)
    batch = on_mesh(images, texts, mesh)
    train_step = make_train_step(model, config.step, mesh, shardings).lower(state, batch).compile(FAST_COMPILE)
    new_state, metrics = train_step(state, batch)

    def reference_loss(params, batch_stats, images, texts):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, texts, train=True, mutable=["batch_stats"]
        )
        value = losses.softmax_contrastive_loss(outputs["image_embeds"], outputs["text_embeds"], clamped_scale(params))
        return value, updates["batch_stats"]

    # Forward only: the gradient machinery is the ViT's, checked above; compiling the ResNet's
    # backward twice would double this test's time.
    inputs = jax.device_put((host_state.params, host_state.batch_stats, images, texts), jax.devices()[0])
    reference = jax.jit(reference_loss).lower(*inputs).compile(FAST_COMPILE)
    expected_loss, expected_batch_stats = jax.device_get(reference(*inputs))
    # Batch statistics over the global batch (XLA reduces them across devices), as on one device.
    assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=RELATIVE_TOLERANCE)
    assert_trees_close(jax.device_get(new_state.batch_stats), expected_batch_stats)
    old_mean = host_state.batch_stats["visual"]["stem1"]["bn"]["mean"]
    assert not np.allclose(jax.device_get(new_state.batch_stats["visual"]["stem1"]["bn"]["mean"]), old_mean)

    # A non-finite batch leaves the statistics (and the rest of the state) as they were.
    before = jax.device_get(new_state)
    skipped_state, metrics = train_step(new_state, on_mesh(poisoned(images), texts, mesh))
    assert_trees_bitwise_equal(jax.device_get(skipped_state.batch_stats), before.batch_stats)
    assert_trees_bitwise_equal(jax.device_get(skipped_state.params), before.params)
    assert float(metrics["nonfinite"]) == 1.0


def test_eval_embeddings_on_the_training_mesh_equal_the_single_device_ones(vit):
    # train.py evaluates with the suite's Encoder on the training mesh and the sharded training state.
    model, host_state = vit["model"], vit["host_state"]
    mesh = make_mesh({"data": 2, "fsdp": 4, "model": 1})
    variables = {"params": jax.device_put(host_state.params, vit["state_shardings"].params)}
    images, texts = np.asarray(vit["images"]), np.asarray(vit["texts"])
    encoder = Encoder(model, variables, mesh=mesh, batch_size=len(images))
    image_embeds, text_embeds = encoder.encode_images(images), encoder.encode_texts(texts)
    reference = vit["reference"](*jax.device_put((host_state.params, vit["images"], vit["texts"]), vit["device"]))
    expected_image_embeds, expected_text_embeds = jax.device_get(reference["embeddings"])
    np.testing.assert_allclose(image_embeds, expected_image_embeds, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text_embeds, expected_text_embeds, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(image_embeds, axis=1), 1.0, rtol=1e-5)


def test_configuration_errors_are_raised_before_compiling(vit):
    mesh = make_mesh({"data": 8, "fsdp": 1, "model": 1})
    shardings = vit["state_shardings"]
    no_bias = create_model("tiny-vit")
    with pytest.raises(ValueError, match="sigmoid loss needs a model with a learned logit bias"):
        make_train_step(no_bias, make_config("sigmoid").step, mesh, shardings)
    with pytest.raises(ValueError, match="loss.name must be one of .*; got 'cosine'"):
        make_config("cosine")
    with pytest.raises(ValueError, match="global batch size 20 is not divisible by the 8 batch-axis devices"):
        make_train_step(vit["model"], make_config(global_batch_size=20).step, mesh, shardings)
    # 3 examples per device cannot form 2 equal micro-batches
    with pytest.raises(ValueError, match="2 micro-batches"):
        make_train_step(vit["model"], make_config(accumulation_steps=2, global_batch_size=24).step, mesh, shardings)
