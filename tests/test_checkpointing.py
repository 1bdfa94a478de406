"""Checkpoints of train.py: a run killed with SIGKILL resumes to the bitwise result of an
uninterrupted run, SIGTERM saves and exits cleanly, and a checkpoint written on 8 devices restores
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

# Runs train.py with the checkpointer's save patched: when asked to save step KILL_AT it waits for
# the earlier checkpoints to commit, starts the (asynchronous) save, and kills its own process with
# SIGKILL while that save is being written.
KILLING_LAUNCHER = """
import os, runpy, signal, sys
# Import clip_jax from train.py's checkout, as `python train.py` would, not from an installed copy.
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
from clip_jax.training import checkpointing

KILL_AT = int(os.environ["KILL_AT_STEP"])
original_save = checkpointing.TrainingCheckpointer.save

def save(self, step, *args, **kwargs):
    if step == KILL_AT:
        self.wait_until_finished()
        original_save(self, step, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
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
    _, variables, _ = checkpointing.load_training_workdir(workdir)
    return jax.tree.map(np.asarray, variables["params"])


@pytest.fixture(scope="module")
def reference_workdir(tmp_path_factory) -> str:
    """An uninterrupted run on 2 devices."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_sigkill_mid_run_then_restart_is_bitwise_equal(reference_workdir, tmp_path):
    workdir = str(tmp_path / "killed")
    launcher_path = tmp_path / "launcher.py"
    launcher_path.write_text(KILLING_LAUNCHER)
    scratch = tmp_path / "tmp"  # the killed run's TMPDIR: a killed process cleans nothing up
    scratch.mkdir()
    killed = _train(workdir, launcher=[str(launcher_path)], env_extra={"KILL_AT_STEP": "6", "TMPDIR": str(scratch)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # The tokenizer lives in the workdir, not in a scratch copy left behind in /tmp by every kill.
    assert [path.name for path in scratch.iterdir() if path.name.startswith("clip_jax-")] == []
    checkpointer = checkpointing.TrainingCheckpointer(workdir, read_only=True)
    complete_steps = checkpointer.all_steps()
    checkpointer.close()
    # Step 6's save was interrupted, so it must not be listed; 2 and 4 were committed before.
    assert complete_steps == [2, 4], complete_steps

    restarted = _train(workdir)  # the same command as the reference run
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "Resumed from the checkpoint of step 4" in restarted.stdout + restarted.stderr
    reference, resumed = _final_params(reference_workdir), _final_params(workdir)
    leaves_reference, leaves_resumed = jax.tree.leaves(reference), jax.tree.leaves(resumed)
    assert len(leaves_reference) == len(leaves_resumed) > 10
    for expected, actual in zip(leaves_reference, leaves_resumed):
        assert np.array_equal(expected, actual)
    # The logged losses of the resumed steps equal those of the uninterrupted run.
    losses_reference = {
        r["step"]: r["loss"] for r in read_jsonl(os.path.join(reference_workdir, "metrics.jsonl")) if "loss" in r
    }
    losses_resumed = {}
    for record in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "loss" in record:
            losses_resumed[record["step"]] = record["loss"]  # the restart's value wins
    assert sorted(losses_resumed) == list(range(1, TOTAL_STEPS + 1))
    assert losses_resumed == losses_reference


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
    distinct values, saved through the run's checkpointer. Returns (workdir, config, model spec,
    the values as numpy)."""
    config = default_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.model = 2, 4, 1
    mesh = sharding.make_mesh(config.mesh)
    assert mesh.devices.size == 8
    settings = validate(config)
    spec = CLIPConfig.from_dict(settings.model.spec().to_dict())
    model = CLIP(spec)
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
    checkpointer.save(3, state, {"step": 3, "data_position": 3}, {"model": spec.to_dict()}, force=True)
    checkpointer.close()
    return workdir, config, spec, jax.tree.map(np.asarray, state)


@pytest.mark.parametrize(
    "mesh_shape", [(1, 1, 1), (8, 1, 1), (1, 8, 1), (4, 2, 1)], ids=["1-device", "data8", "fsdp8", "data4-fsdp2"]
)
def test_checkpoint_of_8_devices_restores_onto_other_meshes(checkpoint_of_8_devices, mesh_shape):
    workdir, config, spec, expected = checkpoint_of_8_devices
    config = copy.deepcopy(config)
    config.mesh.data, config.mesh.fsdp, config.mesh.model = mesh_shape
    device_count = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:device_count])
    settings = validate(config)
    abstract_state, _ = abstract_train_state(CLIP(spec), make_optimizer(settings.optimizer), settings.seed, mesh)
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
