"""The exponential moving average of the parameters (config.ema): on 8 virtual devices the step's
average equals one computed here with numpy from the parameters after each step (warm-up included),
a skipped non-finite step leaves it as it was, it is sharded exactly like the parameters, it
survives a checkpoint and resume bit for bit, evaluation during training uses it, and
`clip_jax.load` returns it by default and the trained parameters with `ema=False`."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from run_helpers import default_config

from clip_jax import create_model
from clip_jax.api import load
from clip_jax.io import training_workdir
from clip_jax.sharding import batch_sharding, make_mesh
from clip_jax.training import checkpointing, loop, setup
from clip_jax.training.config import (
    EMASettings,
    LossSettings,
    NonFiniteSettings,
    OptimizerSettings,
    StepSettings,
    validate,
)
from clip_jax.training.optimizer import make_optimizer
from clip_jax.training.state import abstract_train_state, create_train_state, start_ema
from clip_jax.training.step import make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # as tests/test_train_step.py: tiny programs run once
BATCH_SIZE = 16


def _step_settings(decay: float, warmup: bool) -> StepSettings:
    optimizer = OptimizerSettings(
        learning_rate=1e-2, warmup_steps=0, total_steps=20, weight_decay=0.1, grad_clip_norm=0.0
    )
    return StepSettings(
        global_batch_size=BATCH_SIZE,
        optimizer=optimizer,
        loss=LossSettings(),
        nonfinite=NonFiniteSettings(policy="skip", max_consecutive_skips=10),
        ema=EMASettings(decay=decay, warmup=warmup),
    )


def _tiny_vit():
    return create_model("tiny-vit", vision=dict(layers=1), text=dict(layers=1))


def _batch(model, mesh, seed: int, nan: bool = False):
    rng = np.random.default_rng(seed)
    size = model.config.vision.image_size
    images = rng.normal(size=(BATCH_SIZE, size, size, 3)).astype(np.float32)
    texts = rng.integers(1, model.config.text.vocab_size, size=(BATCH_SIZE, model.config.text.context_length))
    if nan:
        images[3] = np.nan  # one NaN image makes the loss NaN: the step is skipped
    return jax.device_put({"images": images, "texts": texts.astype(np.int32)}, batch_sharding(mesh))


def _host(tree) -> list[np.ndarray]:
    return [np.array(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


def _assert_bitwise(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected) > 10
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and np.array_equal(a, e)


# (decay, warmup, batches): None is a non-finite batch. With warm-up and decay 0.2 the first
# applied update uses 1/10, the second 2/11 (the applied count, not the step count: the skip
# between them would make it 3/12 = 0.25, then capped to 0.2), the third min(0.2, 3/12) = 0.2.
CASES = [(0.2, True, [0, None, 1, 2]), (0.5, False, [0, 1, None])]


@pytest.mark.parametrize("decay, warmup, batches", CASES)
def test_ema_equals_a_direct_computation_and_skipped_steps_leave_it(decay, warmup, batches):
    model = _tiny_vit()
    mesh = make_mesh({"data": 2, "fsdp": 4, "model": 1})
    settings = _step_settings(decay, warmup)
    state, shardings = create_train_state(model, make_optimizer(settings.optimizer), 0, mesh, ema=True)
    step = make_train_step(model, settings, mesh, shardings)
    step = step.lower(state, _batch(model, mesh, 0)).compile(FAST_COMPILE)
    expected = _host(state.params)  # the average starts at the initial parameters
    _assert_bitwise(_host(state.ema_params), expected)
    applied = 0
    for seed in batches:
        before = _host(state.ema_params)
        state, metrics = step(state, _batch(model, mesh, 0 if seed is None else seed, nan=seed is None))
        if seed is None:
            assert float(metrics["nonfinite"]) == 1.0
            _assert_bitwise(_host(state.ema_params), before)
            continue
        assert float(metrics["nonfinite"]) == 0.0
        rate = min(decay, (1 + applied) / (10 + applied)) if warmup else decay
        params = _host(state.params)
        expected = [e + np.float32(1 - rate) * (p - e) for e, p in zip(expected, params)]
        applied += 1
        for actual, wanted, param, previous in zip(_host(state.ema_params), expected, params, before):
            # Up to float32 rounding of the decay and the update (XLA may fuse the multiply-add).
            np.testing.assert_allclose(actual, wanted, rtol=2e-6, atol=1e-7)
            if not np.array_equal(param, previous):
                assert not np.array_equal(actual, param)  # an average, not a copy of the parameters
    assert int(state.step) == len(batches)


def test_ema_is_sharded_like_the_params_and_absent_when_off():
    model = _tiny_vit()
    mesh = make_mesh({"data": 2, "fsdp": 4, "model": 1})
    tx = make_optimizer(_step_settings(0.5, True).optimizer)
    abstract, shardings = abstract_train_state(model, tx, 0, mesh, ema=True)
    assert jax.tree.structure(shardings.ema_params) == jax.tree.structure(shardings.params)
    assert jax.tree.leaves(shardings.ema_params) == jax.tree.leaves(shardings.params)
    # Some parameters are split over fsdp, so the comparison is not of replicated layouts only.
    assert any(not sharding.is_fully_replicated for sharding in jax.tree.leaves(shardings.params))
    state, _ = create_train_state(model, tx, 0, mesh, ema=True)
    # Created with the state, or started later over a restored state without one (start_ema).
    started = start_ema(state, shardings.params)
    pairs = [*zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params))]
    pairs += [*zip(jax.tree.leaves(started.ema_params), jax.tree.leaves(started.params))]
    for ema, param in pairs:
        assert ema.sharding == param.sharding and ema.shape == param.shape and ema.dtype == param.dtype
        # Buffers of their own: the step donates both trees.
        for ema_shard, param_shard in zip(ema.addressable_shards, param.addressable_shards):
            assert ema_shard.data.unsafe_buffer_pointer() != param_shard.data.unsafe_buffer_pointer()
    # Off: no leaf at all, so the tree (and its checkpoints) are those of a run without EMA.
    abstract_off, _ = abstract_train_state(model, tx, 0, mesh)
    assert abstract_off.ema_params is None
    assert len(jax.tree.leaves(abstract)) == len(jax.tree.leaves(abstract_off)) + len(jax.tree.leaves(abstract.params))
    # A step built for one and a state of the other are refused.
    with pytest.raises(ValueError, match="ema.decay=0.5 but the state lacks ema_params"):
        make_train_step(model, _step_settings(0.5, True), mesh, abstract_train_state(model, tx, 0, mesh)[1])


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_bad_decay_is_refused_in_one_line(decay):
    config = default_config()
    config.ema.decay = decay
    with pytest.raises(ValueError, match=r"^ema.decay must be in \[0, 1\) \(0 = off\); got ") as error:
        validate(config, process_count=1)
    assert "\n" not in str(error.value)


TOTAL_STEPS = 6
INTERRUPT_AT = 4


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(compilation_cache_env):
    """The training runs below compile the same step again and again, in this process: JAX's
    persistent cache (conftest's directory) compiles it once. Results are unchanged."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", compilation_cache_env["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)


def _run_config(decay: float = 0.5):
    config = default_config()
    config.global_batch_size = BATCH_SIZE
    config.total_steps = TOTAL_STEPS
    config.log_every_steps = 1
    config.tokenizer.training_captions = 2000
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.eval.num_examples = 0
    config.ema.decay = decay
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A run with EMA and an evaluation at its last step, whose evaluated variables are recorded."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    config = _run_config()
    config.eval.num_examples = 32
    config.eval.prompt_modes = "class_name"
    config.eval_every_steps = TOTAL_STEPS
    evaluated, original = [], setup.suite.run_evaluation
    announced, original_announce = [], setup.metrics.announce

    def recording_evaluation(model, variables, *args, **kwargs):
        evaluated.append(jax.device_get(variables))
        return original(model, variables, *args, **kwargs)

    setup.suite.run_evaluation = recording_evaluation
    setup.metrics.announce = lambda line, **kwargs: (announced.append(line), original_announce(line, **kwargs))
    try:
        state = loop.train_and_evaluate(config, workdir)
    finally:
        setup.suite.run_evaluation, setup.metrics.announce = original, original_announce
    return workdir, jax.device_get(state), evaluated, announced


def test_evaluation_during_training_uses_the_ema_parameters(uninterrupted):
    _, state, evaluated, announced = uninterrupted
    assert len(evaluated) == 1
    _assert_bitwise(_host(evaluated[0]["params"]), _host(state.ema_params))
    assert not all(np.array_equal(e, p) for e, p in zip(_host(state.ema_params), _host(state.params)))
    assert any(line.startswith(f"step {TOTAL_STEPS}: ") and line.endswith("[EMA parameters]") for line in announced)


def test_ema_survives_checkpoint_and_resume_bitwise(uninterrupted, tmp_path, monkeypatch):
    _, reference, _, _ = uninterrupted
    workdir = str(tmp_path / "interrupted")
    with monkeypatch.context() as patch:
        # A preemption notice at step INTERRUPT_AT: the run saves there and stops.
        patch.setattr(checkpointing.PreemptionWatcher, "should_stop", lambda self, step: step == INTERRUPT_AT)
        stopped = jax.device_get(loop.train_and_evaluate(_run_config(), workdir))
    assert int(stopped.step) == INTERRUPT_AT and stopped.ema_params is not None
    resumed = jax.device_get(loop.train_and_evaluate(_run_config(), workdir))
    assert int(resumed.step) == TOTAL_STEPS
    _assert_bitwise(_host(resumed.params), _host(reference.params))
    _assert_bitwise(_host(resumed.ema_params), _host(reference.ema_params))


def test_load_returns_the_ema_by_default_and_the_raw_parameters_on_request(uninterrupted):
    workdir, state, _, _ = uninterrupted
    lines = []
    _, variables, _, _ = load(workdir, announce=lines.append)
    _assert_bitwise(_host(variables["params"]), _host(state.ema_params))
    _, raw, _, _ = load(workdir, ema=False, announce=lines.append)
    _assert_bitwise(_host(raw["params"]), _host(state.params))
    assert lines == [
        f"Loaded the EMA parameters (ema.decay=0.5) of step {TOTAL_STEPS} of training workdir {workdir}",
        f"Loaded the raw parameters (it also holds EMA ones) of step {TOTAL_STEPS} of training workdir {workdir}",
    ]


def test_a_checkpoint_without_ema_resumes_with_ema_started_at_its_parameters(tmp_path, monkeypatch):
    """A run without EMA writes the state tree of the code before EMA existed (no ema_params
    node); turning EMA on over it starts the average at the restored parameters, and the warm-up
    goes on counting the updates applied before."""
    workdir = str(tmp_path / "workdir")
    config = _run_config(decay=0.0)
    config.checkpoint.every_steps = 1
    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.PreemptionWatcher, "should_stop", lambda self, step: step == INTERRUPT_AT)
        stopped = loop.train_and_evaluate(config, workdir)
    assert stopped.ema_params is None
    with open(os.path.join(workdir, "checkpoints", str(INTERRUPT_AT), "state", "_METADATA")) as file:
        saved = {eval(key)[0] for key in json.load(file)["tree_metadata"]}  # keys are tuples' reprs
    assert saved == {"step", "params", "opt_state", "batch_stats", "rng", "skipped_steps", "consecutive_skipped_steps"}

    config = _run_config(decay=0.5)
    config.checkpoint.every_steps = 1
    announced = []
    monkeypatch.setattr(setup.metrics, "announce", announced.append)
    loop.train_and_evaluate(config, workdir)
    assert f"The checkpoint of step {INTERRUPT_AT} has no EMA: the moving average starts at its parameters" in announced
    expected = None
    for step in range(INTERRUPT_AT, TOTAL_STEPS + 1):
        _, variables, _ = training_workdir.load_training_workdir(workdir, step, ema=False)
        params = _host(variables["params"])
        if expected is None:
            expected = params
            continue
        applied_before = step - 1  # no step of this run was skipped
        rate = min(0.5, (1 + applied_before) / (10 + applied_before))
        expected = [e + np.float32(1 - rate) * (p - e) for e, p in zip(expected, params)]
    _, variables, _ = training_workdir.load_training_workdir(workdir, ema=True)
    for actual, wanted in zip(_host(variables["params"]), expected):
        np.testing.assert_allclose(actual, wanted, rtol=2e-6, atol=1e-7)

    # And off again: the checkpoint's average is dropped, the next checkpoint holds none.
    config = _run_config(decay=0.0)
    config.total_steps = TOTAL_STEPS + 1
    assert loop.train_and_evaluate(config, workdir).ema_params is None
    assert f"ema.decay=0: the moving average in the checkpoint of step {TOTAL_STEPS} is not carried on" in announced
    with open(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS + 1), "state", "_METADATA")) as file:
        assert "ema_params" not in {eval(key)[0] for key in json.load(file)["tree_metadata"]}
    lines = []
    load(workdir, announce=lines.append)
    assert lines == [
        f"Loaded the raw parameters (it has no EMA) of step {TOTAL_STEPS + 1} of training workdir {workdir}"
    ]


@pytest.mark.parametrize(
    "flag, loaded", [([], "the EMA parameters (ema.decay=0.5)"), (["--noema"], "the raw parameters")]
)
def test_evaluate_reads_the_ema_unless_told_not_to(uninterrupted, tmp_path, capsys, flag, loaded):
    from test_evaluate_cli import _run_main  # evaluate.py's flags may be defined once per process

    workdir = uninterrupted[0]
    _run_main([
        f"--checkpoint={workdir}", "--tasks=zero_shot", "--datasets=synthetic", "--max_examples=16",
        "--batch_size=16", "--prompt_modes=class_name", f"--output={tmp_path}", "--noplots", *flag,
    ])  # fmt: skip
    assert f"Loaded {loaded}" in capsys.readouterr().out
