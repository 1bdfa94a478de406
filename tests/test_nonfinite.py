"""The non-finite guard of training, end to end: a run whose loss turns NaN (the user's
`--config.optimizer.learning_rate=1e6`) stops with a non-zero exit and a message naming the step
and the last good checkpoint, and leaves only finite checkpoints; the guard refuses to save a
state that is not finite; `clip_jax.load` warns about non-finite weights."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from clip_jax.api import load
from clip_jax.io import training_workdir
from clip_jax.io.model_directory import save_model_directory
from clip_jax.metrics import read_jsonl
from clip_jax.models import CLIP, get_model_config
from clip_jax.sharding import make_mesh
from clip_jax.tokenizer import ClipTokenizer
from clip_jax.training import checkpointing
from clip_jax.training.config import NonFiniteSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")

# The user's run, shortened; its learning rate of 1e6 makes the loss NaN at the second step.
DIVERGING_FLAGS = [
    "--config.total_steps=10",
    "--config.global_batch_size=16",
    "--config.eval.num_examples=0",
    "--config.tokenizer.training_captions=2000",
    "--config.checkpoint.every_steps=1",
]
STOPPED = re.compile(r"Stopped: non-finite loss/gradient at steps? (\d+)")
LAST_GOOD = re.compile(r"the last good checkpoint is step (\d+) in (\S+?)[;,]? ")


def _train(
    workdir: str, *extra: str, cache_env: dict[str, str], learning_rate: float = 1e6
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(cache_env)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable, TRAIN, f"--workdir={workdir}", f"--config.optimizer.learning_rate={learning_rate}",
        *DIVERGING_FLAGS, *extra,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def _checkpoint_steps(workdir: str) -> list[int]:
    checkpointer = checkpointing.TrainingCheckpointer(workdir, read_only=True)
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def _variables_of(workdir: str, step: int) -> dict:
    _, variables, _ = training_workdir.load_training_workdir(workdir, step=step)
    return jax.tree.map(np.asarray, variables)


def _all_finite(tree) -> bool:
    return all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree))


def _message(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("Stopped:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_policy_stop_ends_the_run_at_the_first_non_finite_step(tmp_path, compilation_cache_env):
    workdir = str(tmp_path / "workdir")
    # A learning rate of 300 trains a few steps before the loss turns NaN (at step 6 when written),
    # so there are good checkpoints that saving the NaN steps would rotate out: two are kept.
    # Logged every step, so the log says independently which step first went non-finite.
    result = _train(
        workdir, "--config.nonfinite.policy=stop", "--config.log_every_steps=1", "--config.checkpoint.max_to_keep=2",
        cache_env=compilation_cache_env, learning_rate=300.0,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout[-3000:]
    from clip_jax.training import nonfinite

    assert result.returncode == nonfinite.EXIT_CODE, result.stderr[-3000:]
    message = _message(result)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    losses = {record["step"]: record["loss"] for record in records if "loss" in record}
    first_bad = min(step for step, loss in losses.items() if loss is None)  # JSON null: NaN or inf
    assert 1 < first_bad < 10
    assert max(losses) == first_bad  # nothing ran after it
    assert int(STOPPED.search(message).group(1)) == first_bad
    steps = _checkpoint_steps(workdir)
    assert steps == list(range(max(1, first_bad - 2), first_bad))  # the two newest good ones
    last_good = LAST_GOOD.search(message)
    assert int(last_good.group(1)) == first_bad - 1
    assert last_good.group(2) == os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    for step in steps:
        assert _all_finite(_variables_of(workdir, step)), step
    assert "Done" not in result.stdout


def test_policy_skip_stops_after_more_than_max_consecutive_skips(tmp_path, compilation_cache_env):
    workdir = str(tmp_path / "workdir")
    # Not logged before the end: the check before every save is what sees the non-finite steps.
    result = _train(
        workdir, "--config.nonfinite.max_consecutive_skips=2", "--config.log_every_steps=100",
        "--config.checkpoint.max_to_keep=4", cache_env=compilation_cache_env,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout[-3000:]
    message = _message(result)
    streak = re.search(r"at steps (\d+) to (\d+) \(3 in a row", message)
    assert streak, message
    first, last = int(streak.group(1)), int(streak.group(2))
    assert last == first + 2
    # The two tolerated skips were saved (their state is the last applied update's, unchanged);
    # the third was not, and the checkpoint before the streak is still kept.
    steps = _checkpoint_steps(workdir)
    assert steps[-3:] == [first - 1, first, first + 1], steps
    assert int(LAST_GOOD.search(message).group(1)) == first + 1
    variables = {step: _variables_of(workdir, step) for step in steps}
    for step in steps:
        assert _all_finite(variables[step]), step
    for step in (first, first + 1):
        for expected, actual in zip(jax.tree.leaves(variables[first - 1]), jax.tree.leaves(variables[step])):
            assert np.array_equal(expected, actual)


# ---- the guard's checks, on a small state ------------------------------------------------------


class _FakeCheckpointer:
    directory = "/runs/w/checkpoints"

    def __init__(self, latest: int | None) -> None:
        self.latest = latest
        self.waited = False

    def wait_until_finished(self) -> None:
        self.waited = True

    def latest_step(self) -> int | None:
        return self.latest


def _small_state(consecutive: int = 0, **params):
    from clip_jax.training.state import TrainState

    params = {"logit_scale": jnp.float32(2.0), "text": {"proj": jnp.ones((3, 2))}, **params}
    return TrainState(
        step=jnp.int32(6), params=params, opt_state={"mu": jax.tree.map(jnp.zeros_like, params)}, batch_stats={},
        rng=jnp.zeros((2,), jnp.uint32), skipped_steps=jnp.int32(consecutive),
        consecutive_skipped_steps=jnp.int32(consecutive), tx=optax.identity(),
    )  # fmt: skip


def _nonfinite_config(policy: str = "skip", max_consecutive_skips: int = 2) -> NonFiniteSettings:
    return NonFiniteSettings(policy=policy, max_consecutive_skips=max_consecutive_skips)


def test_the_guard_refuses_to_save_a_state_that_is_not_finite():
    from clip_jax.training import nonfinite

    mesh = make_mesh({"data": 8, "fsdp": 1, "model": 1})
    checkpointer = _FakeCheckpointer(latest=4)
    guard = nonfinite.Guard(_nonfinite_config(), checkpointer, mesh)
    guard.check_before_save(_small_state(), step=6)  # finite: saved
    bad = _small_state(vision={"kernel": jnp.array([1.0, jnp.inf])})
    expected = r"at step 6 .*params/vision/kernel.*last good checkpoint is step 4 in /runs/w/checkpoints"
    with pytest.raises(nonfinite.NonFiniteError, match=expected):
        guard.check_before_save(bad, step=6)
    assert checkpointer.waited  # the newest checkpoint named is a committed one


@pytest.mark.parametrize("policy, consecutive, stops", [("skip", 2, False), ("skip", 3, True), ("stop", 1, True)])
def test_the_guard_stops_on_the_consecutive_skip_counter(policy, consecutive, stops):
    from clip_jax.training import nonfinite

    mesh = make_mesh({"data": 8, "fsdp": 1, "model": 1})
    guard = nonfinite.Guard(_nonfinite_config(policy), _FakeCheckpointer(latest=None), mesh)
    state = _small_state(consecutive=consecutive)
    if not stops:
        guard.check_counters(state, step=6)
        guard.check_before_save(state, step=6)
        return
    first = 6 - consecutive + 1
    for check in (guard.check_counters, guard.check_before_save):
        with pytest.raises(nonfinite.NonFiniteError, match=rf"at steps? {first}\b.*no checkpoint"):
            check(state, step=6)


# ---- clip_jax.load warns about non-finite weights ----------------------------------------------


def _tiny_vit_variables(nan: bool) -> tuple:
    model_config = get_model_config("tiny-vit")
    shapes = jax.eval_shape(lambda: nn.unbox(CLIP(model_config).init_variables(jax.random.key(0))))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), shapes)
    if nan:
        variables["params"]["text"]["token_embedding"][0, 0] = np.nan
    return model_config, variables


def _nonfinite_warnings(record) -> list[str]:
    return [str(warning.message) for warning in record if "non-finite" in str(warning.message)]


def test_load_warns_about_a_model_directory_with_non_finite_weights(tmp_path):
    tokenizer = ClipTokenizer()
    for name, nan in (("finite", False), ("nan", True)):
        model_config, variables = _tiny_vit_variables(nan)
        save_model_directory(str(tmp_path / name), model_config, variables, tokenizer)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load(str(tmp_path / "finite"))
    assert _nonfinite_warnings(record) == []
    with pytest.warns(RuntimeWarning) as record:
        load(str(tmp_path / "nan"))
    (message,) = _nonfinite_warnings(record)
    count = len(jax.tree.leaves(variables))
    assert str(tmp_path / "nan") in message
    assert f"1 of {count} arrays" in message and "params/text/token_embedding" in message


def test_load_warns_about_a_training_workdir_with_non_finite_weights(tmp_path):
    model_config, variables = _tiny_vit_variables(nan=True)
    tokenizer = ClipTokenizer()
    workdir = str(tmp_path / "workdir")
    checkpointer = checkpointing.TrainingCheckpointer(workdir, async_save=False)
    record = {"model": model_config.to_dict(), "tokenizer": tokenizer.to_config()}
    checkpointer.save(1, variables, {"step": 1, "data_position": 1}, record, force=True)
    checkpointer.close()
    for asset in tokenizer.asset_files():
        shutil.copy(asset, workdir)
    with pytest.warns(RuntimeWarning) as warned:
        load(workdir)
    (message,) = _nonfinite_warnings(warned)
    assert workdir in message and "params/text/token_embedding" in message
