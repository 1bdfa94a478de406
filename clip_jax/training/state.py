"""The training state (step, parameters, optimizer state, BatchNorm statistics, RNG, the
non-finite guard's counters, the parameters' moving average when the run keeps one) and its
creation directly in its sharded layout on the mesh, plus its abstract form for restoring and the
form checkpoints hold it in."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from clip_jax.io.variables import parameter_path
from clip_jax.models import CLIP
from clip_jax.sharding import LOGICAL_AXIS_RULES, param_shardings, replicated


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
    # The exponential moving average of `params` (config.ema; clip_jax.training.step updates it
    # with each applied update), sharded like them; None, which is no leaf at all, when the run
    # keeps none: the tree, its checkpoints and its compiled step are then those of a run
    # without EMA, and checkpoints written before EMA existed restore unchanged.
    ema_params: Any = None

    @property
    def variables(self) -> dict[str, Any]:
        """The variables `model.apply` takes: the trained parameters."""
        return self._with_batch_stats(self.params)

    @property
    def eval_variables(self) -> dict[str, Any]:
        """The variables to evaluate: the moving average when the run keeps one, else `variables`.
        BatchNorm statistics are the current ones either way (they are running averages already)."""
        return self.variables if self.ema_params is None else self._with_batch_stats(self.ema_params)

    def _with_batch_stats(self, params: Any) -> dict[str, Any]:
        if self.batch_stats:
            return {"params": params, "batch_stats": self.batch_stats}
        return {"params": params}


def saved_fields(state: TrainState) -> dict[str, Any]:
    """The state as checkpoints hold it: its array fields by name, leaving out those that are None
    (`ema_params` of a run without EMA). A dict, not the dataclass, because Orbax records a None
    field as a node of the tree and refuses to restore into a tree with a node the checkpoint
    lacks: so a run without EMA writes and restores exactly the tree it wrote before the field
    existed, and restores those older checkpoints too (a dict restores a saved dataclass's fields)."""
    return {
        field.name: getattr(state, field.name)
        for field in dataclasses.fields(state)
        if field.metadata.get("pytree_node", True) and getattr(state, field.name) is not None
    }


def _seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(key for the parameter initialisation, raw uint32 key data for the state's rng)."""
    init_key, state_key = jax.random.split(jax.random.key(seed))
    return init_key, jax.random.key_data(state_key)


def _init_state(model: CLIP, tx: optax.GradientTransformation, seed: int, ema: bool = False) -> TrainState:
    """The initial state, unboxed; traced under jit (or eval_shape), never run eagerly. With `ema`
    the average starts at the initial parameters (its own buffers: the step donates both)."""
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
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
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
    model: CLIP, tx: optax.GradientTransformation, seed: int, mesh: Mesh, ema: bool = False
) -> tuple[TrainState, TrainState]:
    """(state of `jax.ShapeDtypeStruct`s carrying their shardings, the tree of those shardings);
    with `ema`, `ema_params` too, sharded exactly like `params`.

    The first is what Orbax restores into, onto any mesh; the second is the `out_shardings` of the
    state's creation and the in/out shardings of the train step. Nothing is allocated.
    """
    init_key, _ = _seed_keys(seed)
    # Parameters: the logical axis names of the boxed variables, mapped through the rules.
    abstract_boxed = jax.eval_shape(model.init_variables, init_key)
    variable_shardings = param_shardings(abstract_boxed, mesh, LOGICAL_AXIS_RULES)
    abstract_state = jax.eval_shape(lambda: _init_state(model, tx, seed, ema))
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
        ema_params=variable_shardings["params"] if ema else None,
    )
    abstract_with_shardings = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        state_shardings,
    )
    return abstract_with_shardings, state_shardings


def create_train_state(
    model: CLIP, tx: optax.GradientTransformation, seed: int, mesh: Mesh, ema: bool = False
) -> tuple[TrainState, TrainState]:
    """(initial state, its shardings): parameters from `seed`, created by one jitted function whose
    outputs are already laid out over `mesh`, so no host or device ever holds a full copy of a
    sharded parameter. `ema`: the state keeps a moving average of the parameters (`ema_params`)."""
    _, state_shardings = abstract_train_state(model, tx, seed, mesh, ema)
    state = jax.jit(lambda: _init_state(model, tx, seed, ema), out_shardings=state_shardings)()
    return state, state_shardings


def start_ema(state: TrainState, params_shardings: Any) -> TrainState:
    """`state` with a moving average that starts at its parameters: for a run that turns EMA on
    over a checkpoint without one, and after LiT replaces parameters before the first step. A
    copy, laid out like the parameters: the step donates both trees, which must not share buffers."""
    copy = jax.jit(lambda params: jax.tree.map(jnp.copy, params), out_shardings=params_shardings)
    return state.replace(ema_params=copy(state.params))
