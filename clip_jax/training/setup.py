"""Everything a training run builds before its first step, once and in order: the mesh; the data
source (checked before anything is written); the workdir and its lock; the checkpoint manager;
the tokenizer, model and state, restored from the newest checkpoint that restores or created
fresh (with a pre-trained tower for LiT); the compiled step and its FLOP count; the metric
writers, the non-finite guard and the evaluator; the data feed. `prepared_run` hands them over as
one `Run` and closes them, in reverse order, however the run ends."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from clip_jax import metrics, sharding
from clip_jax.data import iterator as data_iterator
from clip_jax.data.prefetch import Prefetcher, to_global_batch
from clip_jax.data.sources import ExampleSource
from clip_jax.data.synthetic import SyntheticSource
from clip_jax.evaluation import suite
from clip_jax.io import loading
from clip_jax.io.training_workdir import record_has_ema, tokenizer_from_workdir
from clip_jax.io.variables import parameter_path
from clip_jax.models import CLIP, CLIPConfig
from clip_jax.training import checkpointing, multihost, resume
from clip_jax.training.config import Settings
from clip_jax.training.nonfinite import Guard
from clip_jax.training.optimizer import learning_rate_schedule, make_optimizer
from clip_jax.training.run_tokenizer import build_tokenizer, tokenizer_files_digest
from clip_jax.training.state import TrainState, abstract_train_state, create_train_state, start_ema
from clip_jax.training.step import make_train_step
from clip_jax.training.workdir_lock import WorkdirLock, WorkdirLockedError


@dataclasses.dataclass
class Run:
    """What the loop works with. `state` is replaced by every step."""

    settings: Settings
    mesh: jax.sharding.Mesh
    model: CLIP
    tokenizer: Any
    state: TrainState
    start_step: int
    compiled_step: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    flops_per_device: float | None  # model FLOPs of one step on one device (None: unknown)
    checkpointer: checkpointing.TrainingCheckpointer
    guard: Guard
    writer: metrics.MetricsWriter
    evaluator: Evaluator
    batches: Iterator[tuple[dict[str, jax.Array], Any]]  # (global batch, data state after it)
    record: dict[str, Any]  # {"model", "tokenizer", "tokenizer_files", "training"}: saved with every checkpoint
    # FLIP's unmasked tuning: the same step compiled without patch dropout, run from step
    # `unmasked_from_step` on (None: no tuning phase, or no patch dropout to leave out).
    unmasked_step: Callable | None = None
    unmasked_from_step: int = 0

    def step_function(self, step: int) -> Callable:
        """The compiled step that takes the state from `step` to `step + 1`."""
        if self.unmasked_step is not None and step >= self.unmasked_from_step:
            return self.unmasked_step
        return self.compiled_step


@dataclasses.dataclass
class _Model:
    tokenizer: Any
    model_config: CLIPConfig
    state: TrainState
    state_shardings: TrainState
    progress: dict[str, Any]  # {"step", "data_states"} of the restored checkpoint; {"step": 0} when fresh


@contextlib.contextmanager
def prepared_run(settings: Settings, workdir: str) -> Iterator[Run]:
    """A `Run` for `settings` in `workdir`; every part is closed when the block ends."""
    mesh = sharding.make_mesh(dataclasses.asdict(settings.mesh))
    # Where the mesh is first known, before anything is built (make_train_step checks it for its
    # other callers).
    sharding.check_batch_divisible(settings.step.global_batch_size, mesh, settings.step.accumulation_steps)
    # One schedule: the optimizer follows it and the step logs its value (as flax's examples do).
    schedule = learning_rate_schedule(settings.optimizer)
    with contextlib.ExitStack() as stack:
        source, caption_sample = _data_source(settings)  # checked before anything is written
        stack.callback(source.close)
        if jax.process_index() == 0:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        lock = _lock_workdir(workdir)
        if lock is not None:
            stack.callback(lock.release)
        checkpointer = checkpointing.TrainingCheckpointer(workdir, **dataclasses.asdict(settings.checkpoint))
        # A failure already being raised says what went wrong; a failed last save is raised otherwise.
        stack.push(lambda kind, error, traceback: checkpointer.close(raise_errors=kind is None))
        built = _model_and_state(settings, workdir, mesh, checkpointer, caption_sample, schedule)
        model = CLIP(built.model_config)
        compiled_step, flops_per_device, compile_seconds = _compile_step(settings, model, mesh, built, schedule)
        unmasked_step = _compile_unmasked_step(settings, model, mesh, built, schedule)
        start_step = int(built.progress["step"])
        # The log keeps one record per step: those of the steps this run replays are dropped.
        writer = stack.enter_context(contextlib.closing(metrics.MetricsWriter(workdir, start_step=start_step)))
        writer.write(start_step, {"compile_seconds": compile_seconds, "flops_per_device_per_step": flops_per_device})
        batches = _data_feed(settings, stack, mesh, source, built)
        # The built-in dataset's own evaluation sets, when the run trains on it.
        dataset = source.dataset if isinstance(source, SyntheticSource) else None
        yield Run(
            settings=settings,
            mesh=mesh,
            model=model,
            tokenizer=built.tokenizer,
            state=built.state,
            start_step=start_step,
            compiled_step=compiled_step,
            flops_per_device=flops_per_device,
            checkpointer=checkpointer,
            # Stops the run (NonFiniteError) on non-finite steps; reads the state only when the loop syncs.
            guard=Guard(settings.step.nonfinite, checkpointer, mesh, metrics.announce),
            writer=writer,
            evaluator=Evaluator(settings, model, built.tokenizer, mesh, dataset, writer),
            batches=batches,
            record={
                "model": built.model_config.to_dict(),
                "tokenizer": built.tokenizer.to_config(),
                "tokenizer_files": tokenizer_files_digest(built.tokenizer.to_config(), workdir),
                "training": settings.record,
            },
            unmasked_step=unmasked_step,
            unmasked_from_step=settings.total_steps - settings.unmasked_tuning_steps,
        )


def _lock_workdir(workdir: str) -> WorkdirLock | None:
    """Process 0 locks the workdir; every process raises the same error if another run holds it."""
    lock, message = None, b""
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirLockedError as error:
            lock, message = None, str(error).encode("utf-8")
    if jax.process_count() > 1:
        message = multihost.broadcast_bytes(message if jax.process_index() == 0 else None)
    if message:
        raise WorkdirLockedError(message.decode("utf-8"))
    return lock


# --------------------------------------------------------------------------------------------
# Tokenizer, model and state: restored, or fresh.
# --------------------------------------------------------------------------------------------


def _model_and_state(
    settings: Settings,
    workdir: str,
    mesh: jax.sharding.Mesh,
    checkpointer: checkpointing.TrainingCheckpointer,
    caption_sample: Callable[[int], list[str]],
    schedule: Callable,
) -> _Model:
    """From the newest checkpoint that restores (its tokenizer and model, so a resumed run
    tokenizes and computes exactly as before; the settings it depends on are checked against its
    record by `resume.check_resume` before its state is read, so a refused change, another model
    included, stops the run before anything is compiled), else fresh. The optimizer is built here,
    once, and travels with the state."""
    tx = make_optimizer(settings.optimizer, schedule)
    ema = settings.ema.enabled
    restored: dict[str, Any] = {}

    def abstract_state_for(step: int, record: dict[str, Any]) -> TrainState:
        tokenizer = tokenizer_from_workdir(record["tokenizer"], workdir)
        model_config = settings.model.model_config(tokenizer)
        # Before its state is read: a refused change is one line, not taken for damage.
        honoured = resume.check_resume(record, settings.record, model_config.to_dict(), workdir, step)
        # Restored as written (with or without a moving average), then made as this run wants it.
        had_ema = record_has_ema(record)
        abstract, shardings = abstract_train_state(CLIP(model_config), tx, settings.seed, mesh, had_ema)
        shardings = shardings.replace(ema_params=shardings.params if ema else None)  # laid out like params
        restored.update(tokenizer=tokenizer, model_config=model_config, state_shardings=shardings)
        restored.update(had_ema=had_ema, honoured=honoured)
        return abstract

    resumed = checkpointer.restore_newest(abstract_state_for, announce=metrics.announce)
    if resumed is not None:
        step, _, state, progress = resumed
        for line in restored["honoured"]:  # said once its checkpoint has restored
            metrics.announce(line)
        state = _ema_as_configured(state, restored["had_ema"], ema, restored["state_shardings"], step)
        built = _Model(restored["tokenizer"], restored["model_config"], state, restored["state_shardings"], progress)
        _announce_model(settings, built.model_config, mesh, workdir)
        metrics.announce(f"Resumed from the checkpoint of step {step} in {checkpointer.directory}")
        return built
    tokenizer = build_tokenizer(settings.tokenizer, caption_sample, workdir)
    model_config = settings.model.model_config(tokenizer)
    _announce_model(settings, model_config, mesh, workdir)
    state, state_shardings = create_train_state(CLIP(model_config), tx, settings.seed, mesh, ema)
    if settings.init.checkpoint:
        state = load_pretrained_params(
            state, state_shardings, settings.init.checkpoint, settings.init.regex, settings.init.trust_torchscript
        )
        if ema:  # the average starts at the parameters the run starts from
            state = start_ema(state, state_shardings.params)
    elif settings.optimizer.freeze_regex:
        metrics.announce(
            f"Warning: optimizer.freeze_regex {settings.optimizer.freeze_regex!r} freezes parameters that keep "
            "their random initialisation; set config.init.checkpoint to load pre-trained ones"
        )
    return _Model(tokenizer, model_config, state, state_shardings, {"step": 0})


def _ema_as_configured(state: TrainState, had_ema: bool, ema: bool, shardings: TrainState, step: int) -> TrainState:
    """The restored state with a moving average if and only if this run keeps one (config.ema):
    one started at the restored parameters, or the checkpoint's dropped, each said in one line."""
    if ema and not had_ema:
        metrics.announce(f"The checkpoint of step {step} has no EMA: the moving average starts at its parameters")
        return start_ema(state, shardings.params)
    if had_ema and not ema:
        metrics.announce(f"ema.decay=0: the moving average in the checkpoint of step {step} is not carried on")
        return state.replace(ema_params=None)
    return state


