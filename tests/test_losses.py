"""Tests of clip_jax.losses: references against explicit loops, sharded losses and gradients
against the single-device ones on 1-D and 2-D meshes of 8 CPU devices, and memory of the ring."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import losses

GLOBAL_BATCH = 32
EMBED_DIM = 16
TOLERANCE = 1e-5
# (logit_scale, logit_bias): a moderate and a CLIP-at-convergence scale; SigLIP's initial bias.
SCALES_AND_BIASES = ((10.0, -10.0), (100.0, -3.0))
MESHES = {"data8": ((8,), ("data",)), "data2_fsdp4": ((2, 4), ("data", "fsdp"))}


def normalise(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def make_embeddings(seed: int = 0, batch: int = GLOBAL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm (batch, dim) pairs whose texts lean towards their images, like a trained model."""
    rng = np.random.default_rng(seed)
    images = normalise(rng.normal(size=(batch, EMBED_DIM)))
    texts = normalise(images + 1.2 * rng.normal(size=(batch, EMBED_DIM)))
    return images.astype(np.float32), texts.astype(np.float32)


def relative_difference(actual, expected) -> float:
    """Largest absolute difference, relative to the largest magnitude of the expected array."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# ---- independent references: float64 explicit loops ------------------------------------------


def loop_logits(images, texts, scale, bias=0.0) -> list[list[float]]:
    def dot(image, text):
        return math.fsum(float(a) * float(b) for a, b in zip(image, text))

    return [[scale * dot(image, text) + bias for text in texts] for image in images]


def loop_softmax_loss(images, texts, scale) -> float:
    logits = loop_logits(images, texts, scale)
    batch = len(logits)

    def cross_entropy(row, target):
        peak = max(row)
        return peak + math.log(math.fsum(math.exp(value - peak) for value in row)) - row[target]

    image_to_text = sum(cross_entropy(logits[i], i) for i in range(batch)) / batch
    columns = [[logits[i][j] for i in range(batch)] for j in range(batch)]
    text_to_image = sum(cross_entropy(columns[j], j) for j in range(batch)) / batch
    return (image_to_text + text_to_image) / 2


def loop_sigmoid_loss(images, texts, scale, bias) -> float:
    logits = loop_logits(images, texts, scale, bias)
    batch = len(logits)
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            signed = logits[i][j] if i == j else -logits[i][j]
            # -log(sigmoid(t)) = log(1 + exp(-t)), written to stay finite for large |t|.
            total += max(-signed, 0.0) + math.log1p(math.exp(-abs(signed)))
    return total / batch


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_softmax_reference_matches_explicit_loops(scale):
    images, texts = make_embeddings(seed=1)
    expected = loop_softmax_loss(images, texts, scale)
    actual = losses.softmax_contrastive_loss(images, texts, scale)
    print(f"softmax scale {scale}: loss {float(actual):.6f}, loops {expected:.6f}")
    assert actual.dtype == jnp.float32
    assert relative_difference(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("scale, bias", [(1.0, 0.0), (10.0, -10.0), (100.0, -3.0)])
def test_sigmoid_reference_matches_explicit_loops(scale, bias):
    images, texts = make_embeddings(seed=2)
    expected = loop_sigmoid_loss(images, texts, scale, bias)
    actual = losses.sigmoid_contrastive_loss(images, texts, scale, bias)
    print(f"sigmoid scale {scale} bias {bias}: loss {float(actual):.6f}, loops {expected:.6f}")
    assert relative_difference(actual, expected) <= TOLERANCE


def test_references_accept_bfloat16_embeddings_and_compute_in_float32():
    images, texts = make_embeddings(seed=3)
    images16, texts16 = jnp.asarray(images, jnp.bfloat16), jnp.asarray(texts, jnp.bfloat16)
    loss = losses.softmax_contrastive_loss(images16, texts16, 10.0)
    expected = loop_softmax_loss(np.asarray(images16, np.float32), np.asarray(texts16, np.float32), 10.0)
    assert loss.dtype == jnp.float32
    assert relative_difference(loss, expected) <= TOLERANCE


def test_in_batch_accuracy_counts_rows_whose_best_match_is_their_pair():
    images, texts = make_embeddings(seed=4)
    similarity = images.astype(np.float64) @ texts.astype(np.float64).T
    batch = len(images)
    image_hits = sum(max(range(batch), key=lambda j: similarity[i, j]) == i for i in range(batch))
    text_hits = sum(max(range(batch), key=lambda i: similarity[i, j]) == j for j in range(batch))
    # The data must make the two directions differ, or a swapped axis would go unnoticed.
    assert 0 < image_hits < batch and image_hits != text_hits
    image_to_text, text_to_image = losses.in_batch_accuracy(images, texts)
    assert float(image_to_text) == pytest.approx(image_hits / batch)
    assert float(text_to_image) == pytest.approx(text_hits / batch)


def test_sharded_in_batch_accuracy_matches_single_device():
    images, texts = make_embeddings(seed=4)
    mesh = jax.make_mesh(*MESHES["data2_fsdp4"])
    axes = ("data", "fsdp")
    accuracy = jax.shard_map(
        functools.partial(losses.sharded_in_batch_accuracy, axis_names=axes),
        mesh=mesh,
        in_specs=(P(axes), P(axes)),
        out_specs=(P(), P()),
    )
    placement = NamedSharding(mesh, P(axes))
    sharded = accuracy(jax.device_put(images, placement), jax.device_put(texts, placement))
    single = losses.in_batch_accuracy(images, texts)
    assert [float(value) for value in sharded] == [float(value) for value in single]


# ---- sharded losses against the single-device reference on the same global batch --------------


def reference_loss(loss: str):
    if loss == "softmax":
        return lambda images, texts, scale, _: losses.softmax_contrastive_loss(images, texts, scale)
    return losses.sigmoid_contrastive_loss


@functools.cache
def single_device_value_and_gradients(loss: str, scale: float, bias: float):
    images, texts = make_embeddings()
    step = jax.jit(jax.value_and_grad(reference_loss(loss), argnums=(0, 1, 2, 3)))
    return step(images, texts, jnp.float32(scale), jnp.float32(bias))


@functools.cache
def compiled_sharded_step(mesh_name: str, loss: str, impl: str):
    shape, axes = MESHES[mesh_name]
    loss_fn = losses.make_sharded_loss_fn(jax.make_mesh(shape, axes), axes, loss=loss, impl=impl)
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))


@functools.cache
def sharded_value_and_gradients(mesh_name: str, loss: str, impl: str, scale: float, bias: float):
    images, texts = make_embeddings()
    step = compiled_sharded_step(mesh_name, loss, impl)
    return step(images, texts, jnp.float32(scale), jnp.float32(bias))


GRADIENT_NAMES = ("image_embeds", "text_embeds", "logit_scale", "logit_bias")


@pytest.mark.parametrize("impl", losses.IMPLEMENTATIONS)
@pytest.mark.parametrize("loss", losses.LOSSES)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_sharded_loss_and_gradients_match_single_device(mesh_name, loss, impl):
    for scale, bias in SCALES_AND_BIASES:
        value, gradients = sharded_value_and_gradients(mesh_name, loss, impl, scale, bias)
        expected_value, expected_gradients = single_device_value_and_gradients(loss, scale, bias)
        differences = {"loss": relative_difference(value, expected_value)}
        for name, gradient, expected in zip(GRADIENT_NAMES, gradients, expected_gradients):
            assert gradient.shape == expected.shape, name
            if loss == "softmax" and name == "logit_bias":
                # The softmax is blind to a shared shift of the logits.
                assert float(gradient) == 0.0 and float(expected) == 0.0
                continue
            differences[name] = relative_difference(gradient, expected)
        print(f"{mesh_name} {loss} {impl} scale {scale}: max relative difference", differences)
        assert max(differences.values()) <= TOLERANCE, differences


@pytest.mark.parametrize("loss", losses.LOSSES)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_ring_agrees_with_all_gather(mesh_name, loss):
    for scale, bias in SCALES_AND_BIASES:
        ring_value, ring_gradients = sharded_value_and_gradients(mesh_name, loss, "ring", scale, bias)
        gather_value, gather_gradients = sharded_value_and_gradients(mesh_name, loss, "all_gather", scale, bias)
        differences = [relative_difference(ring_value, gather_value)]
        for ring_gradient, gather_gradient in zip(ring_gradients, gather_gradients):
            if np.all(np.asarray(gather_gradient) == 0):  # the softmax's bias gradient
                assert np.all(np.asarray(ring_gradient) == 0)
                continue
            differences.append(relative_difference(ring_gradient, gather_gradient))
        print(f"{mesh_name} {loss} scale {scale}: ring vs all_gather max relative difference", max(differences))
        assert max(differences) <= TOLERANCE


def test_wrapper_places_inputs_on_a_mesh_with_auto_axes():
    images, texts = make_embeddings()
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
    loss_fn = losses.make_sharded_loss_fn(mesh, ("data", "fsdp"), loss="sigmoid", impl="ring")
    value = jax.jit(loss_fn)(images, texts, 10.0, -10.0)
    assert relative_difference(value, loop_sigmoid_loss(images, texts, 10.0, -10.0)) <= TOLERANCE


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_loss_or_impl_is_rejected_by_name():
    images, texts = make_embeddings()
    mesh = jax.make_mesh(*MESHES["data8"])
    with pytest.raises(ValueError, match="cosine"):
        losses.sharded_contrastive_loss(images, texts, 1.0, 0.0, loss="cosine", axis_names="data", impl="ring")
    with pytest.raises(ValueError, match="tree_reduce"):
        losses.sharded_contrastive_loss(images, texts, 1.0, 0.0, loss="softmax", axis_names="data", impl="tree_reduce")
    with pytest.raises(ValueError, match="cosine"):
        losses.make_sharded_loss_fn(mesh, "data", loss="cosine")
    with pytest.raises(ValueError, match="tree_reduce"):
        losses.make_sharded_loss_fn(mesh, "data", impl="tree_reduce")


def test_bad_axes_batch_and_shapes_are_rejected():
    images, texts = make_embeddings()
    mesh = jax.make_mesh(*MESHES["data8"])
    with pytest.raises(ValueError, match="model"):
        losses.make_sharded_loss_fn(mesh, ("data", "model"))
    loss_fn = losses.make_sharded_loss_fn(mesh, "data")
    with pytest.raises(ValueError, match="30"):
        loss_fn(images[:30], texts[:30], 10.0)
    with pytest.raises(ValueError, match="logit_bias"):
        losses.make_sharded_loss_fn(mesh, "data", loss="sigmoid")(images, texts, 10.0)
    with pytest.raises(ValueError, match=r"\(32, 8\)"):
        losses.softmax_contrastive_loss(images, texts[:, :8], 10.0)


# ---- memory: the ring's temporary memory does not grow with the global batch -------------------


def test_ring_memory_stays_flat_as_the_global_batch_grows():
    local_batch = 256
    temporary_bytes = {}
    for num_devices in (4, 8):
        mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])
        embeddings = jax.ShapeDtypeStruct((num_devices * local_batch, EMBED_DIM), jnp.float32)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        for impl in losses.IMPLEMENTATIONS:
            loss_fn = losses.make_sharded_loss_fn(mesh, "data", loss="softmax", impl=impl)
            compiled = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2))).lower(embeddings, embeddings, scalar).compile()
            analysis = compiled.memory_analysis()
            if analysis is None:
                pytest.skip("this backend reports no memory analysis")
            temporary_bytes[impl, num_devices] = analysis.temp_size_in_bytes
    print(f"per-device temporary bytes of the softmax gradient, local batch {local_batch}:", temporary_bytes)
    # Doubling the global batch doubles the gathered logits but leaves the ring's blocks alone.
    assert temporary_bytes["all_gather", 8] >= 1.8 * temporary_bytes["all_gather", 4]
    assert temporary_bytes["ring", 8] <= 1.2 * temporary_bytes["ring", 4]
    assert temporary_bytes["ring", 8] * 4 < temporary_bytes["all_gather", 8]
