"""Checkpoints of train.py: a run killed with SIGKILL or stopped with Ctrl-C resumes to the bitwise
result of an uninterrupted run, logging one record per step; SIGTERM and Ctrl-C save and exit
cleanly, a second Ctrl-C stops at once in one line; and a checkpoint written on 8 devices restores
onto 1 device and onto another (data, fsdp) mesh."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import default_config

from clip_jax import sharding
from clip_jax.io import training_workdir
from clip_jax.metrics import read_jsonl
from clip_jax.models import CLIP, CLIPConfig
from clip_jax.training import checkpointing
from clip_jax.training.config import validate
from clip_jax.training.optimizer import make_optimizer
from clip_jax.training.state import abstract_train_state, create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")

# A short run of the default recipe: batch 16, checkpoints every 2 steps, no zero-shot evaluation.
TOTAL_STEPS = 8
FLAGS = [
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.global_batch_size=16",
    "--config.log_every_steps=1",
    "--config.eval.num_examples=0",
    "--config.tokenizer.training_captions=2000",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=10",
]

# Runs train.py with the checkpointer's save patched to signal its own process when asked to save
# a step of SIGNAL_AT ("6:SIGKILL" or "5:SIGINT,6:SIGINT"), once the earlier checkpoints have
# committed. SIGKILL: starts the (asynchronous) save of that step and kills the process while it is
# being written. Other signals are sent before the save starts (SIGINT as a Ctrl-C would be).
SIGNALLING_LAUNCHER = """
import os, runpy, signal, sys
# Import clip_jax from train.py's checkout, as `python train.py` would, not from an installed copy.
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
from clip_jax.training import checkpointing

# A Ctrl-C reaches a run started from a terminal: Python's own handler, even when the tests run as
# a background job (whose shell starts it, and so this process, with SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
SIGNALS = {int(step): getattr(signal, name)
           for step, name in (item.split(":") for item in os.environ["SIGNAL_AT"].split(","))}
original_save = checkpointing.TrainingCheckpointer.save

def save(self, step, *args, **kwargs):
    signum = SIGNALS.pop(step, None)
    if signum is not None:
        self.wait_until_finished()
    if signum == signal.SIGKILL:
        original_save(self, step, *args, **kwargs)
    if signum is not None:
        os.kill(os.getpid(), signum)
    return original_save(self, step, *args, **kwargs)

checkpointing.TrainingCheckpointer.save = save
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


_CACHE_ENVIRONMENT: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(compilation_cache_env):
    _CACHE_ENVIRONMENT.update(compilation_cache_env)


