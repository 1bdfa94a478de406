"""Model tests: registry's model configs against open_clip's configs, scan/remat equivalence, bf16, logical axes."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import clip_jax
from clip_jax.models.layout import stack_layers

OPENAI_NAMES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


def _open_clip_model_configs() -> str:
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    return os.path.join(spec.submodule_search_locations[0], "model_configs")


@pytest.mark.parametrize("name", OPENAI_NAMES)
def test_registry_matches_open_clip_configs(name):
    with open(os.path.join(_open_clip_model_configs(), f"{name}.json")) as file:
        reference = json.load(file)
    config = clip_jax.get_model_config(name)
    vision, text = reference["vision_cfg"], reference["text_cfg"]
    assert config.embed_dim == reference["embed_dim"]
    assert config.vision.image_size == vision["image_size"]
    assert config.vision.width == vision["width"]
    assert config.vision.patch_size == vision.get("patch_size")
    layers = vision["layers"]
    assert config.vision.layers == (tuple(layers) if isinstance(layers, list) else layers)
    # open_clip: heads = width // head_width (64), and ResNet heads = width * 32 // 64.
    expected_heads = vision["width"] // 64 if vision.get("patch_size") else vision["width"] * 32 // 64
    assert config.vision.num_heads == expected_heads
    for field in ("context_length", "vocab_size", "width", "heads", "layers"):
        assert getattr(config.text, field) == text[field], field
    assert config.activation == "quick_gelu"  # OpenAI's released weights


def test_available_models_and_unknown_name():
    names = clip_jax.available_models()
    for name in OPENAI_NAMES + ["tiny-vit", "tiny-resnet"]:
        assert name in names
    with pytest.raises(ValueError, match="ViT-Q-99"):
        clip_jax.create_model("ViT-Q-99")
    with pytest.raises(ValueError, match="no_such_field"):
        clip_jax.create_model("tiny-vit", no_such_field=1)
    with pytest.raises(ValueError, match="swish"):
        clip_jax.create_model("tiny-vit", activation="swish")
    with pytest.raises(ValueError, match="patch_size 7"):
        clip_jax.create_model("tiny-vit", vision=dict(patch_size=7))


def test_overrides_reach_the_towers():
    model = clip_jax.create_model("tiny-vit", dtype="bfloat16", text=dict(vocab_size=123, pooling="last"))
    assert model.config.dtype == "bfloat16"
    assert model.config.text.vocab_size == 123 and model.config.text.pooling == "last"
    assert model.config.vision.width == clip_jax.get_model_config("tiny-vit").vision.width


def _inputs(config, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    texts = rng.integers(1, config.text.vocab_size - 1, size=(batch, config.text.context_length)).astype(np.int32)
    texts[np.arange(batch), rng.integers(2, config.text.context_length, size=batch)] = config.text.vocab_size - 1
    return images, texts


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet"])
def test_every_parameter_has_logical_axis_names(name):
    model = clip_jax.create_model(name)
    boxed = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))
    leaves = jax.tree_util.tree_leaves_with_path(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, (jax.tree_util.keystr(path), leaf.names, leaf.value.shape)
        assert all(isinstance(n, str) for n in leaf.names), jax.tree_util.keystr(path)


def _scanned_copy(variables, config):
    flat = traverse_util.flatten_dict(nn.unbox(variables))
    return traverse_util.unflatten_dict(stack_layers({k: np.asarray(v) for k, v in flat.items()}))


@pytest.mark.parametrize("remat_policy", ["none", "dots_saveable", "full"])
def test_scanned_model_equals_unrolled(remat_policy):
    unrolled = clip_jax.create_model("tiny-vit")
    scanned = clip_jax.create_model("tiny-vit", scan_layers=True, remat_policy=remat_policy)
    variables = nn.unbox(unrolled.init_variables(jax.random.key(1)))
    scanned_variables = _scanned_copy(variables, scanned.config)
    # The scanned model's own init gives the same tree structure as the stacked copy.
    own = jax.eval_shape(lambda: nn.unbox(scanned.init_variables(jax.random.key(1))))
    assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(scanned_variables)
    images, texts = _inputs(unrolled.config)

    def loss(model, v):
        out = model.apply(v, images, texts)
        logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), jnp.arange(3)]), out

    (loss_a, out_a), grads_a = jax.jit(jax.value_and_grad(lambda v: loss(unrolled, v), has_aux=True))(variables)
    (loss_b, out_b), grads_b = jax.jit(jax.value_and_grad(lambda v: loss(scanned, v), has_aux=True))(scanned_variables)
    for key in ("image_embeds", "text_embeds"):
        np.testing.assert_allclose(out_a[key], out_b[key], atol=1e-6, rtol=0)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    # Gradients: same up to float32 summation order (scan accumulates the per-layer sums differently);
    # the absolute floor covers the key bias, whose true gradient is 0 (softmax ignores it).
    grads_a = _scanned_copy(grads_a, scanned.config)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree_util.tree_leaves(grads_b)):
        scale = float(np.abs(a).max()) + 1e-12
        assert float(np.abs(a - b).max()) <= 1e-4 * scale + 1e-7, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet"])
def test_bfloat16_compute_stays_close_to_float32(name):
    """bf16 compute, fp32 params: normalised embeddings within 0.05 max abs (cosine > 0.995) of fp32."""
    fp32 = clip_jax.create_model(name)
    bf16 = clip_jax.create_model(name, dtype="bfloat16")
    variables = nn.unbox(fp32.init_variables(jax.random.key(2)))
    images, texts = _inputs(fp32.config)
    out_32 = jax.jit(fp32.apply)(variables, images, texts)
    out_16 = jax.jit(bf16.apply)(variables, images, texts)
    assert jax.tree_util.tree_leaves(variables)[0].dtype == jnp.float32
    for key in ("image_embeds", "text_embeds"):
        assert out_16[key].dtype == jnp.float32
        difference = float(jnp.max(jnp.abs(out_32[key] - out_16[key])))
        cosine = jnp.sum(out_32[key] * out_16[key], axis=-1)
        print(f"{name} {key}: bf16 vs fp32 max abs {difference:.4f}, min cosine {float(cosine.min()):.5f}")
        assert difference < 0.05
        assert float(cosine.min()) > 0.995
        assert difference > 0  # the bf16 path really computed in bf16


def test_layer_norm_runs_in_float32_under_bfloat16():
    from clip_jax.models.layers import LayerNorm

    x = (jnp.arange(64, dtype=jnp.float32).reshape(1, 64) * 1000.0 + 1e5).astype(jnp.bfloat16)
    norm = LayerNorm(dtype=jnp.bfloat16)
    variables = norm.init(jax.random.key(0), x)
    y = norm.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    reference = (x.astype(jnp.float32) - x.astype(jnp.float32).mean()) / jnp.sqrt(x.astype(jnp.float32).var() + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(reference), atol=2e-2)


def test_text_pooling_modes():
    """argmax pools at the largest id (CLIP's EOT); last pools at the last non-padding token."""
    argmax_model = clip_jax.create_model("tiny-vit")
    last_model = clip_jax.create_model("tiny-vit", text=dict(pooling="last", pad_id=0))
    variables = nn.unbox(argmax_model.init_variables(jax.random.key(3)))

    def encode(model, texts):
        return np.asarray(model.apply(variables, np.asarray(texts, np.int32), method=model.encode_text))

    padded = np.zeros((2, 16), np.int32)
    padded[0, :4] = [5, 6, 7, 999]  # EOT last: both modes pool position 3
    padded[1, :3] = [5, 900, 7]  # largest id at 1, last non-pad at 2
    by_argmax, by_last = encode(argmax_model, padded), encode(last_model, padded)
    np.testing.assert_allclose(by_argmax[0], by_last[0], atol=1e-6)
    assert np.abs(by_argmax[1] - by_last[1]).max() > 1e-3
    # Causal attention: tokens after the pooled position cannot change the embedding.
    np.testing.assert_allclose(by_last[1], encode(last_model, padded[1:, :3])[0], atol=1e-5)
    np.testing.assert_allclose(by_argmax[1], encode(argmax_model, padded[1:, :2])[0], atol=1e-5)


def test_wrong_image_size_is_a_clear_error():
    model = clip_jax.create_model("tiny-vit")
    variables = nn.unbox(model.init_variables(jax.random.key(0)))
    with pytest.raises(ValueError, match="48x48"):
        model.apply(variables, np.zeros((1, 48, 48, 3), np.float32), method=model.encode_image)
