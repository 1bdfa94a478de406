"""Tests of clip_jax.sharding: the mesh from the config, the logical-axis rules applied to the
models' parameters, batch placement and the early errors. No training step is compiled here."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from clip_jax import create_model
from clip_jax.sharding import (
    BATCH_AXES,
    LOGICAL_AXIS_RULES,
    batch_axis_size,
    batch_sharding,
    check_batch_divisible,
    make_mesh,
    param_shardings,
)


def mesh_config(data, fsdp, model):
    return {"data": data, "fsdp": fsdp, "model": model}


def test_make_mesh_fills_the_remaining_devices():
    mesh = make_mesh(mesh_config(-1, 2, 1))
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert batch_axis_size(mesh) == 8
    four = make_mesh(mesh_config(1, -1, 2), devices=jax.devices()[:4])
    assert dict(four.shape) == {"data": 1, "fsdp": 2, "model": 2}
    assert set(four.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, 2, 1), "6 devices but there are 8"),
        ((-1, 3, 1), "not a multiple"),
        ((-1, -1, 1), "at most one"),
        ((0, 8, 1), "positive"),
    ],
)
def test_make_mesh_rejects_a_mesh_that_does_not_match_the_devices(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(mesh_config(*sizes))


def test_batch_divisibility_error_names_both_numbers():
    mesh = make_mesh(mesh_config(2, 4, 1))
    check_batch_divisible(24, mesh)
    check_batch_divisible(32, mesh, accumulation_steps=4)
    with pytest.raises(ValueError, match=r"global batch size 20 .* 8 batch-axis devices"):
        check_batch_divisible(20, mesh)
    # 24 examples split over 8 devices leave 3 per device: not 2 micro-batches of equal size.
    with pytest.raises(ValueError, match=r"24 .* 8 batch-axis devices .* 2 micro-batches"):
        check_batch_divisible(24, mesh, accumulation_steps=2)


def test_batch_sharding_splits_the_leading_dimension_over_data_and_fsdp():
    mesh = make_mesh(mesh_config(2, 4, 1))
    assert batch_sharding(mesh).spec == P(BATCH_AXES)
    batch = jax.device_put(np.arange(16 * 3).reshape(16, 3), batch_sharding(mesh))
    shapes = {shard.data.shape for shard in batch.addressable_shards}
    assert shapes == {(2, 3)}
    # Each device holds different rows: the 8 shards together are the whole batch once.
    rows = sorted(int(shard.data[0, 0]) // 3 for shard in batch.addressable_shards)
    assert rows == [0, 2, 4, 6, 8, 10, 12, 14]


def test_activation_rules_shard_the_batch_and_keep_embed_whole():
    # Flax gives each mesh axis to one dimension only: "batch" takes fsdp first, so activations
    # are not split along embed, while parameters (no batch dimension) are.
    activation = nn.logical_to_mesh_axes(("batch", "length", "embed"), LOGICAL_AXIS_RULES)
    assert activation == P(("data", "fsdp"), None, None)
    assert nn.logical_to_mesh_axes(("embed", "mlp"), LOGICAL_AXIS_RULES) == P("fsdp", "model")


def _spec(shardings, path):
    node = shardings
    for name in path.split("/"):
        node = node[name]
    return node.spec


def test_param_shardings_of_a_vit_follow_the_rules():
    mesh = make_mesh(mesh_config(2, 2, 2))
    model = create_model("tiny-vit")
    boxed = jax.eval_shape(model.init_variables, jax.random.key(0))
    shardings = param_shardings(boxed, mesh)
    params = shardings["params"]
    assert _spec(params, "text/transformer/block_0/mlp/fc/kernel") == P("fsdp", "model")
    assert _spec(params, "text/transformer/block_0/mlp/proj/kernel") == P("model", "fsdp")
    assert _spec(params, "text/transformer/block_0/attn/query/kernel") == P("fsdp", "model", None)
    assert _spec(params, "text/token_embedding") == P("model", "fsdp")
    assert _spec(params, "text/positional_embedding") == P(None, "fsdp")
    assert _spec(params, "visual/patch_embedding") == P(None, None, None, "fsdp")
    assert _spec(params, "visual/projection") == P("fsdp", None)
    assert _spec(params, "visual/ln_pre/norm/scale") == P(None)
    assert _spec(params, "logit_scale") == P()
    # The tree matches the unboxed variables, leaf for leaf.
    unboxed = nn.unbox(boxed)
    assert jax.tree.structure(unboxed) == jax.tree.structure(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )


def test_scanned_layers_keep_the_layer_axis_whole():
    mesh = make_mesh(mesh_config(1, 4, 2))
    model = create_model("tiny-vit", scan_layers=True)
    shardings = param_shardings(jax.eval_shape(model.init_variables, jax.random.key(0)), mesh)
    assert _spec(shardings["params"], "text/transformer/blocks/mlp/fc/kernel") == P(None, "fsdp", "model")


def test_resnet_convolutions_and_batch_norm_statistics():
    mesh = make_mesh(mesh_config(1, 4, 2))
    model = create_model("tiny-resnet")
    shardings = param_shardings(jax.eval_shape(model.init_variables, jax.random.key(0)), mesh)
    # layer1's conv1 kernel is (1, 1, 16, 16): output channels over fsdp.
    assert _spec(shardings["params"], "visual/layer1_0/conv1/conv/kernel") == P(None, None, None, "fsdp")
    # BatchNorm statistics (along "norm") are replicated.
    statistics_spec = _spec(shardings["batch_stats"], "visual/layer1_0/conv1/bn/mean")
    assert all(entry is None for entry in statistics_spec)


def test_dimensions_the_mesh_does_not_divide_are_replicated():
    mesh = make_mesh(mesh_config(1, 4, 2))
    boxed = {
        "odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 8), jnp.float32), ("embed", "mlp")),
        "even": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 6), jnp.float32), ("embed", "mlp")),
    }
    shardings = param_shardings(boxed, mesh)
    assert shardings["odd"].spec == P(None, "model")  # 6 rows do not split 4 ways
    assert shardings["even"].spec == P("fsdp", "model")
