"""The device mesh built from the config, the one table mapping the models' logical axis names to
mesh axes, and the shardings derived from it for parameters and batches."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
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

    `mesh_config` has integer fields `data`, `fsdp` and `model` (a ConfigDict or a dict): the axes
    inside one slice, of which at most one may be -1, meaning the devices of a slice left over by
    the others. The optional field `dcn_data` is the number of slices the data axis spans over the
    data-centre network (a multislice TPU job; on other platforms, one slice per process): -1 (the
    default) means every slice of the job, which is 1 on a single slice, on CPU and on GPU hosts.
    The mesh's "data" axis is then `dcn_data` x the slice's data axis, with each slice's devices in
    one contiguous block of it, so that fsdp and model never leave a slice: only the data axis's
    gradient reduction and the loss's gathers cross the slower network. The axes are "Auto": jit
    and XLA's sharding propagation place intermediate values.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    dcn_data, granules = _slices(devices, int(_get(mesh_config, "dcn_data", -1)))
    requested = dict(zip(MESH_AXES, sizes))
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1; got {requested}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (the remaining devices); got {requested}")
    per_slice = len(devices) // dcn_data
    where = f"{per_slice} devices per slice" if dcn_data > 1 else f"{len(devices)} devices"
    if -1 in sizes:
        known = math.prod(size for size in sizes if size != -1)
        if per_slice % known:
            raise ValueError(
                f"mesh {requested} does not fit {where}: {per_slice} is not a multiple of the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but there are {where}; "
            "use -1 for one axis to take the remaining devices"
        )
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if dcn_data == 1:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(
        sizes, (dcn_data, 1, 1), devices, process_is_granule=granules == "process"
    )  # (dcn_data * data, fsdp, model): slice k holds rows [k * data, (k + 1) * data) of the data axis
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _get(mesh_config: Mapping[str, int] | Any, field: str, default: int) -> int:
    """A field of a dict, ConfigDict or dataclass of mesh sizes; `default` where it has none."""
    if isinstance(mesh_config, Mapping) or hasattr(mesh_config, "get"):
        return mesh_config.get(field, default)
    return getattr(mesh_config, field, default)


def _slices(devices: Sequence[jax.Device], dcn_data: int) -> tuple[int, str]:
    """(the number of slices the data axis spans, what a slice is: "slice" or "process").

    TPU devices of a multislice job carry `slice_index`; elsewhere (GPU hosts, CPU tests) a slice
    is a process, as in jax's `create_hybrid_device_mesh(process_is_granule=True)`.
    """
    slice_indices = {getattr(device, "slice_index", None) for device in devices}
    if None not in slice_indices and len(slice_indices) > 1:
        kind, count = "slice", len(slice_indices)
    else:
        kind, count = "process", len({device.process_index for device in devices})
    if dcn_data == -1:
        return (count if kind == "slice" else 1), kind
    if dcn_data < 1:
        raise ValueError(f"mesh.dcn_data must be a positive number of slices or -1 (every slice); got {dcn_data}")
    if dcn_data > 1 and dcn_data != count:
        raise ValueError(
            f"mesh.dcn_data={dcn_data} but the {len(devices)} devices form {count} {kind}(s); set it to {count} or -1"
        )
    return dcn_data, kind


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