def _announce_model(settings: Settings, model_config: CLIPConfig, mesh: jax.sharding.Mesh, workdir: str) -> None:
    abstract = jax.eval_shape(lambda: CLIP(model_config).init_variables(jax.random.key(0)))["params"]
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
    metrics.announce(
        f"Model {settings.model.name}: {count:,} parameters; mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"devices in {jax.process_count()} process(es); workdir {workdir}"
    )


def load_pretrained_params(
    state: TrainState, state_shardings: TrainState, path: str, pattern: str, trust_torchscript: bool = False
) -> TrainState:
    """`state` with the parameters whose "/"-joined path matches `pattern` replaced by those of
    the checkpoint at `path` (anything `clip_jax.io.load_any` reads), laid out with the state's shardings.
    `trust_torchscript`: as in `clip_jax.load` (config.init.trust_torchscript)."""
    _, pretrained, _ = loading.load_any(path, trust_torchscript=trust_torchscript)
    flat_pretrained = traverse_util.flatten_dict(jax.device_get(pretrained["params"]), sep="/")
    compiled = re.compile(pattern)
    replaced = []

    def replace(key_path, leaf, leaf_sharding):
        name = parameter_path(key_path)
        if not compiled.search(name):
            return leaf
        if name not in flat_pretrained:
            raise ValueError(f"init.checkpoint {path!r} has no parameter {name!r} (matched by init.regex {pattern!r})")
        value = np.asarray(flat_pretrained[name], dtype=leaf.dtype)
        if value.shape != leaf.shape:
            raise ValueError(f"init.checkpoint {path!r}: {name} has shape {value.shape}, the model wants {leaf.shape}")
        replaced.append(name)
        return jax.make_array_from_callback(leaf.shape, leaf_sharding, lambda index: value[index])

    params = jax.tree_util.tree_map_with_path(replace, state.params, state_shardings.params)
    if not replaced:
        raise ValueError(f"init.regex {pattern!r} matches no parameter of the model")
    metrics.announce(f"Initialised {len(replaced)} parameters matching {pattern!r} from {path}")
    return state.replace(params=params)