def _environment(device_count: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(_CACHE_ENVIRONMENT)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train(workdir: str, *extra: str, device_count: int = 2, launcher: list[str] | None = None, env_extra=None):
    env = _environment(device_count)
    env.update(env_extra or {})
    command = [sys.executable, *(launcher or []), TRAIN, f"--workdir={workdir}", *FLAGS, *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def _final_params(workdir: str) -> dict[str, np.ndarray]:
    _, variables, _ = training_workdir.load_training_workdir(workdir)
    return jax.tree.map(np.asarray, variables["params"])


@pytest.fixture(scope="module")
def reference_workdir(tmp_path_factory) -> str:
    """An uninterrupted run on 2 devices."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _signalled_train(workdir: str, tmp_path, signal_at: str) -> subprocess.CompletedProcess:
    """train.py (the FLAGS run) that signals itself as SIGNALLING_LAUNCHER's `signal_at` says."""
    launcher_path = tmp_path / "launcher.py"
    launcher_path.write_text(SIGNALLING_LAUNCHER)
    scratch = tmp_path / "tmp"  # the run's TMPDIR: a killed process cleans nothing up
    scratch.mkdir(exist_ok=True)
    result = _train(workdir, launcher=[str(launcher_path)], env_extra={"SIGNAL_AT": signal_at, "TMPDIR": str(scratch)})
    # The tokenizer lives in the workdir, not in a scratch copy left behind in /tmp by every kill.
    assert [path.name for path in scratch.iterdir() if path.name.startswith("clip_jax-")] == []
    return result


def _complete_steps(workdir: str) -> list[int]:
    checkpointer = checkpointing.TrainingCheckpointer(workdir, read_only=True)
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def _assert_resume_equals_the_reference(workdir: str, reference_workdir: str, restored_step: int) -> None:
    """Rerun the reference's command in `workdir`: it resumes from `restored_step`, ends with the
    reference's parameters bit for bit, and its log holds one training record per step, with the
    reference's losses (the replayed steps' records are not duplicated)."""
    restarted = _train(workdir)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"Resumed from the checkpoint of step {restored_step}" in restarted.stdout + restarted.stderr
    reference, resumed = _final_params(reference_workdir), _final_params(workdir)
    leaves_reference, leaves_resumed = jax.tree.leaves(reference), jax.tree.leaves(resumed)
    assert len(leaves_reference) == len(leaves_resumed) > 10
    for expected, actual in zip(leaves_reference, leaves_resumed):
        assert np.array_equal(expected, actual)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    logged_steps = [record["step"] for record in records if "loss" in record]
    assert logged_steps == list(range(1, TOTAL_STEPS + 1)), logged_steps  # once each, in order
    losses_reference = {
        r["step"]: r["loss"] for r in read_jsonl(os.path.join(reference_workdir, "metrics.jsonl")) if "loss" in r
    }
    assert {record["step"]: record["loss"] for record in records if "loss" in record} == losses_reference


def test_sigkill_mid_run_then_restart_is_bitwise_equal(reference_workdir, tmp_path):
    workdir = str(tmp_path / "killed")
    killed = _signalled_train(workdir, tmp_path, "6:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Step 6's save was interrupted, so it must not be listed; 2 and 4 were committed before.
    assert _complete_steps(workdir) == [2, 4]
    # The killed run logged steps 5 and 6, which the restart replays.
    assert max(record["step"] for record in read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == 6
    _assert_resume_equals_the_reference(workdir, reference_workdir, restored_step=4)


def test_ctrl_c_saves_the_next_step_stops_in_one_line_and_resumes_bitwise(reference_workdir, tmp_path):
    workdir = str(tmp_path / "interrupted")
    interrupted = _signalled_train(workdir, tmp_path, "5:SIGINT")  # Ctrl-C during step 5's bookkeeping
    output = interrupted.stdout + interrupted.stderr
    assert interrupted.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    # One line when it arrives (the step is not known yet), one when the run has stopped.
    lines = [line.strip() for line in output.splitlines() if "Ctrl-C" in line]
    assert len(lines) == 2 and any(line.startswith("Stopped at step 6") for line in lines), output[-3000:]
    assert _complete_steps(workdir) == [2, 4, 6]  # the step it stopped at is saved
    _assert_resume_equals_the_reference(workdir, reference_workdir, restored_step=6)


def test_a_second_ctrl_c_stops_at_once_saying_what_is_not_saved(tmp_path):
    workdir = str(tmp_path / "interrupted_twice")
    # The second Ctrl-C comes as the run starts the save of step 6 that the first one asked for.
    interrupted = _signalled_train(workdir, tmp_path, "5:SIGINT,6:SIGINT")
    output = interrupted.stdout + interrupted.stderr
    assert interrupted.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    lines = [line for line in interrupted.stderr.splitlines() if line.startswith("Ctrl-C again:")]
    assert len(lines) == 1, output[-3000:]
    assert "steps 5 to 6 are not saved" in lines[0] and "newest checkpoint is step 4" in lines[0], lines[0]
    assert _complete_steps(workdir) == [2, 4]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "preempted")
    env = _environment(2)
    command = [
        sys.executable,
        TRAIN,
        f"--workdir={workdir}",
        *FLAGS,
        "--config.total_steps=100000",
        "--config.checkpoint.every_steps=100000",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    jsonl = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.exists(jsonl) and any("loss" in record for record in read_jsonl(jsonl)):
                break
            time.sleep(0.2)
        assert process.poll() is None, "train.py ended before it was signalled"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "Preemption notice" in stdout + stderr
    checkpointer = checkpointing.TrainingCheckpointer(workdir, read_only=True)
    steps = checkpointer.all_steps()
    checkpointer.close()
    assert len(steps) == 1 and 1 <= steps[0] < 100000, steps
    last_logged = max(record["step"] for record in read_jsonl(jsonl) if "loss" in record)
    assert steps[0] == last_logged  # it saved the step it stopped at


@pytest.fixture(scope="module")
def checkpoint_of_8_devices(tmp_path_factory):
    """A training state created on 8 devices over a (data=2, fsdp=4) mesh, every leaf given
    distinct values, saved through the run's checkpointer. Returns (workdir, config, model config,
    the values as numpy)."""
    config = default_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.model = 2, 4, 1
    mesh = sharding.make_mesh(config.mesh)
    assert mesh.devices.size == 8
    settings = validate(config)
    model_config = CLIPConfig.from_dict(settings.model.model_config().to_dict())
    model = CLIP(model_config)
    state, state_shardings = create_train_state(model, make_optimizer(settings.optimizer), settings.seed, mesh)

    def distinct_values(state):
        # Adam's moments start at zero; make every leaf worth restoring.
        def fill(leaf):
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                return leaf + 7
            return leaf + jnp.arange(leaf.size, dtype=leaf.dtype).reshape(leaf.shape) * 1e-3 + 0.5

        return jax.tree.map(fill, state)

    state = jax.jit(distinct_values, out_shardings=state_shardings)(state)
    embedding = state.params["text"]["token_embedding"]
    assert {shard.data.shape[1] for shard in embedding.addressable_shards} == {embedding.shape[1] // 4}
    workdir = str(tmp_path_factory.mktemp("eight_devices"))
    checkpointer = checkpointing.TrainingCheckpointer(workdir, every_steps=100)
    checkpointer.save(3, state, {"step": 3, "data_position": 3}, {"model": model_config.to_dict()}, force=True)
    checkpointer.close()
    return workdir, config, model_config, jax.tree.map(np.asarray, state)


@pytest.mark.parametrize(
    "mesh_shape", [(1, 1, 1), (8, 1, 1), (1, 8, 1), (4, 2, 1)], ids=["1-device", "data8", "fsdp8", "data4-fsdp2"]
)
def test_checkpoint_of_8_devices_restores_onto_other_meshes(checkpoint_of_8_devices, mesh_shape):
    workdir, config, model_config, expected = checkpoint_of_8_devices
    config = copy.deepcopy(config)
    config.mesh.data, config.mesh.fsdp, config.mesh.model = mesh_shape
    device_count = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:device_count])
    settings = validate(config)
    abstract_state, _ = abstract_train_state(
        CLIP(model_config), make_optimizer(settings.optimizer), settings.seed, mesh
    )
    checkpointer = checkpointing.TrainingCheckpointer(workdir, read_only=True)
    try:
        state, progress = checkpointer.restore(checkpointer.latest_step(), abstract_state)
    finally:
        checkpointer.close()
    assert progress == {"step": 3, "data_position": 3}
    leaves_expected, leaves_restored = jax.tree.leaves(expected), jax.tree.leaves(state)
    assert len(leaves_expected) == len(leaves_restored)
    for want, got in zip(leaves_expected, leaves_restored):
        assert got.sharding.mesh.devices.size == device_count
        assert np.array_equal(want, np.asarray(got))
    # Laid out for the new mesh: split over its fsdp axis along the embedding width.
    embedding = state.params["text"]["token_embedding"]
    assert {shard.data.shape[1] for shard in embedding.addressable_shards} == {embedding.shape[1] // mesh_shape[1]}
