"""Orbax checkpoints of a training run (sharded, asynchronous, atomic) and preemption handling.
The workdir's layout and its read-only reader (`load_training_workdir`, `read_run_record`) are in
`clip_jax.io.training_workdir`; `TrainingCheckpointer` is that reader with the writing and resuming of a run.

Orbax writes each step into a temporary directory and renames it only once every process has
finished, so a checkpoint interrupted by a crash is never listed, let alone restored. A committed
checkpoint that cannot be read back (a truncated or missing file, bad metadata, an empty step
directory) is reported, moved to `unreadable_checkpoints/<step>` (never deleted) when an older one
restores instead, and never makes a run start from scratch (`TrainingCheckpointer.restore_newest`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from clip_jax.io.training_workdir import (
    CHECKPOINT_DIR,
    CONFIG_ITEM,
    IDENTITY_MODEL_FIELDS,
    PROGRESS_ITEM,
    STATE_ITEM,
    CheckpointError,
    WorkdirReader,
    error_summary,
    exists,
)
from clip_jax.training import multihost
from clip_jax.training.state import TrainState, saved_fields

UNREADABLE_DIR = "unreadable_checkpoints"  # where checkpoints that cannot be restored are moved


class TrainingCheckpointer(WorkdirReader):
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
        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1; got {every_steps}")
        if max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be >= 1; got {max_to_keep}")
        if keep_period < 0:
            raise ValueError(f"checkpoint.keep_period must be >= 0 (0 = off); got {keep_period}")
        options = None
        if not read_only:
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
        super().__init__(workdir, options)
        self._last_saved_step: int | None = self.manager.latest_step()
        self._started_steps: list[int] = []  # saves started by this run, oldest first
        self._closed = False
        self._unconfirmed_step: int | None = None  # the last started save, until seen committed

    def newest_committed_step(self) -> int | None:
        """The newest step whose save has committed (its directory exists), without waiting for
        a save in flight (which `latest_step` already lists) or reloading the manager; None if none.
        Cheap enough for a signal handler: one stat per listed step, newest first."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if exists(self.step_directory(step)):
                return step
        return None

    def restore_newest(
        self, abstract_state_for: Callable[[int, dict[str, Any]], Any], announce: Callable[[str], None] = print
    ) -> tuple[int, dict[str, Any], Any, dict[str, Any]] | None:
        """(step, run record, state, progress) of the newest checkpoint that restores; None when the
        workdir has no checkpoint.

        `abstract_state_for(step, record)` gives the abstract state to restore into from a
        checkpoint's run record; what it raises (a changed setting it refuses, say) is passed on:
        that is not damage. A checkpoint that cannot be read is reported in one line; when an
        older one restores, the unreadable newer ones (an empty step directory too) are moved to
        `unreadable_checkpoints/` (never deleted), and the run saves their steps again when it
        reaches them. When none restores nothing is moved and CheckpointError is raised: a run
        never starts from scratch over checkpoints it could not read.
        """
        self._refuse_if_only_unreadable()
        failures: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            outcome = self._try_restore(step, abstract_state_for)
            if isinstance(outcome, str):
                failures.append((step, outcome))
                announce(f"Checkpoint of step {step} at {self.step_directory(step)} cannot be restored: {outcome}")
                continue
            for unreadable_step, _ in failures:
                moved_to = self.set_aside(unreadable_step)
                announce(f"Moved the unreadable checkpoint of step {unreadable_step} to {moved_to}")
            if failures:
                announce(f"Resuming from the checkpoint of step {step}, the newest that restores")
            # The steps after it are trained again, and saved again: `save` skips only the step
            # it saved last, which must not be one of the unreadable steps set aside above.
            self._last_saved_step = step
            record, state, progress = outcome
            return step, record, state, progress
        if failures:
            listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise CheckpointError(
                f"none of the {len(failures)} checkpoints in {self.directory} can be restored ({listed}); "
                "nothing was moved or deleted: repair or remove them, or use a new --workdir"
            )
        return None

    def _try_restore(
        self, step: int, abstract_state_for: Callable[[int, dict[str, Any]], Any]
    ) -> tuple[dict[str, Any], Any, dict[str, Any]] | str:
        """(record, state, progress) of checkpoint `step`, or why it cannot be read (every process
        agrees: a file damaged for one process's shards fails the step for all)."""
        try:
            record = self.run_config(step)
            for key in ("model", "tokenizer"):
                if not isinstance(record.get(key), dict):
                    raise ValueError(f"its config record has no {key!r} entry")
        except Exception as error:
            reason: str | None = error_summary(error)
        else:
            reason = None
        if not multihost.all_processes_agree(reason is None):
            return reason or "unreadable on another process"
        abstract_state = abstract_state_for(step, record)  # errors here are not damage: passed on
        try:
            state, progress = self.restore(step, abstract_state)
            if int(progress.get("step", -1)) != step:
                raise ValueError(f"its progress record says step {progress.get('step')!r}")
        except Exception as error:
            reason = error_summary(error)
        if not multihost.all_processes_agree(reason is None):
            return reason or "unreadable on another process"
        return record, state, progress

    def set_aside(self, step: int) -> str:
        """Move checkpoint `step` to `unreadable_checkpoints/` (process 0 moves, all wait); its new path."""
        destination_root = self.workdir / UNREADABLE_DIR
        destination = destination_root / str(step)
        suffix = 1
        while destination.exists():
            destination = destination_root / f"{step}.{suffix}"
            suffix += 1
        if jax.process_index() == 0:
            destination_root.mkdir(parents=True, exist_ok=True)
            epath.Path(self.step_directory(step)).rename(destination)
        multihost.sync(f"clip_jax_set_aside_{step}")
        self.manager.reload()
        return str(destination)

    def _refuse_if_only_unreadable(self) -> None:
        if self.all_steps():
            return
        set_aside = self.workdir / UNREADABLE_DIR
        if set_aside.exists():
            if any(set_aside.iterdir()):
                raise CheckpointError(
                    f"{self.directory} holds no checkpoint but {set_aside} holds unreadable ones: move a "
                    f"repaired one back into {CHECKPOINT_DIR}/, or delete {set_aside} to start from scratch"
                )

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
        if isinstance(state, TrainState):
            state = saved_fields(state)
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.PyTreeSave(state),
                PROGRESS_ITEM: ocp.args.JsonSave(progress),
                CONFIG_ITEM: ocp.args.JsonSave(run_config),
            }
        )
        try:
            saved = self.manager.save(step, args=args, force=force)
        except Exception as error:  # an earlier asynchronous save may be what failed
            raise self._save_error(error, step) from error
        if saved:
            self._last_saved_step = step
            self._started_steps.append(step)
            self._unconfirmed_step = step
        return saved

    def check_for_errors(self) -> None:
        """Raise CheckpointError if a background save has failed (cheap: no waiting, and no
        listing of the directory while a save is in flight)."""
        try:
            self.manager.check_for_errors()
        except Exception as error:
            raise self._save_error(error, None) from error
        if self._unconfirmed_step is None or self.manager.is_saving_in_progress():
            return
        step, self._unconfirmed_step = self._unconfirmed_step, None
        # Orbax lists a step from the moment its save starts; only its committed directory says
        # that it succeeded (one stat per save).
        if not exists(self.step_directory(step)):
            self.wait_until_finished()  # raises the failure, if Orbax kept it
            raise self._save_error(RuntimeError("the save ended without committing"), step)

    def _save_error(self, error: BaseException, step: int | None) -> CheckpointError:
        try:
            self.manager.reload()
            latest = self.manager.latest_step()
        except Exception:  # the directory itself may be what is broken
            latest = None
        pending = [started for started in self._started_steps if latest is None or started > latest]
        failed = pending[0] if pending else step
        newest = (
            f"the newest complete checkpoint is step {latest}; rerun the same command to resume from it"
            if latest is not None
            else "there is no complete checkpoint yet"
        )
        return CheckpointError(
            f"could not save the checkpoint of step {failed} in {self.directory}: {error_summary(error)}; "
            f"{newest} once the cause is fixed"
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, progress) of checkpoint `step`, each array laid out as its `abstract_state` leaf's
        sharding says: any mesh and device count, whatever the checkpoint was written on. A
        TrainState is restored as `saved_fields` wrote it: a checkpoint must hold exactly the fields
        `abstract_state` has (with `ema_params` or without)."""
        item = saved_fields(abstract_state) if isinstance(abstract_state, TrainState) else abstract_state
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeRestore(item=item, restore_args=restore_args),
                    PROGRESS_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        state = restored[STATE_ITEM]
        if isinstance(abstract_state, TrainState):
            state = abstract_state.replace(**state)
        return state, dict(restored[PROGRESS_ITEM])

    def wait_until_finished(self) -> None:
        """Block until every started save is committed; CheckpointError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._save_error(error, None) from error

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the last save (CheckpointError if it failed, unless not `raise_errors`), then
        release Orbax's threads. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
        except CheckpointError as error:
            if raise_errors:
                raise
            logging.getLogger(__name__).warning("%s", error)
        finally:
            try:
                self.manager.close()
            except Exception:  # a failed save is reported above
                pass


