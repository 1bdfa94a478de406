"""A workdir while `train.py` writes it: `clip_jax.load(workdir)` and the evaluation's record reader
never fail while checkpoints are saved every step and rotated out under them, and a second
`train.py` in the same workdir refuses to start, naming the running one."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time

import numpy as np

import clip_jax
from clip_jax.evaluation import suite
from clip_jax.io import training_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--config.global_batch_size=16",
    "--config.log_every_steps=1",
    "--config.eval.num_examples=0",
    "--config.tokenizer.training_captions=2000",
    "--config.checkpoint.every_steps=1",  # a save, and a deletion of the oldest, every step
    "--config.checkpoint.max_to_keep=2",
]
LOADS = 30


def _environment(cache_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **cache_env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _complete_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def _abandoned_read() -> None:
    """What an Orbax read abandoned by a retry leaves: an exception no caller can receive, reported
    through sys.unraisablehook (TensorStore's callback into the closed event loop)."""

    def read():
        try:
            yield
        finally:
            raise RuntimeError("Event loop is closed")

    pending = read()
    next(pending)
    del pending  # closed here: "Exception ignored in: <generator object ...>"


def test_a_load_is_quiet_about_the_reads_it_abandoned_and_leaves_the_hook_as_it_was(monkeypatch):
    """The abandoned reads of `clip_jax.load`'s retries are not reported (a live workdir gave
    hundreds of such tracebacks), while the same exception outside a load still is: the quieting
    lasts for the load only, in a library that must not change its caller's process for good."""
    from clip_jax.io import loading
    from clip_jax.models import get_model_config

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    def load_with_a_retry(path, **kwargs):
        _abandoned_read()
        return get_model_config("tiny-vit"), {"params": {"scale": np.ones(2, np.float32)}}, None

    monkeypatch.setattr(loading, "is_training_workdir", lambda path: True)
    monkeypatch.setattr(training_workdir, "load_training_workdir", load_with_a_retry)
    model, _, _, _ = clip_jax.load("workdir")
    assert model.config.vision.image_size == 32 and reported == []
    assert sys.unraisablehook == reported.append
    _abandoned_read()
    assert [str(unraisable.exc_value) for unraisable in reported] == ["Event loop is closed"]


def test_loads_of_a_live_workdir_never_fail_and_a_second_run_is_refused(tmp_path, compilation_cache_env, monkeypatch):
    # Slow storage, every third load: the read of the chosen checkpoint starts only after the run
    # has rotated it out (2 s is several steps of the run, and it keeps 2). The retry is not slowed.
    slow_reads = []
    original_restore = training_workdir.WorkdirReader.restore_variables

    def restore_variables(self, step, abstract):
        if slow_reads and slow_reads.pop():
            time.sleep(2.0)
        return original_restore(self, step, abstract)

    monkeypatch.setattr(training_workdir.WorkdirReader, "restore_variables", restore_variables)
    workdir = str(tmp_path / "workdir")
    command = [sys.executable, "train.py", f"--workdir={workdir}", "--config.total_steps=1000000", *FLAGS]
    env = _environment(compilation_cache_env)
    running = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(_complete_steps(workdir)) < 2:
            assert running.poll() is None, running.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run saved no checkpoint in 300 s"
            time.sleep(0.2)

        first_steps = _complete_steps(workdir)
        unraisable = []  # what would be printed to stderr as "Exception ignored in ..." tracebacks
        monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
        failures, loads = [], 0
        for attempt in range(LOADS):
            slow_reads[:] = [attempt % 3 == 0]
            try:
                model, variables, _, tokenizer = clip_jax.load(workdir)
                assert np.isfinite(np.asarray(variables["params"]["logit_scale"]))
                if attempt % 5 == 0:
                    _, record = training_workdir.read_run_record(workdir)
                    suite.synthetic_dataset_for(record["training"]["data"], model.config.vision.image_size)
                loads += 1
            except Exception as error:  # noqa: BLE001 - counting every kind of failure is the point
                failures.append(f"{type(error).__name__}: {str(error)[:200]}")
        assert running.poll() is None, "the run ended during the loads"
        # Every checkpoint there at the start was rotated out while the loads ran.
        assert min(_complete_steps(workdir)) > max(first_steps)
        assert failures == [] and loads == LOADS
        gc.collect()  # the abandoned reads of the loads above, if any, are finalised now
        assert [str(report.exc_value)[:100] for report in unraisable] == []

        second = subprocess.run(
            [sys.executable, "train.py", f"--workdir={workdir}", "--config.total_steps=1", *FLAGS],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "in use by another run" in errors[0] and f"pid {running.pid}" in errors[0], (
            second.stderr
        )
        assert "Traceback" not in second.stderr and "Resumed" not in second.stdout + second.stderr
    finally:
        if running.poll() is None:
            running.send_signal(signal.SIGTERM)  # a preemption notice: save and stop
        stdout, stderr = running.communicate(timeout=120)
    assert running.returncode == 0, stderr[-3000:]
    # The refused run wrote nothing: the running one's checkpoints are all there and readable.
    training_workdir.load_training_workdir(workdir)