# --------------------------------------------------------------------------------------------
# The compiled step.
# --------------------------------------------------------------------------------------------


def abstract_batch(
    settings: Settings, model_config: CLIPConfig, mesh: jax.sharding.Mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes: normalised float32 images and int32 token ids."""
    batch_sharding = sharding.batch_sharding(mesh)
    size, batch = model_config.vision.image_size, settings.step.global_batch_size
    return {
        "images": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=batch_sharding),
        "texts": jax.ShapeDtypeStruct((batch, model_config.text.context_length), jnp.int32, sharding=batch_sharding),
    }


def _compile_step(
    settings: Settings, model: CLIP, mesh: jax.sharding.Mesh, built: _Model, schedule: Callable
) -> tuple[Callable, float | None, float]:
    """(the compiled step, its model FLOPs per device, seconds to compile), announced."""
    batch = abstract_batch(settings, model.config, mesh)
    started = time.perf_counter()
    step = make_train_step(model, settings.step, mesh, built.state_shardings, schedule)
    compiled = step.lower(built.state, batch).compile()
    seconds = time.perf_counter() - started
    flops = step_flops_per_device(compiled, model, settings, mesh, built.state.tx)
    peak = metrics.device_peak_flops()
    metrics.announce(
        f"Compiled the train step in {seconds:.1f} s: "
        f"{'unknown' if flops is None else f'{flops:.3g}'} FLOPs per device per step; "
        + ("MFU unavailable (no peak known for this device)" if peak is None else f"device peak {peak:.3g} FLOP/s")
    )
    return compiled, flops, seconds


def unmasked_tuning_model(settings: Settings, model: CLIP) -> CLIP | None:
    """The model of FLIP's unmasked tuning phase: `model` without patch dropout (the same
    parameters: patch dropout has none); None when the run has no such phase."""
    if not (settings.unmasked_tuning_steps and model.config.vision.patch_dropout):
        return None
    return CLIP(model.config.replace(vision={"patch_dropout": 0.0}))


def _compile_unmasked_step(
    settings: Settings, model: CLIP, mesh: jax.sharding.Mesh, built: _Model, schedule: Callable
) -> Callable | None:
    """The step of the unmasked tuning phase, compiled once beside the masked one; None if not needed."""
    unmasked = unmasked_tuning_model(settings, model)
    if unmasked is None:
        return None
    batch = abstract_batch(settings, model.config, mesh)
    started = time.perf_counter()
    step = make_train_step(unmasked, settings.step, mesh, built.state_shardings, schedule)
    compiled = step.lower(built.state, batch).compile()
    metrics.announce(
        f"Compiled the unmasked step of the last {settings.unmasked_tuning_steps} steps "
        f"(FLIP's unmasked tuning) in {time.perf_counter() - started:.1f} s"
    )
    return compiled


def step_flops_per_device(
    compiled: Any, model: CLIP, settings: Settings, mesh: jax.sharding.Mesh, tx: Any, lowering_mesh: Any = None
) -> float | None:
    """The model FLOPs of one train step on one device, from XLA's cost analysis.

    XLA counts the body of a loop once, and model-FLOPs utilisation leaves out recomputation. So
    when the towers' layers are scanned, GradCache runs its micro-batches in a loop or a remat
    policy recomputes activations, the count comes from lowering (not compiling: cheap) the same
    step with layers unrolled, no accumulation and no remat, over all devices, divided by the
    device count; otherwise from the compiled step itself, where its backend counts. `lowering_mesh` (default `mesh`): where
    to lower that step; the program for the global batch is the same on any mesh, and an
    ahead-of-time target's devices give no cost analysis of a lowered program (clip_jax.aot
    lowers on one CPU device).
    """
    model_config = model.config
    if not model_config.scan_layers and model_config.remat_policy == "none" and settings.step.accumulation_steps == 1:
        flops = metrics.compiled_flops(compiled)
        if flops is not None:  # else (no cost analysis, e.g. a GPU compiled ahead of time): lowered
            return flops
    lowering_mesh = mesh if lowering_mesh is None else lowering_mesh
    unrolled = CLIP(model_config.replace(scan_layers=False, remat_policy="none"))
    step_settings = dataclasses.replace(settings.step, accumulation_steps=1)
    abstract_state, state_shardings = abstract_train_state(
        unrolled, tx, settings.seed, lowering_mesh, settings.ema.enabled
    )
    lowered = make_train_step(unrolled, step_settings, lowering_mesh, state_shardings).lower(
        abstract_state, abstract_batch(settings, model_config, lowering_mesh)
    )
    return metrics.lowered_flops(lowered, mesh.devices.size)


# --------------------------------------------------------------------------------------------
# Evaluation during training: the suite evaluate.py runs, on the training mesh.
# --------------------------------------------------------------------------------------------


class Evaluator:
    """Runs the evaluation suite (`settings.eval.suite`) on the current variables (the moving
    average when the run keeps one), on every process (the embeddings are gathered across
    processes), and logs its metrics."""

    def __init__(self, settings: Settings, model: CLIP, tokenizer: Any, mesh: Any, dataset: Any, writer: Any) -> None:
        self.suite_settings = settings.eval.suite
        self.every_steps = settings.eval.every_steps
        self._model, self._tokenizer, self._mesh, self._dataset, self._writer = model, tokenizer, mesh, dataset, writer
        if self.suite_settings is not None and dataset is None:
            # The built-in dataset's evaluations mean nothing for a model trained on other data.
            datasets = self.suite_settings.datasets
            kept = tuple(name for name in datasets if name not in suite.SYNTHETIC_DATASETS)
            if kept != datasets:
                metrics.announce(
                    f"Not evaluating on {sorted(set(datasets) - set(kept))} during training: the built-in "
                    f"dataset's, and this run trains on data.name={settings.data.name!r} (set config.eval.datasets)"
                )
            self.suite_settings = dataclasses.replace(self.suite_settings, datasets=kept) if kept else None

    def due(self, step: int, total_steps: int) -> bool:
        return self.suite_settings is not None and (step % self.every_steps == 0 or step == total_steps)

    def __call__(self, step: int, state: TrainState) -> None:
        """Evaluate `state.eval_variables`: the moving average of the parameters when the run keeps
        one (config.ema), else the parameters; the announced line says which."""
        results = suite.run_evaluation(
            self._model, state.eval_variables, self._tokenizer, self.suite_settings, synthetic=self._dataset,
            mesh=self._mesh, log=logging.info,
        )  # fmt: skip
        self._writer.write(step, suite.flatten_metrics(results))
        which = "" if state.ema_params is None else " [EMA parameters]"
        metrics.announce(f"step {step}: {suite.summary_line(results)}{which}")


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


def _data_source(settings: Settings) -> tuple[ExampleSource, Callable[[int], list[str]]]:
    """(this process's source of training examples, captions to fit a tokenizer on): the built-in
    dataset, TFDS or shards, all behind one interface. Shards are found and TFDS datasets opened
    here, so a bad path fails before anything is written."""
    layout = {
        "image_size": settings.model.model_config().vision.image_size,
        "global_batch_size": settings.step.global_batch_size,
    }
    source = data_iterator.make_train_source(settings.data, jax.process_index(), jax.process_count(), **layout)
    return source, functools.partial(data_iterator.tokenizer_captions, settings.data, **layout)


def _data_feed(
    settings: Settings, stack: contextlib.ExitStack, mesh: jax.sharding.Mesh, source: ExampleSource, built: _Model
) -> Iterator[tuple[dict[str, jax.Array], Any]]:
    """(global batch, data state after it) from the next step on, prepared ahead in a thread; the
    iterator resumes from the checkpoint's `data_states`, whatever the source."""
    iterator = data_iterator.make_train_iterator(
        settings.data, built.tokenizer, settings.step.global_batch_size, built.model_config.vision.image_size,
        jax.process_index(), jax.process_count(),
        start_state=data_iterator.local_state(built.progress.get("data_states"), jax.process_index(), jax.process_count()),
        source=source,
    )  # fmt: skip
    stack.callback(iterator.close)  # its decoding workers and shard readers
    batch_sharding = sharding.batch_sharding(mesh)
    prefetcher = Prefetcher(
        ((to_global_batch(batch, batch_sharding), state) for batch, state in iterator.batches_with_state()),
        int(settings.data.prefetch_batches),
    )
    stack.callback(prefetcher.close)
    return prefetcher
