"""The device mesh built from the config, the one table mapping the models' logical axis names to
mesh axes, and the shardings derived from it for parameters and batches."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
# The batch is split over both data-parallel axes: FSDP is data parallelism whose parameters are
# additionally sharded, so every device of ("data", "fsdp") holds different examples.
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated). Flax applies the rules in order
# and gives each mesh axis to at most one dimension of an array, so "batch" comes first: an
# activation (batch, length, embed) is split over the batch and kept whole along embed, while a
# parameter (embed, mlp) is split over "fsdp" along embed and over "model" along mlp.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    # Convolution kernels (height, width, in, out) of the ResNet: their output channels play the
    # role of "embed"; the input channels stay whole (the first conv has only 3).
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_height", None),
    ("conv_width", None),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("norm", None),
    ("projection", None),
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(mesh_config: Mapping[str, int] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "model") over `devices` (default: every device of every host).

    `mesh_config` has integer fields `data`, `fsdp` and `model` (a ConfigDict or a dict); at most one
    of them may be -1, meaning the devices left over by the others. The axes are "Auto": jit and
    XLA's sharding propagation place intermediate values.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    requested = dict(zip(MESH_AXES, sizes))
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1; got {requested}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (the remaining devices); got {requested}")
    if -1 in sizes:
        known = math.prod(size for size in sizes if size != -1)
        if len(devices) % known:
            raise ValueError(
                f"mesh {requested} does not fit {len(devices)} devices: {len(devices)} is not a multiple "
                f"of the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but there are "
            f"{len(devices)} devices; use -1 for one axis to take the remaining devices"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_axis_size(mesh: Mesh) -> int:
    """The number of batch shards: the product of the mesh's batch axes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes, other dimensions whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divisible(global_batch_size: int, mesh: Mesh, accumulation_steps: int = 1) -> None:
    """Raise ValueError unless every batch shard gets the same whole number of examples in each of
    the `accumulation_steps` micro-batches."""
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1; got {accumulation_steps}")
    shards = batch_axis_size(mesh)
    if global_batch_size % (shards * accumulation_steps):
        detail = f" x {accumulation_steps} micro-batches" if accumulation_steps > 1 else ""
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {shards} batch-axis "
            f"devices (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}){detail}"
        )


def _divisible_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with the mesh axes of any dimension they do not divide evenly dropped (that dimension
    is replicated): jit refuses uneven shardings, and a small or odd-sized parameter is cheap to
    replicate, e.g. a 64-channel stem convolution on a 128-way fsdp axis."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for dimension, (entry, size) in enumerate(zip(entries, shape)):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        if size % math.prod(mesh.shape[axis] for axis in axes):
            entries[dimension] = None
    return P(*entries)


def param_shardings(abstract_boxed_variables: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of boxed variables (`nn.LogicallyPartitioned` leaves, e.g. the
    `jax.eval_shape` of `model.init_variables`), with the boxes removed: the tree matches
    `nn.unbox(variables)`. Unboxed leaves (e.g. BatchNorm statistics) are replicated."""
    logical_specs = nn.get_partition_spec(abstract_boxed_variables)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), nn.unbox(abstract_boxed_variables))
    return jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, _divisible_spec(spec, shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda node: isinstance(node, P),
    )


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """Inside a traced function: the models' `with_logical_constraint` hints take effect on `mesh`.

    Wrap `model.apply` calls of jitted steps in this; leave initialisation outside (its batch-1
    dummy inputs cannot be split over the batch axes).
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
