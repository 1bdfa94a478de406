"""Orbax checkpoints of a training run (sharded, asynchronous, atomic), preemption handling, and
loading the newest parameters of a training workdir onto one device.

A workdir looks like

    checkpoints/<step>/state/      the TrainState (params, optimizer state, step, RNG), sharded
    checkpoints/<step>/progress/   {"step": ..., "data_position": ...}: where the data resumes
    checkpoints/<step>/config/     {"model": <CLIPConfig>, "tokenizer": <tokenizer config>,
                                    "training": <the run's ConfigDict>}
    <tokenizer files>              e.g. tokenizer.model (SentencePiece trained at the start)
    metrics.jsonl, tensorboard/    the logs (clip_jax.metrics)

Orbax writes each step into a temporary directory and renames it only once every process has
finished, so a checkpoint interrupted by a crash is never listed, let alone restored.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
PROGRESS_ITEM = "progress"
CONFIG_ITEM = "config"

# The fields of a model spec that make it the same model: the parameters' shapes and layout and
# the function they compute. Others (compute dtype, remat policy, attention kernel, initial values)
# may change between runs of one workdir.
_IDENTITY_MODEL_FIELDS = ("embed_dim", "vision", "text", "activation", "param_dtype", "scan_layers")


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name if "://" in directory else os.path.join(directory, name)


def is_training_workdir(path: str) -> bool:
    """Whether `path` is a directory that `train.py` wrote checkpoints into."""
    return os.path.isdir(os.path.join(path, CHECKPOINT_DIR))


class TrainingCheckpointer:
    """The run's Orbax `CheckpointManager`: saves every `every_steps` steps (and when forced), keeps
    the newest `max_to_keep` plus every step divisible by `keep_period` (0 = none), in the
    background when `async_save`. Every process must call `save` with the same steps."""

    def __init__(
        self,
        workdir: str,
        every_steps: int = 1000,
        max_to_keep: int = 3,
        keep_period: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        import orbax.checkpoint as ocp

        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1; got {every_steps}")
        if max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be >= 1; got {max_to_keep}")
        if keep_period < 0:
            raise ValueError(f"checkpoint.keep_period must be >= 0 (0 = off); got {keep_period}")
        self._ocp = ocp
        self.directory = _join(os.path.abspath(workdir) if "://" not in workdir else workdir, CHECKPOINT_DIR)
        absl_logger = logging.getLogger("absl")
        previous_level = absl_logger.level
        if read_only:
            # Orbax warns that a read-only manager will not save; that is the point.
            absl_logger.setLevel(logging.ERROR)
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                # Only at multiples of every_steps (and forced saves): Orbax's default would also
                # save the first step of every run.
                save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
                max_to_keep=max_to_keep,
                keep_period=keep_period or None,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,
            )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                    PROGRESS_ITEM: ocp.JsonCheckpointHandler(),
                    CONFIG_ITEM: ocp.JsonCheckpointHandler(),
                },
            )
        finally:
            absl_logger.setLevel(previous_level)
        self._last_saved_step: int | None = self.manager.latest_step()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        progress: dict[str, Any],
        run_config: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Start saving `state` at `step` if the interval says so (or `force`); True if it did.

        Returns at once when saving asynchronously: the arrays are copied off the devices first,
        so the caller may go on updating (and donating) `state`.
        """
        if step == self._last_saved_step:
            return False
        args = self._ocp.args.Composite(
            **{
                STATE_ITEM: self._ocp.args.PyTreeSave(state),
                PROGRESS_ITEM: self._ocp.args.JsonSave(progress),
                CONFIG_ITEM: self._ocp.args.JsonSave(run_config),
            }
        )
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            self._last_saved_step = step
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, progress) of checkpoint `step`, each array laid out as its `abstract_state` leaf's
        sharding says: any mesh and device count, whatever the checkpoint was written on."""
        ocp = self._ocp
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
                    PROGRESS_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[STATE_ITEM], dict(restored[PROGRESS_ITEM])

    def restore_variables(self, step: int, abstract_variables: dict[str, Any]) -> dict[str, Any]:
        """Only the model variables ({"params": ..., ["batch_stats": ...]}) of checkpoint `step`,
        laid out as `abstract_variables` says; the optimizer state is never read."""
        ocp = self._ocp
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeRestore(
                        item=abstract_variables, restore_args=restore_args, partial_restore=True
                    )
                }
            ),
        )
        return dict(restored[STATE_ITEM])

    def run_config(self, step: int) -> dict[str, Any]:
        """The {"model", "tokenizer", "training"} record saved with checkpoint `step`."""
        restored = self.manager.restore(
            step, args=self._ocp.args.Composite(**{CONFIG_ITEM: self._ocp.args.JsonRestore()})
        )
        return dict(restored[CONFIG_ITEM])

    def wait_until_finished(self) -> None:
        """Block until every started save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _model_identity(spec: dict[str, Any]) -> dict[str, Any]:
    # JSON turns tuples into lists; compare through JSON on both sides.
    spec = json.loads(json.dumps(spec))
    identity = {field: spec.get(field) for field in _IDENTITY_MODEL_FIELDS}
    identity["logit_bias"] = "learned" if spec.get("logit_bias_init") is not None else "none"
    return identity


