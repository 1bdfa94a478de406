"""A damaged newest checkpoint never costs the run: `train.py` reports it in one line naming its step
and path, moves it to `unreadable_checkpoints/` (never deletes it, an empty step directory
included) and resumes from the previous one, saving the damaged step's number again when it comes,
and ending with the parameters of an undamaged run resumed from that step. When no checkpoint
restores, the run stops with one clear line instead of starting from scratch. A changed setting is
not damage: it is refused in one line naming it, and nothing is moved."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from clip_jax.io import training_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--config.global_batch_size=16",
    "--config.log_every_steps=1",
    "--config.eval.num_examples=0",
    "--config.tokenizer.training_captions=2000",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=10",
]
FIRST_STEPS, FINAL_STEPS = 6, 8  # the base run saves 2, 4, 6; every resumed run ends at 8


def _train(workdir: str, total_steps: int, cache_env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **cache_env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    command = [
        sys.executable,
        "train.py",
        f"--workdir={workdir}",
        f"--config.total_steps={total_steps}",
        *FLAGS,
        *extra,
    ]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _steps(workdir: str) -> list[int]:
    """The checkpoints in `workdir` (their committed directories)."""
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def _params(workdir: str) -> list[np.ndarray]:
    _, variables, _ = training_workdir.load_training_workdir(workdir, step=FINAL_STEPS)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(variables["params"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compilation_cache_env):
    """(base workdir with checkpoints 2/4/6, final params resumed from 4, final params resumed from 6)."""
    root = tmp_path_factory.mktemp("damaged")
    base = str(root / "base")
    result = _train(base, FIRST_STEPS, compilation_cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    from_4 = str(root / "from_4")
    shutil.copytree(base, from_4)
    shutil.rmtree(os.path.join(from_4, "checkpoints", str(FIRST_STEPS)))  # cleanly gone, not damaged
    from_6 = str(root / "from_6")
    shutil.copytree(base, from_6)
    for workdir in (from_4, from_6):
        result = _train(workdir, FINAL_STEPS, compilation_cache_env)
        assert result.returncode == 0, result.stderr[-3000:]
    return base, _params(from_4), _params(from_6)


def _truncate_an_array_file(step_directory: str) -> None:
    files = glob.glob(os.path.join(step_directory, "state", "ocdbt.process_*", "d", "*"))
    largest = max(files, key=os.path.getsize)  # holds parameters, not only small optimizer leaves
    with open(largest, "r+b") as file:
        file.truncate(16)


def _cut_progress_json(step_directory: str) -> None:
    path = os.path.join(step_directory, "progress", "metadata")
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])


DAMAGE = {
    "truncated_array_file": _truncate_an_array_file,
    "no_state_metadata": lambda directory: os.remove(os.path.join(directory, "state", "_METADATA")),
    "no_state_directory": lambda directory: shutil.rmtree(os.path.join(directory, "state")),
    "cut_progress_json": _cut_progress_json,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    runs, damage, tmp_path, compilation_cache_env
):
    base, resumed_from_4, _ = runs
    workdir = str(tmp_path / "workdir")
    shutil.copytree(base, workdir)
    damaged = os.path.join(workdir, "checkpoints", str(FIRST_STEPS))
    DAMAGE[damage](damaged)
    result = _train(workdir, FINAL_STEPS, compilation_cache_env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    reports = [line for line in output.splitlines() if "cannot be restored" in line]
    assert len(reports) == 1 and f"step {FIRST_STEPS} at {damaged}" in reports[0], reports
    assert "Resumed from the checkpoint of step 4" in output
    # Moved aside, not deleted.
    assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", str(FIRST_STEPS)))
    assert _steps(workdir) == [2, 4, FIRST_STEPS, FINAL_STEPS]  # the replayed step's save landed
    for expected, actual in zip(resumed_from_4, _params(workdir), strict=True):
        assert np.array_equal(expected, actual)


def test_empty_step_directory_is_set_aside_and_its_step_saved_again(runs, tmp_path, compilation_cache_env):
    base, _, resumed_from_6 = runs
    workdir = str(tmp_path / "workdir")
    shutil.copytree(base, workdir)
    # E.g. a copy that stopped early, of the step the resumed run will save last.
    os.mkdir(os.path.join(workdir, "checkpoints", str(FINAL_STEPS)))
    result = _train(workdir, FINAL_STEPS, compilation_cache_env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert any(f"step {FINAL_STEPS} at" in line and "cannot be restored" in line for line in output.splitlines())
    assert "Resumed from the checkpoint of step 6" in output
    assert os.listdir(os.path.join(workdir, "unreadable_checkpoints", str(FINAL_STEPS))) == []
    assert _steps(workdir) == [2, 4, 6, FINAL_STEPS]  # written, not skipped as if already saved
    for expected, actual in zip(resumed_from_6, _params(workdir), strict=True):
        assert np.array_equal(expected, actual)


def test_when_no_checkpoint_restores_the_run_stops_and_moves_nothing(runs, tmp_path, compilation_cache_env):
    base, _, _ = runs
    workdir = str(tmp_path / "workdir")
    shutil.copytree(base, workdir)
    for step in (2, 4, FIRST_STEPS):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))
    log = os.path.join(workdir, "metrics.jsonl")
    with open(log) as file:
        logged_before = file.read()
    result = _train(workdir, FINAL_STEPS, compilation_cache_env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "none of the 3 checkpoints" in errors[0] and "step 6:" in errors[0] and "step 2:" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    assert not os.path.exists(os.path.join(workdir, "unreadable_checkpoints"))
    with open(log) as file:
        assert file.read() == logged_before  # no step trained: it did not start from scratch


@pytest.mark.parametrize(
    "flag, setting, recorded, now",
    [
        # Silently ignored before: the run went on with the old tokenizer under the new value.
        ("--config.tokenizer.context_length=24", "tokenizer.context_length", "16", "24"),
        # Reported as damage before ("cannot be restored ... repair or remove them").
        ("--config.optimizer.freeze_regex=^visual/", "optimizer.freeze_regex", "''", "'^visual/'"),
    ],
)
def test_a_changed_setting_is_refused_in_one_line_and_never_called_damage(
    runs, tmp_path, compilation_cache_env, flag, setting, recorded, now
):
    base, _, _ = runs
    workdir = str(tmp_path / "workdir")
    shutil.copytree(base, workdir)
    result = _train(workdir, FINAL_STEPS, compilation_cache_env, flag)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert setting in errors[0] and recorded in errors[0] and now in errors[0], errors[0]
    assert "cannot be restored" not in output and "repair" not in output and "Traceback" not in output
    assert _steps(workdir) == [2, 4, FIRST_STEPS]  # nothing moved, nothing trained
    assert not os.path.exists(os.path.join(workdir, "unreadable_checkpoints"))
