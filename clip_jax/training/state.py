"""The training state (step, parameters, optimizer state, BatchNorm statistics, RNG, the
non-finite guard's counters) and its creation directly in its sharded layout on the mesh, plus its
abstract form for restoring."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from clip_jax.models import CLIP
from clip_jax.sharding import LOGICAL_AXIS_RULES, param_shardings, replicated
from clip_jax.training.optimizer import parameter_path


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree, so it can be jitted, donated and
    checkpointed whole."""

    step: jax.Array  # int32 scalar: the number of updates applied so far
    params: Any  # float32 (the model's param_dtype) master weights, unboxed
    opt_state: optax.OptState
    batch_stats: Any  # the ResNet's BatchNorm statistics; {} for a ViT
    rng: jax.Array  # uint32 (2,) raw key data, kept for stochastic layers and data augmentation
    # int32 scalars of the non-finite guard (clip_jax.training.step): steps whose update was not
    # applied, in all and in the latest run of them (0 after an applied update). Kept here, on
    # the devices and in the checkpoint, so counting costs no host sync and a resumed run goes on
    # counting exactly where it stopped.
    skipped_steps: jax.Array
    consecutive_skipped_steps: jax.Array
    # The optimizer, built once per run (training.optimizer.make_optimizer) and carried with the
    # state it updates, as in Flax's TrainState; static: part of the tree's structure, not a leaf.
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict[str, Any]:
        """The variables `model.apply` takes."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def _seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(key for the parameter initialisation, raw uint32 key data for the state's rng)."""
    init_key, state_key = jax.random.split(jax.random.key(seed))
    return init_key, jax.random.key_data(state_key)


def _init_state(model: CLIP, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The initial state, unboxed; traced under jit (or eval_shape), never run eagerly."""
    init_key, state_rng = _seed_keys(seed)
    variables = nn.unbox(model.init_variables(init_key))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        rng=state_rng,
        skipped_steps=jnp.zeros((), jnp.int32),
        consecutive_skipped_steps=jnp.zeros((), jnp.int32),
        tx=tx,
    )


def _optimizer_state_shardings(abstract_opt_state: Any, abstract_params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Each optimizer-state leaf that mirrors a parameter (Adam's moments, wherever optax nests
    them: the key path ends with the parameter's own dict keys) is sharded like that parameter;
    the rest (step counts) is replicated. Matched by path rather than by `optax.tree_map_params`,
    which cannot run the path-based masks of weight decay and freezing."""
    leaves_with_path = jax.tree_util.tree_leaves_with_path
    shapes = {parameter_path(path): leaf.shape for path, leaf in leaves_with_path(abstract_params)}
    shardings = {parameter_path(path): sharding for path, sharding in leaves_with_path(params_shardings)}

    def choose(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        trailing_dict_keys = []
        for key in reversed(path):
            if not isinstance(key, jax.tree_util.DictKey):
                break
            trailing_dict_keys.insert(0, key)
        name = parameter_path(tuple(trailing_dict_keys))
        if name in shapes and shapes[name] == leaf.shape:
            return shardings[name]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(choose, abstract_opt_state)


def abstract_train_state(
    model: CLIP, tx: optax.GradientTransformation, seed: int, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """(state of `jax.ShapeDtypeStruct`s carrying their shardings, the tree of those shardings).

    The first is what Orbax restores into, onto any mesh; the second is the `out_shardings` of the
    state's creation and the in/out shardings of the train step. Nothing is allocated.
    """
    init_key, _ = _seed_keys(seed)
    # Parameters: the logical axis names of the boxed variables, mapped through the rules.
    abstract_boxed = jax.eval_shape(model.init_variables, init_key)
    variable_shardings = param_shardings(abstract_boxed, mesh, LOGICAL_AXIS_RULES)
    abstract_state = jax.eval_shape(lambda: _init_state(model, tx, seed))
    opt_state_shardings = _optimizer_state_shardings(
        abstract_state.opt_state, abstract_state.params, variable_shardings["params"], mesh
    )
    state_shardings = TrainState(
        step=replicated(mesh),
        params=variable_shardings["params"],
        opt_state=opt_state_shardings,
        batch_stats=variable_shardings.get("batch_stats", {}),
        rng=replicated(mesh),
        skipped_steps=replicated(mesh),
        consecutive_skipped_steps=replicated(mesh),
        tx=tx,
    )
    abstract_with_shardings = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        state_shardings,
    )
    return abstract_with_shardings, state_shardings


def create_train_state(
    model: CLIP, tx: optax.GradientTransformation, seed: int, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """(initial state, its shardings): parameters from `seed`, created by one jitted function whose
    outputs are already laid out over `mesh`, so no host or device ever holds a full copy of a
    sharded parameter."""
    _, state_shardings = abstract_train_state(model, tx, seed, mesh)
    state = jax.jit(lambda: _init_state(model, tx, seed), out_shardings=state_shardings)()
    return state, state_shardings
