"""One process of tests/test_multislice.py: a "slice" of 4 CPU devices. Two such processes, joined
by jax.distributed with gloo collectives, stand for a 2-slice job: the mesh is built by
`sharding.make_mesh` with `dcn_data=2`, whose slices are processes off TPU (the gloo link plays
the data-centre network). Prints one JSON line: where each slice landed on the mesh, and the
sharded contrastive losses and gradients next to the single-device references."""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from clip_jax import losses, sharding  # noqa: E402

mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "model": 1, "dcn_data": 2})
rng = np.random.default_rng(0)  # the same embeddings in both processes
batch, dim = 32, 16
images = rng.normal(size=(batch, dim)).astype(np.float32)
texts = (images + 1.2 * rng.normal(size=(batch, dim))).astype(np.float32)
images /= np.linalg.norm(images, axis=1, keepdims=True)
texts /= np.linalg.norm(texts, axis=1, keepdims=True)
scale, bias = jnp.float32(10.0), jnp.float32(-10.0)

batch_sharding = sharding.batch_sharding(mesh)


def global_array(rows: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(rows.shape, batch_sharding, lambda index: rows[index])


references = {
    "softmax": lambda i, t, s, b: losses.softmax_contrastive_loss(i, t, s),
    "sigmoid": losses.sigmoid_contrastive_loss,
}
results = {"mesh_processes": [[d.process_index for d in row.flat] for row in mesh.devices], "losses": {}}
for loss in losses.LOSSES:
    with jax.default_device(jax.local_devices()[0]):
        expected = jax.value_and_grad(references[loss], argnums=(0, 1, 2, 3))(images, texts, scale, bias)
    for impl in losses.IMPLEMENTATIONS:
        loss_fn = losses.make_sharded_loss_fn(mesh, sharding.BATCH_AXES, loss=loss, impl=impl)
        value, gradients = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))(
            global_array(images), global_array(texts), scale, bias
        )
        actual = [float(value)] + [np.asarray(multihost_utils.process_allgather(g, tiled=True)) for g in gradients]
        wanted = [float(expected[0])] + [np.asarray(g) for g in expected[1]]
        results["losses"][f"{loss}/{impl}"] = {
            "loss": [actual[0], wanted[0]],
            "max_gradient_difference": max(float(np.max(np.abs(a - w))) for a, w in zip(actual[1:], wanted[1:])),
            "max_gradient": max(float(np.max(np.abs(w))) for w in wanted[1:]),
        }
print(json.dumps(results), flush=True)
