"""The training loop: `train_and_evaluate(config, workdir)` checks the settings
(clip_jax.training.config), builds the run (clip_jax.training.setup) and steps it: each step
takes the next global batch, runs the compiled step, and at its intervals logs metrics (the only
host sync), saves a checkpoint and runs the evaluation suite. A preemption notice (SIGTERM) or a
Ctrl-C saves and stops; the non-finite guard and a failed save stop the run with one line saying
what to do."""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from clip_jax import metrics
from clip_jax.data import iterator as data_iterator
from clip_jax.training import checkpointing
from clip_jax.training.config import validate
from clip_jax.training.setup import Run, prepared_run
from clip_jax.training.state import TrainState


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (or resume training) the model of `config`, writing checkpoints and logs to `workdir`.

    Every process of a multi-host job calls this with the same arguments. Returns the final state
    (after `config.total_steps` steps, or earlier when a preemption notice or Ctrl-C stopped the run).
    """
    settings = validate(config)  # before anything is built or written
    # Listen for a preemption notice (SIGTERM) or a Ctrl-C from the start: one arriving while
    # compiling still ends the run cleanly, after its first step, with a checkpoint.
    preemption = checkpointing.PreemptionWatcher()
    try:
        with prepared_run(settings, workdir) as run:
            return _train(run, preemption)
    finally:
        preemption.close()


class _Throughput:
    """Time and data wait since the last log step, turned into the logged rates."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._peak_flops = metrics.device_peak_flops()
        self.restart(run.start_step)

    def restart(self, step: int) -> None:
        self._since, self._since_step, self.data_wait = time.perf_counter(), step, 0.0

    def rates(self, step: int) -> dict[str, float | None]:
        now = time.perf_counter()
        step_seconds = (now - self._since) / (step - self._since_step)
        batch = self._run.settings.step.global_batch_size
        return {
            "step_seconds": step_seconds,
            "pairs_per_second": batch / step_seconds,
            "pairs_per_second_per_device": batch / step_seconds / jax.device_count(),
            "data_wait_fraction": self.data_wait / (now - self._since),
            "mfu": metrics.model_flops_utilization(self._run.flops_per_device, step_seconds, self._peak_flops),
        }


def _log(run: Run, step: int, step_metrics: dict[str, Any], data_state: Any, throughput: _Throughput) -> dict[str, Any]:
    """Fetch this step's metrics (waits for the step: the loop's only sync), add the rates and the
    data's skip counters, write them; the non-finite guard reads its counters at the same time."""
    scalars = {name: float(np.asarray(value)) for name, value in jax.device_get(step_metrics).items()}
    scalars.update(throughput.rates(step))
    if data_state is not None:
        counters = data_iterator.summed_counters(data_iterator.gather_states(data_state))
        scalars.update({f"data/{name}": count for name, count in counters.items()})
    run.writer.write(step, scalars)
    run.guard.check_counters(run.state, step)
    return scalars


def _save(run: Run, step: int, data_state: Any, force: bool) -> None:
    """Save if the interval says so (or `force`), after checking the state is finite."""
    due = force or run.checkpointer.manager.should_save(step)
    if due:
        run.guard.check_before_save(run.state, step)  # never save a state that is not finite
    progress: dict[str, Any] = {"step": step}
    if due:
        progress["data_states"] = data_iterator.gather_states(data_state)  # a collective: only when saving
    run.checkpointer.save(step, run.state, progress, run.record, force=force)


def _train(run: Run, preemption: checkpointing.PreemptionWatcher) -> TrainState:
    total_steps, log_every_steps = run.settings.total_steps, run.settings.log_every_steps
    if run.start_step >= total_steps:
        metrics.announce(f"The workdir's checkpoint is already at step {run.start_step} >= total_steps={total_steps}")
    progress_bar = metrics.ProgressBar(total_steps, run.start_step)
    throughput = _Throughput(run)
    preemption.checkpointer = run.checkpointer  # a second Ctrl-C names what it leaves unsaved
    step, preempted = run.start_step, False
    try:
        while step < total_steps:
            waited = time.perf_counter()
            batch, data_state = next(run.batches)
            throughput.data_wait += time.perf_counter() - waited
            run.state, step_metrics = run.step_function(step)(run.state, batch)
            step += 1
            progress_bar.update()
            run.checkpointer.check_for_errors()  # a failed background save stops the run now
            if step % log_every_steps == 0 or step == total_steps:
                scalars = _log(run, step, step_metrics, data_state, throughput)
                progress_bar.show({name: scalars.get(name) for name in ("loss", "pairs_per_second", "mfu")})
                throughput.restart(step)
            if preemption.should_stop(step):
                preempted = True
                _save(run, step, data_state, force=True)
                if preemption.reason != "Ctrl-C":  # a Ctrl-C has said so when it came
                    metrics.announce(f"Preemption notice: saving the checkpoint of step {step} and stopping")
                break
            # Saving first lets the checkpoint's write (asynchronous) overlap the evaluation.
            _save(run, step, data_state, force=step == total_steps)
            if run.evaluator.due(step, total_steps):
                run.evaluator(step, run.state)  # its EMA parameters when it keeps them
                throughput.restart(step)  # the evaluation is not training time
    finally:
        progress_bar.close()
    run.checkpointer.wait_until_finished()  # the last save is committed before the run says it is done
    if preempted:
        metrics.announce(f"Stopped at step {step} on {preemption.reason}, saved; run the same command to resume")
    else:
        metrics.announce(f"Done: step {step}; checkpoints in {run.checkpointer.directory}")
    return run.state
