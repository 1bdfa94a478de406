"""The non-finite guard of training: the on-device test the train step applies, and the checks the
loop makes when it syncs with the devices anyway (`config.nonfinite` is read by
clip_jax.training.config: `NonFiniteSettings`).

The train step (clip_jax.training.step) applies an update only when the loss, the gradient's global
norm and the new BatchNorm statistics are all finite; otherwise the parameters,
optimizer state and statistics stay bit for bit as they were and the state's counters
`skipped_steps` and `consecutive_skipped_steps` grow. Nothing is fetched per step: the loop reads the
counters at log steps and before every save (`Guard`), and stops the run with `NonFiniteError`
once more steps in a row were skipped than the policy tolerates, or, before a save, if the state
itself is not finite. So no checkpoint ever holds a non-finite value, and no good checkpoint is
rotated out by a bad one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.io.variables import nonfinite_paths
from clip_jax.training.config import NonFiniteSettings

# train.py's exit status for a run stopped by the guard: not 1 (a crash) nor 0 (done or
# preempted), so a job scheduler can tell "diverged: rerunning resumes into the same NaN" apart.
EXIT_CODE = 3


def finite_leaf_flags(tree: Any) -> jax.Array:
    """bool (number of leaves,): whether each array of `tree` is free of NaN and inf (traceable)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.ones((0,), jnp.bool_)
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


class NonFiniteError(RuntimeError):
    """The run was stopped by the non-finite guard; the message is one line naming the step and the
    last good checkpoint. train.py exits with `exit_code`."""

    exit_code = EXIT_CODE


class Guard:
    """The loop's side of the guard. `check_counters` at log steps (the loop has just fetched the
    metrics, so reading two more scalars costs no extra wait), `check_before_save` before each
    save (two scalars and one bool per array of the state: the only sync a save adds).

    `checkpointer` needs `directory`, `latest_step()` and `wait_until_finished()`. Every process
    reads the same replicated counters, so all of them stop at the same step.
    """

    def __init__(
        self, settings: NonFiniteSettings, checkpointer: Any, mesh: Mesh, announce: Callable[[str], None] = print
    ) -> None:
        self.policy = settings.policy
        self.max_consecutive_skips = settings.max_consecutive_skips
        self.tolerated = settings.tolerated_skips
        self._checkpointer = checkpointer
        self._announce = announce
        self._reported_skips = 0
        self._finite_leaf_flags = jax.jit(finite_leaf_flags, out_shardings=NamedSharding(mesh, P()))

    def check_counters(self, state: Any, step: int) -> None:
        """Stop the run if more steps in a row were skipped than the policy tolerates; announce
        skips since the last check."""
        counters = jax.device_get((state.skipped_steps, state.consecutive_skipped_steps))
        skipped, consecutive = (int(value) for value in counters)
        if consecutive > self.tolerated:
            # Once past the limit the step applies nothing more, so the streak's first step is exact.
            first = step - consecutive + 1
            if self.policy == "stop":
                reason = f"non-finite loss/gradient at step {first} (nonfinite.policy='stop')"
            else:
                reason = (
                    f"non-finite loss/gradient at steps {first} to {first + self.tolerated} "
                    f"({self.tolerated + 1} in a row, more than nonfinite.max_consecutive_skips="
                    f"{self.max_consecutive_skips})"
                )
            self._stop(reason)
        if skipped > self._reported_skips:
            self._announce(
                f"step {step}: skipped {skipped - self._reported_skips} update(s) with a non-finite loss or "
                f"gradient since the last check ({skipped} in all, {consecutive} in a row now)"
            )
            self._reported_skips = skipped

    def check_before_save(self, state: Any, step: int) -> None:
        """`check_counters`, then stop the run rather than save a state holding NaN or inf."""
        self.check_counters(state, step)
        tree = {"params": state.params, "opt_state": state.opt_state, "batch_stats": state.batch_stats}
        if state.ema_params is not None:
            tree["ema_params"] = state.ema_params
        flags = np.asarray(self._finite_leaf_flags(tree))
        if not flags.all():
            paths = nonfinite_paths(tree, flags)
            self._stop(
                f"the training state at step {step} is not finite ({len(paths)} of {flags.size} arrays, "
                f"first {paths[0]}), so it was not saved"
            )

    def _stop(self, reason: str) -> None:
        self._checkpointer.wait_until_finished()  # name a committed checkpoint, not one in flight
        latest = self._checkpointer.latest_step()
        advice = "lower the learning rate or check the data"
        if latest is None:
            where = f"no checkpoint was saved before it; {advice}, then rerun"
        else:
            where = (
                f"the last good checkpoint is step {latest} in {self._checkpointer.directory}; {advice}, "
                "then rerun to resume from it"
            )
        raise NonFiniteError(f"Stopped: {reason}; {where}")