def check_same_model(stored_model: dict[str, Any], model: dict[str, Any], workdir: str) -> None:
    """Refuse to resume from a checkpoint of another model (before anything is compiled)."""
    stored, current = _model_identity(stored_model), _model_identity(model)
    if stored == current:
        return
    differences = []
    for key in stored:
        if isinstance(stored[key], dict) and isinstance(current[key], dict):
            for inner in sorted(set(stored[key]) | set(current[key])):
                if stored[key].get(inner) != current[key].get(inner):
                    differences.append(
                        f"{key}.{inner}: {stored[key].get(inner)!r} in the checkpoint, {current[key].get(inner)!r} now"
                    )
        elif stored[key] != current[key]:
            differences.append(f"{key}: {stored[key]!r} in the checkpoint, {current[key]!r} now")
    raise ValueError(
        f"workdir {workdir!r} holds checkpoints of another model ({'; '.join(differences)}). "
        "Use a new --workdir for a different model, or delete the old checkpoints."
    )


class PreemptionWatcher:
    """Tells the loop when a preemption notice (SIGTERM) asks it to save and stop.

    With several processes, JAX's preemption service catches the signal and all processes agree
    on the step to stop at (`reached_preemption_sync_point`, which must be called every step).
    With one process, a SIGTERM handler sets a flag; the previous handler comes back on `close`.
    """

    def __init__(self) -> None:
        from jax._src import distributed

        self._synchronised = distributed.global_state.client is not None
        self._received = threading.Event()
        self._previous_handler = None
        if not self._synchronised and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._received.set()

    def should_stop(self, step: int) -> bool:
        if self._synchronised:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled by the user
                return False
        return self._received.is_set()

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def load_training_workdir(
    workdir: str, step: int | None = None, sharding: jax.sharding.Sharding | None = None, **overrides: Any
) -> tuple[Any, dict[str, Any], Any]:
    """(CLIPConfig, variables, tokenizer) of a training workdir's newest complete checkpoint (or of
    `step`), restored onto `sharding` (default: the first local device) for evaluation.

    `overrides` replace spec fields that leave the parameters as they are (dtype, remat_policy, ...).
    """
    from flax import linen as nn

    from clip_jax import tokenizer as tokenizers
    from clip_jax.models import CLIP, CLIPConfig

    if not is_training_workdir(workdir):
        raise FileNotFoundError(f"{workdir!r} is not a training workdir: it has no {CHECKPOINT_DIR}/ directory")
    checkpointer = TrainingCheckpointer(workdir, read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"training workdir {workdir!r} holds no complete checkpoint yet")
        record = checkpointer.run_config(step)
        config = CLIPConfig.from_dict(record["model"])
        changed = sorted(set(overrides) & set(_IDENTITY_MODEL_FIELDS))
        if changed:
            raise ValueError(
                f"cannot override {changed} when loading a training workdir: they change the parameters"
            )
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.eval_shape(lambda: nn.unbox(CLIP(config).init_variables(jax.random.key(0))))
        abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract)
        variables = checkpointer.restore_variables(step, abstract)
    finally:
        checkpointer.close()
    tokenizer = tokenizers.tokenizer_from_config(record["tokenizer"], workdir)
    return config.replace(**overrides), variables, tokenizer


def broadcast_bytes(data: bytes | None) -> bytes:
    """`data` of process 0 on every process (others pass None); no shared filesystem needed."""
    if jax.process_count() == 1:
        assert data is not None
        return data
    from jax.experimental import multihost_utils

    length = np.array([len(data) if jax.process_index() == 0 else 0], dtype=np.int64)
    length = int(multihost_utils.broadcast_one_to_all(length)[0])
    payload = np.zeros((length,), dtype=np.uint8)
    if jax.process_index() == 0:
        payload[:] = np.frombuffer(data, dtype=np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(payload)).tobytes()