def _model_identity(model_config: dict[str, Any]) -> dict[str, Any]:
    # JSON turns tuples into lists; compare through JSON on both sides.
    model_config = json.loads(json.dumps(model_config))
    identity = {field: model_config.get(field) for field in IDENTITY_MODEL_FIELDS}
    if isinstance(identity["vision"], dict):
        # Patch dropout (FLIP) is how the model trains, not which parameters it has: a run may
        # change it, and workdirs written before the field existed resume.
        identity["vision"].pop("patch_dropout", None)
    identity["logit_bias"] = "learned" if model_config.get("logit_bias_init") is not None else "none"
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
    """Tells the loop when a preemption notice (SIGTERM) or a Ctrl-C (SIGINT) asks it to save and stop.

    With several processes, JAX's preemption service catches SIGTERM and all processes agree on
    the step to stop at (`reached_preemption_sync_point`, which must be called every step); a
    Ctrl-C is passed to it as a SIGTERM of this process, so the hosts agree on that step as well.
    With one process, the handlers set a flag. A second Ctrl-C stops the process at once (exit
    status 130, as a shell reports a Ctrl-C) with one line naming the steps that are not saved,
    taken from `self.checkpointer` once the loop has set it (in a notebook or at the Python prompt,
    a KeyboardInterrupt with that line instead). The previous handlers come back on `close`.
    """

    def __init__(self) -> None:
        self._synchronised = jax.distributed.is_initialized()
        self._received = threading.Event()
        self._interrupted = False
        self._previous_handlers: dict[int, Any] = {}
        self.reason = "a preemption notice (SIGTERM)"  # what asked the run to stop, for its last line
        self.checkpointer: TrainingCheckpointer | None = None  # set by the loop
        self.step: int | None = None  # the last step the loop asked about
        if threading.current_thread() is threading.main_thread():
            if not self._synchronised:
                self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
            # A process started with SIGINT ignored (a background job of a script) keeps ignoring
            # it, as Python itself does.
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._received.set()

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self._interrupted:
            _stop_at_once(self._unsaved())
        self._interrupted = True
        self.reason = "Ctrl-C"
        # Written straight to the terminal: a signal handler may run inside a print or a progress
        # bar update, whose locks it must not take again.
        _say("Ctrl-C: the run saves a checkpoint after this step and stops (Ctrl-C again stops at once, unsaved)")
        if self._synchronised:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service: the hosts agree on a step
        else:
            self._received.set()

    def _unsaved(self) -> str:
        """What a stop at once loses, in words."""
        if self.checkpointer is None or self.step is None:
            return "no step of this run was trained"
        newest = self.checkpointer.newest_committed_step()
        if newest is None:
            return f"nothing is saved: there is no checkpoint yet (the run was at step {self.step})"
        if newest >= self.step:
            return f"nothing is lost: step {newest} is saved"
        return f"steps {newest + 1} to {self.step} are not saved; the newest checkpoint is step {newest}"

    def should_stop(self, step: int) -> bool:
        self.step = step
        if self._synchronised:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled by the user
                return False
        return self._received.is_set()

    def close(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


def _say(line: str) -> None:
    """One line on standard error from process 0, with no lock taken (see `_on_interrupt`)."""
    if jax.process_index() == 0:
        try:
            os.write(2, f"\n{line}\n".encode())
        except OSError:  # no terminal left to tell
            pass


def _stop_at_once(unsaved: str) -> None:
    """End the process now, as a SIGKILL would (a save in flight is left uncommitted, and is
    removed by the next start), after one line. In an interactive session (a notebook's kernel,
    the Python prompt) KeyboardInterrupt is raised instead: ending the process would end the
    session."""
    if hasattr(sys, "ps1") or "ipykernel" in sys.modules:
        raise KeyboardInterrupt(f"Ctrl-C again: stopped without saving; {unsaved}")
    for stream in (sys.stdout, sys.stderr):
        try:  # the lines printed before; a stream the handler interrupted refuses, and keeps them
            stream.flush()
        except (OSError, RuntimeError, ValueError):
            pass
    _say(f"Ctrl-C again: stopped at once; {unsaved}. Run the same command to resume from the newest checkpoint")
    os._exit(128 + signal.SIGINT)
