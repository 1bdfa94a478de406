"""Reading a training workdir of `train.py`, read-only: the newest restorable checkpoint's model
variables, the run's record (model config, tokenizer, training settings) and its tokenizer. The
writer, the checkpoint manager of a run and resuming live in `clip_jax.training.checkpointing`,
which builds on `WorkdirReader`.

A workdir looks like

    checkpoints/<step>/state/      the TrainState (params, optimizer state, step, RNG, the EMA of the
                                    params when the run keeps one), sharded
    checkpoints/<step>/progress/   {"step": ..., "data_states": [...]}: where the data resumes (one
                                    clip_jax.data.iterator state per process)
    checkpoints/<step>/config/     {"model": <CLIPConfig>, "tokenizer": <tokenizer config>,
                                    "training": <the run's ConfigDict>}
    <tokenizer files>              e.g. tokenizer.model (SentencePiece trained at the start)
    metrics.jsonl, tensorboard/    the logs (clip_jax.metrics)

Readers of a live workdir (`load_training_workdir`, `read_run_record`) retry when the checkpoint
they chose is rotated out while they read it.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn

from clip_jax import paths
from clip_jax import tokenizer as tokenizers
from clip_jax.models import CLIP, CLIPConfig

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
PROGRESS_ITEM = "progress"
CONFIG_ITEM = "config"

# The fields of a model config that make it the same model: the parameters' shapes and layout and
# the function they compute. Others (compute dtype, remat policy, attention kernel, initial values)
# may change between runs of one workdir.
IDENTITY_MODEL_FIELDS = ("embed_dim", "vision", "text", "activation", "param_dtype", "scan_layers")

# A reader of a live workdir re-lists the checkpoints this many times when the one it chose is
# rotated out while it reads it (each attempt takes the newest again).
LIVE_READ_ATTEMPTS = 8


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the step, the path and what to do."""


def error_summary(error: BaseException, limit: int = 300) -> str:
    """One line for an exception from Orbax/TensorStore, whose messages run over many lines: its
    type and the first line of its text, cut to `limit` characters; an OS error found in the
    chain of causes (e.g. "No space left on device") is named first."""
    root, seen = error, set()
    while root is not None and id(root) not in seen:
        seen.add(id(root))
        if isinstance(root, OSError) and root.strerror:
            return f"{root.strerror} ({type(error).__name__})"
        root = root.__cause__ or root.__context__
    if "os_error_code='28'" in str(error):  # TensorStore reports ENOSPC in its own words
        return f"No space left on device ({type(error).__name__})"
    text = str(error).split("See full TensorStore details")[0].strip().splitlines()
    first = text[0].rstrip(" .") if text else ""
    if isinstance(error, KeyError) and first.startswith(("'", '"')):
        first = first[1:-1]
    summary = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def is_training_workdir(path: str) -> bool:
    """Whether `path` is a directory that `train.py` wrote checkpoints into."""
    return (epath.Path(path) / CHECKPOINT_DIR).is_dir()


class WorkdirReader:
    """The Orbax `CheckpointManager` of a workdir's checkpoints, read-only unless `options` (a
    run's, from `clip_jax.training.checkpointing.TrainingCheckpointer`) say otherwise."""

    def __init__(self, workdir: str, options: ocp.CheckpointManagerOptions | None = None) -> None:
        self.workdir = paths.absolute(workdir)
        self.directory = str(self.workdir / CHECKPOINT_DIR)
        absl_logger = logging.getLogger("absl")
        previous_level = absl_logger.level
        if options is None:
            # Orbax warns that a read-only manager will not save; that is the point.
            absl_logger.setLevel(logging.ERROR)
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
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

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_directory(self, step: int) -> str:
        return str(epath.Path(self.directory) / str(step))

    def restore_variables(self, step: int, abstract_variables: dict[str, Any]) -> dict[str, Any]:
        """Only the model variables ({"params": ..., ["batch_stats": ...]}) of checkpoint `step`,
        laid out as `abstract_variables` says; the optimizer state is never read."""
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
        restored = self.manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[CONFIG_ITEM])

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:  # nothing of a reader's is lost
            pass


def read_run_record(workdir: str) -> tuple[int, dict[str, Any]]:
    """(step, {"model", "tokenizer", "training"} record) of the newest checkpoint of a training
    workdir whose record reads, retrying on checkpoints deleted while being read."""
    return _read_live(workdir, None, lambda reader, step, record: None)[:2]


def _read_live(
    workdir: str, step: int | None, read: Callable[[WorkdirReader, int, dict[str, Any]], Any]
) -> tuple[int, dict[str, Any], Any]:
    """(step, record, read(reader, step, record)) of the newest checkpoint (or `step`) that
    reads. A running `train.py` may delete the chosen checkpoint (rotation) while it is read: the
    reader then starts again from the newest. One that is there but cannot be read is skipped
    for the next older one. Errors end in one CheckpointError sentence."""
    if not is_training_workdir(workdir):
        raise FileNotFoundError(f"{workdir!r} is not a training workdir: it has no {CHECKPOINT_DIR}/ directory")
    unreadable: dict[int, str] = {}
    last_error = ""
    for _ in range(LIVE_READ_ATTEMPTS):
        try:
            reader = WorkdirReader(workdir)
        except Exception as error:  # a step directory vanished while Orbax listed them
            last_error = error_summary(error)
            continue
        try:
            chosen = _choose_step(workdir, reader.all_steps(), step, unreadable)
            if chosen is None:
                break
            try:
                record = reader.run_config(chosen)
                return chosen, record, read(reader, chosen, record)
            except CheckpointError:
                raise
            except Exception as error:
                last_error = error_summary(error)
                if exists(reader.step_directory(chosen)):
                    unreadable[chosen] = last_error  # damaged, not rotated out
                    if step is not None:
                        break
        finally:
            reader.close()
    if unreadable:
        listed = "; ".join(f"step {number}: {reason}" for number, reason in sorted(unreadable.items(), reverse=True))
        raise CheckpointError(f"no checkpoint of training workdir {workdir!r} can be read ({listed})")
    raise CheckpointError(
        f"could not read a checkpoint of training workdir {workdir!r} in {LIVE_READ_ATTEMPTS} attempts: they were "
        f"deleted while being read (the run is saving faster than they can be read); last error: {last_error}"
    )


def _choose_step(workdir: str, steps: list[int], step: int | None, unreadable: dict[int, str]) -> int | None:
    """The step to read next: `step` if asked for, else the newest not found unreadable; None
    when only unreadable ones are left."""
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"training workdir {workdir!r} has no checkpoint of step {step}; it has {steps}")
        return step
    candidates = [candidate for candidate in reversed(steps) if candidate not in unreadable]
    if candidates:
        return candidates[0]
    if unreadable:
        return None
    raise CheckpointError(f"training workdir {workdir!r} holds no complete checkpoint yet")


def record_has_ema(record: dict[str, Any]) -> bool:
    """Whether the checkpoint of this run record holds a moving average of the parameters
    (`TrainState.ema_params`): its run had config.ema.decay > 0. Records written before EMA
    existed have no "ema" entry: no average."""
    decay = record.get("training", {}).get("ema", {}).get("decay", 0.0)
    return isinstance(decay, (int, float)) and decay > 0


def load_training_workdir(
    workdir: str,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
    *,
    ema: bool = True,
    announce: Callable[[str], None] | None = None,
    **overrides: Any,
) -> tuple[Any, dict[str, Any], Any]:
    """(CLIPConfig, variables, tokenizer) of a training workdir's newest complete checkpoint (or of
    `step`), restored onto `sharding` (default: the first local device) for evaluation.

    The variables' "params" are the checkpoint's moving average when it has one (config.ema) and
    `ema` is True, else the trained parameters; `announce` (default: logging.info) gets one line
    saying which. Safe to call on the workdir of a running `train.py`: see `_read_live`.
    `overrides` replace model-config fields that leave the parameters as they are (dtype, remat_policy, ...).
    """
    changed = sorted(set(overrides) & set(IDENTITY_MODEL_FIELDS))
    if changed:
        raise ValueError(f"cannot override {changed} when loading a training workdir: they change the parameters")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def read_variables(reader: WorkdirReader, step: int, record: dict[str, Any]) -> Any:
        config = CLIPConfig.from_dict(record["model"])
        abstract = jax.eval_shape(lambda: nn.unbox(CLIP(config).init_variables(jax.random.key(0))))
        abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract)
        # The state's field to read as the model's "params".
        field = "ema_params" if ema and record_has_ema(record) else "params"
        restored = reader.restore_variables(step, {field if k == "params" else k: v for k, v in abstract.items()})
        return config, {"params" if k == field else k: v for k, v in restored.items()}, field

    step, record, (config, variables, field) = _read_live(workdir, step, read_variables)
    tokenizer = tokenizer_from_workdir(record["tokenizer"], workdir)
    if field == "ema_params":
        line = f"the EMA parameters (ema.decay={record['training']['ema']['decay']})"
    else:
        line = "the raw parameters" + (" (it also holds EMA ones)" if record_has_ema(record) else " (it has no EMA)")
    (announce or logging.getLogger(__name__).info)(f"Loaded {line} of step {step} of training workdir {workdir}")
    return config.replace(**overrides), variables, tokenizer


def scratch_directory() -> str:
    """A new local directory, removed when the process exits (tokenizer files live there)."""
    path = tempfile.mkdtemp(prefix="clip_jax-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tokenizer_from_workdir(tokenizer_record: dict[str, Any], workdir: str) -> Any:
    """The tokenizer a run saved in `workdir` (its files copied to a local directory if remote)."""
    if paths.is_local(workdir):
        return tokenizers.tokenizer_from_config(tokenizer_record, workdir)
    local_directory = scratch_directory()
    for key, name in tokenizer_record.items():
        if key.endswith("_file"):
            (epath.Path(local_directory) / name).write_bytes((epath.Path(workdir) / name).read_bytes())
    return tokenizers.tokenizer_from_config(tokenizer_record, local_directory)
