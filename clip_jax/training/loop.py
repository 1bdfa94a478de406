"""The training loop: `train_and_evaluate(config, workdir)` sets up the mesh, tokenizer, model,
sharded state (fresh or resumed from the newest checkpoint), feeds each process's share of the
data, runs the compiled step, logs metrics, runs the evaluation suite and checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from clip_jax import losses, metrics, sharding
from clip_jax.data import iterator as data_iterator
from clip_jax.data import sources as data_sources
from clip_jax.data.config import default_data_config
from clip_jax.data.prefetch import Prefetcher, to_global_batch
from clip_jax.data.synthetic import SyntheticSource
from clip_jax.evaluation import suite
from clip_jax.models import CLIP, CLIPConfig, get_model_config
from clip_jax.training import checkpointing, nonfinite
from clip_jax.training.optimizer import check_optimizer_config
from clip_jax.training.state import TrainState, abstract_train_state, create_train_state
from clip_jax.training.step import make_train_step
from clip_jax.training.workdir_lock import WorkdirLock, WorkdirLockedError

DATA_SOURCES = data_iterator.SOURCE_NAMES  # ("synthetic", "tfds", "webdataset")
TOKENIZER_KINDS = ("sentencepiece", "clip")
SENTENCEPIECE_FILE = "tokenizer.model"


# --------------------------------------------------------------------------------------------
# Every field of a training config, with its default; configs/*.py start from this.
# --------------------------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
    """Every field `train_and_evaluate` reads, with defaults (the recipes in configs/ change them).

    A config file starts from this so that any field can be set from the command line
    (`--config.FIELD=VALUE`; a locked ConfigDict refuses names it does not have).
    """
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter initialisation and the state's RNG

    config.model = ml_collections.ConfigDict()
    config.model.name = "tiny-vit"  # a clip_jax.available_models() name
    # CLIPConfig fields replaced for this run; vision=dict(...) may be added by a recipe. The text
    # tower's vocab_size, context_length, pooling and pad_id always come from the tokenizer.
    config.model.overrides = ml_collections.ConfigDict(
        {"dtype": "float32", "scan_layers": False, "remat_policy": "none", "attention_implementation": "auto"}
    )

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "softmax"  # "softmax" (CLIP) or "sigmoid" (SigLIP)
    config.loss.impl = "all_gather"  # or "ring"
    config.loss.max_logit_scale = 100.0  # CLIP clamps the learned temperature at 100

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 5e-4
    config.optimizer.warmup_steps = 2000
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.2
    config.optimizer.no_decay_regex = r"(bias|norm|scale|embedding|logit_scale|logit_bias)"
    config.optimizer.grad_clip_norm = 1.0  # 0 = off
    config.optimizer.freeze_regex = ""  # e.g. "^visual/" for LiT

    # A step whose loss or gradient is NaN or inf is not applied (docs/training.md,
    # "Non-finite steps"): "skip" counts it and stops the run after more than
    # max_consecutive_skips (>= 1) in a row; "stop" stops the run at the first.
    config.nonfinite = nonfinite.default_config()

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1 = the devices the other axes leave
    config.mesh.fsdp = 1
    config.mesh.model = 1

    config.global_batch_size = 256
    config.accumulation_steps = 1  # GradCache micro-batches per step
    config.total_steps = 1000
    config.train_batch_norm = False  # ResNet BatchNorm: stored statistics unless True

    # name, seed, prefetch_batches, decoding limits, data.tfds.*, data.webdataset.*, num_held_out (docs/data.md)
    config.data = default_data_config()

    config.tokenizer = ml_collections.ConfigDict()
    config.tokenizer.kind = "sentencepiece"  # trained on the training captions at the start; or "clip"
    config.tokenizer.vocab_size = 256
    config.tokenizer.model_type = "bpe"
    config.tokenizer.context_length = 16
    config.tokenizer.training_captions = 20000

    # Every eval_every_steps steps and at the end: clip_jax.evaluation.suite, as evaluate.py runs it.
    config.eval = ml_collections.ConfigDict()
    config.eval.num_examples = 512  # test images per dataset (0 = no evaluation during training)
    config.eval.tasks = "zero_shot"  # comma-separated: zero_shot, retrieval, linear_probe, few_shot
    # Comma-separated suite datasets: "synthetic" (the held-out colour x shape combinations),
    # "synthetic_seen" (only when training on the built-in dataset), TFDS names (docs/evaluation.md).
    config.eval.datasets = "synthetic"
    config.eval.prompt_modes = "class_name,single,ensemble"
    config.eval.data_dir = ""  # TFDS directory of the evaluation datasets ("" = TFDS's default)

    config.init = ml_collections.ConfigDict()
    config.init.checkpoint = ""  # a file or directory clip_jax.load reads, e.g. for LiT
    config.init.regex = "^visual/"  # which of its parameters to take
    # Only for a TorchScript init.checkpoint the safe reader cannot read: load it with torch.jit.load,
    # which runs the file's code. OpenAI's usual .pt files need no such consent.
    config.init.trust_torchscript = False

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.max_to_keep = 3
    config.checkpoint.keep_period = 0  # also keep every step divisible by this (0 = off)
    config.checkpoint.async_save = True

    config.log_every_steps = 50
    config.eval_every_steps = 1000
    return config


def paper_config() -> ml_collections.ConfigDict:
    """`base_config` with the CLIP paper's recipe at pod scale, shared by configs/vit_*.py and rn50.py.

    AdamW (beta2 0.98, eps 1e-6, weight decay 0.2, no clipping), 2,000 warmup steps then cosine,
    global batch 32,768 for 32 epochs of 400M pairs, temperature clamped at 100, OpenAI's BPE;
    bf16 compute with scanned, rematerialised layers.
    """
    config = base_config()
    config.model.overrides.dtype = "bfloat16"  # compute; parameters stay float32
    config.model.overrides.scan_layers = True  # one compiled block per tower: fast compiles
    config.model.overrides.remat_policy = "dots_with_no_batch_dims_saveable"
    config.tokenizer.kind = "clip"  # OpenAI's byte-level BPE, 49,408 tokens
    config.tokenizer.context_length = 77
    config.loss.name = "softmax"
    config.loss.max_logit_scale = 100.0
    config.optimizer.learning_rate = 5e-4
    config.optimizer.warmup_steps = 2000
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.2
    config.optimizer.grad_clip_norm = 0.0  # the paper does not clip
    config.global_batch_size = 32768
    config.total_steps = 390_625
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint.every_steps = 2000
    config.checkpoint.max_to_keep = 3
    config.checkpoint.keep_period = 50_000
    return config


# --------------------------------------------------------------------------------------------
# Checks that run before anything is built or compiled.
# --------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the offending field for settings that cannot work; builds nothing."""
    get_model_config(config.model.name)  # unknown model names raise here, listing the known ones
    if config.loss.name not in losses.LOSSES:
        raise ValueError(f"unknown loss.name {config.loss.name!r}; expected one of {losses.LOSSES}")
    if config.loss.impl not in losses.IMPLEMENTATIONS:
        raise ValueError(f"unknown loss.impl {config.loss.impl!r}; expected one of {losses.IMPLEMENTATIONS}")
    if config.data.name not in DATA_SOURCES:
        raise ValueError(f"unknown data.name {config.data.name!r}; expected one of {DATA_SOURCES}")
    if config.tokenizer.kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer.kind {config.tokenizer.kind!r}; expected one of {TOKENIZER_KINDS}")
    for field in ("total_steps", "global_batch_size", "log_every_steps", "eval_every_steps", "accumulation_steps"):
        if int(config[field]) < 1:
            raise ValueError(f"{field} must be >= 1; got {config[field]}")
    # Numbers that would make training diverge or never stop diverging: the learning rate and the
    # rest of AdamW's settings, and the non-finite guard's policy.
    check_optimizer_config(config.optimizer, int(config.total_steps))
    nonfinite.check_config(config.nonfinite)
    if int(config.eval.num_examples) < 0:
        raise ValueError(f"eval.num_examples must be >= 0; got {config.eval.num_examples}")
    if int(config.eval.num_examples):
        evaluation_settings(config)  # unknown tasks, prompt modes or no dataset raise here
    if config.global_batch_size % jax.process_count():
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the {jax.process_count()} processes"
        )


def model_spec(config: ml_collections.ConfigDict, tokenizer: Any | None = None) -> CLIPConfig:
    """The CLIPConfig the run trains: the registry entry, the config's overrides, and the text
    tower's vocabulary, context length and pooling taken from the tokenizer (when given)."""
    overrides = config.model.overrides.to_dict()
    if config.loss.name == "sigmoid" and "logit_bias_init" not in overrides:
        raise ValueError("loss.name='sigmoid' needs model.overrides.logit_bias_init (e.g. -10.0, SigLIP's)")
    if tokenizer is not None:
        overrides["text"] = {
            **overrides.get("text", {}),
            "vocab_size": tokenizer.vocab_size,
            "context_length": tokenizer.context_length,
            "pooling": tokenizer.pooling,
            "pad_id": tokenizer.pad_token_id,
        }
    return get_model_config(config.model.name, **overrides)


def _count_parameters(spec: CLIPConfig) -> int:
    abstract = jax.eval_shape(lambda: CLIP(spec).init_variables(jax.random.key(0)))["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


# --------------------------------------------------------------------------------------------
# The tokenizer: trained on the training captions at the start of a run, saved in the workdir.
# --------------------------------------------------------------------------------------------


def build_tokenizer(config: ml_collections.ConfigDict, caption_sample: Callable[[int], list[str]], workdir: str) -> Any:
    """A fresh tokenizer for a new run, its files written into `workdir` (by process 0).

    "sentencepiece": trained by process 0 on the first `tokenizer.training_captions` training
    captions and sent to the other processes; "clip": OpenAI's BPE (the file is copied).
    """
    from clip_jax import tokenizer as tokenizers

    tokenizer_config = config.tokenizer
    context_length = int(tokenizer_config.context_length)
    if tokenizer_config.kind == "clip":
        tokenizer = tokenizers.ClipTokenizer(context_length=context_length)
        if jax.process_index() == 0:
            for asset in tokenizer.asset_files():
                _write_bytes(_join(workdir, os.path.basename(asset)), _read_bytes(asset))
        return tokenizer
    model_bytes = None
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory(prefix="clip_jax-") as directory:
            path = tokenizers.train_sentencepiece(
                caption_sample(int(tokenizer_config.training_captions)),
                int(tokenizer_config.vocab_size),
                os.path.join(directory, SENTENCEPIECE_FILE),
                model_type=tokenizer_config.model_type,
                hard_vocab_limit=False,  # a small caption vocabulary may need fewer pieces
            )
            model_bytes = _read_bytes(path)
    model_bytes = checkpointing.broadcast_bytes(model_bytes)
    if jax.process_index() == 0:
        _write_bytes(_join(workdir, SENTENCEPIECE_FILE), model_bytes)
    if jax.process_index() == 0 and "://" not in workdir:
        # Load the run's own copy: no scratch file to outlive a killed process.
        local_path = os.path.join(workdir, SENTENCEPIECE_FILE)
    else:
        local_path = os.path.join(_scratch_directory(), SENTENCEPIECE_FILE)
        with open(local_path, "wb") as file:
            file.write(model_bytes)
    return tokenizers.SentencePieceTokenizer(local_path, context_length=context_length)


def tokenizer_from_workdir(tokenizer_config: dict[str, Any], workdir: str) -> Any:
    """The tokenizer a run saved in `workdir` (copied to a local directory if `workdir` is remote)."""
    from clip_jax import tokenizer as tokenizers

    if "://" not in workdir:
        return tokenizers.tokenizer_from_config(tokenizer_config, workdir)
    local_directory = _scratch_directory()
    for key, name in tokenizer_config.items():
        if key.endswith("_file"):
            with open(os.path.join(local_directory, name), "wb") as file:
                file.write(_read_bytes(_join(workdir, name)))
    return tokenizers.tokenizer_from_config(tokenizer_config, local_directory)


def _scratch_directory() -> str:
    """A new local directory, removed when the process exits (tokenizer files live there)."""
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix="clip_jax-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name if "://" in directory else os.path.join(directory, name)


def _write_bytes(path: str, data: bytes) -> None:
    if "://" in path:
        from etils import epath

        epath.Path(path).write_bytes(data)
        return
    temporary = path + ".partial"
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, path)  # atomic: a reader never sees half a file


def _read_bytes(path: str) -> bytes:
    if "://" in path:
        from etils import epath

        return epath.Path(path).read_bytes()
    with open(path, "rb") as file:
        return file.read()


def _make_workdir(workdir: str) -> None:
    if "://" in workdir:
        from etils import epath

        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(workdir, exist_ok=True)


# --------------------------------------------------------------------------------------------
# Evaluation during training: the suite evaluate.py runs, on the training mesh.
# --------------------------------------------------------------------------------------------


def _comma_separated(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in str(value).split(",") if item.strip())


def evaluation_settings(config: ml_collections.ConfigDict) -> suite.EvaluationSettings:
    """The suite settings of the evaluations run during training (config.eval); raises ValueError on
    unknown tasks or prompt modes."""
    return suite.EvaluationSettings(
        tasks=_comma_separated(config.eval.tasks),
        datasets=_comma_separated(config.eval.datasets),
        prompt_modes=_comma_separated(config.eval.prompt_modes),
        batch_size=int(config.global_batch_size),
        max_examples=int(config.eval.num_examples),
        data_dir=config.eval.data_dir or None,
    )


def evaluation_summary(results: dict[str, Any]) -> str:
    """One line of the suite's headline numbers: zero-shot top-1 per dataset and prompt mode, retrieval
    R@1, linear-probe top-1 and the largest few-shot k's top-1."""
    parts = []
    for name, entry in results.get("zero_shot", {}).items():
        modes = [mode for mode in suite.PROMPT_MODES if mode in entry]
        text = f"zero-shot {name} " + " / ".join(f"{mode} {entry[mode]['top1']:.3f}" for mode in modes)
        if "chance_top1" in entry:
            text += f" (chance {entry['chance_top1']:.3f}; among all classes {entry['top1_among_all_classes']:.3f})"
        parts.append(text)
    for name, entry in results.get("retrieval", {}).items():
        recalls = entry["image_to_text_R@1"], entry["text_to_image_R@1"]
        parts.append(f"retrieval {name} R@1 image->text {recalls[0]:.3f}, text->image {recalls[1]:.3f}")
    for name, entry in results.get("linear_probe", {}).items():
        parts.append(f"linear probe {name} {entry['top1']:.3f}")
    for name, entry in results.get("few_shot", {}).items():
        shots = max(entry["shots"], key=int)
        parts.append(f"{shots}-shot {name} {entry['shots'][shots]['top1_mean']:.3f}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Pre-trained initialisation (LiT: a locked, pre-trained image tower).
# --------------------------------------------------------------------------------------------


def load_pretrained_params(
    state: TrainState, state_shardings: TrainState, path: str, pattern: str, trust_torchscript: bool = False
) -> TrainState:
    """`state` with the parameters whose "/"-joined path matches `pattern` replaced by those of
    the checkpoint at `path` (anything `clip_jax.load` reads), laid out with the state's shardings.
    `trust_torchscript`: as in `clip_jax.load` (config.init.trust_torchscript)."""
    import re

    from flax import traverse_util

    from clip_jax.checkpoint import load
    from clip_jax.training.optimizer import parameter_path

    _, pretrained, _, _ = load(path, trust_torchscript=trust_torchscript)
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
    announce(f"Initialised {len(replaced)} parameters matching {pattern!r} from {path}")
    return state.replace(params=params)


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def train_step_flops_per_device(
    compiled_step: Any, model: CLIP, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, abstract_batch: Any
) -> float | None:
    """The model FLOPs of one train step on one device, from XLA's cost analysis.

    XLA counts the body of a loop once, and model-FLOPs utilisation leaves out recomputation. So
    when the towers' layers are scanned, GradCache runs its micro-batches in a loop or a remat
    policy recomputes activations, the count comes from lowering (not compiling: cheap) the same
    step with layers unrolled, no accumulation and no remat, over all devices, divided by the
    device count; otherwise from the compiled step itself.
    """
    spec = model.config
    if not spec.scan_layers and spec.remat_policy == "none" and int(config.accumulation_steps) == 1:
        return metrics.compiled_flops(compiled_step)
    unrolled_config = copy.deepcopy(config)
    unrolled_config.accumulation_steps = 1
    unrolled_model = CLIP(spec.replace(scan_layers=False, remat_policy="none"))
    abstract_state, state_shardings = abstract_train_state(unrolled_config, unrolled_model, mesh)
    lowered = make_train_step(unrolled_model, unrolled_config, mesh, state_shardings).lower(abstract_state, abstract_batch)
    analysis = lowered.cost_analysis()
    if not analysis or not analysis.get("flops"):
        return None
    return float(analysis["flops"]) / mesh.devices.size


def announce(message: str) -> None:
    """A line for the person watching: printed by process 0 (above the progress bar), and logged."""
    logging.info(message)
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message)


def _scalar_metrics(step_metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(np.asarray(value)) for name, value in jax.device_get(step_metrics).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (or resume training) the model of `config`, writing checkpoints and logs to `workdir`.

    Every process of a multi-host job calls this with the same arguments. Returns the final state
    (after `config.total_steps` steps, or earlier when a preemption notice stopped the run).
    """
    validate_config(config)
    # Listen for a preemption notice (SIGTERM) from the start: one arriving while compiling still
    # ends the run cleanly, after its first step, with a checkpoint.
    preemption = checkpointing.PreemptionWatcher()
    try:
        return _train_and_evaluate(config, workdir, preemption)
    finally:
        preemption.close()


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, preemption: checkpointing.PreemptionWatcher
) -> TrainState:
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(int(config.global_batch_size), mesh, int(config.accumulation_steps))
    # The data is checked (shards found, TFDS dataset prepared) before anything is written.
    data_layout = {"image_size": model_spec(config).vision.image_size, "global_batch_size": int(config.global_batch_size)}
    train_source = data_iterator.make_train_source(config.data, jax.process_index(), jax.process_count(), **data_layout)
    caption_sample = functools.partial(data_iterator.tokenizer_captions, config.data, **data_layout)
    if jax.process_index() == 0:
        _make_workdir(workdir)
    lock = _lock_workdir(workdir)
    try:
        return _train_in_locked_workdir(config, workdir, preemption, mesh, train_source, caption_sample)
    finally:
        if lock is not None:
            lock.release()
        train_source.close()


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
        message = checkpointing.broadcast_bytes(message if jax.process_index() == 0 else None)
    if message:
        raise WorkdirLockedError(message.decode("utf-8"))
    return lock


def _train_in_locked_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    preemption: checkpointing.PreemptionWatcher,
    mesh: jax.sharding.Mesh,
    train_source: data_sources.ExampleSource,
    caption_sample: Callable[[int], list[str]],
) -> TrainState:
    checkpoint_config = config.checkpoint
    checkpointer = checkpointing.TrainingCheckpointer(
        workdir,
        every_steps=int(checkpoint_config.every_steps),
        max_to_keep=int(checkpoint_config.max_to_keep),
        keep_period=int(checkpoint_config.keep_period),
        async_save=bool(checkpoint_config.async_save),
    )
    try:
        state = _run(config, workdir, preemption, mesh, train_source, caption_sample, checkpointer)
    except BaseException:
        checkpointer.close(raise_errors=False)  # the error being raised says what went wrong
        raise
    checkpointer.close()
    return state


def _run(
    config: ml_collections.ConfigDict,
    workdir: str,
    preemption: checkpointing.PreemptionWatcher,
    mesh: jax.sharding.Mesh,
    train_source: data_sources.ExampleSource,
    caption_sample: Callable[[int], list[str]],
    checkpointer: checkpointing.TrainingCheckpointer,
) -> TrainState:
    # Tokenizer and model: from the checkpoint's record when resuming, so a resumed run tokenizes
    # exactly as before; a record of another model is refused here, before anything is compiled.
    resumed_with: dict[str, Any] = {}

    def abstract_state_for(record: dict[str, Any]) -> TrainState:
        tokenizer = tokenizer_from_workdir(record["tokenizer"], workdir)
        spec = model_spec(config, tokenizer)
        checkpointing.check_same_model(record["model"], spec.to_dict(), workdir)
        resumed_with.update(tokenizer=tokenizer, spec=spec)
        return abstract_train_state(config, CLIP(spec), mesh)[0]

    resumed = checkpointer.restore_newest(abstract_state_for, announce=announce)
    if resumed is not None:
        tokenizer, spec = resumed_with["tokenizer"], resumed_with["spec"]
    else:
        tokenizer = build_tokenizer(config, caption_sample, workdir)
        spec = model_spec(config, tokenizer)
    model = CLIP(spec)
    run_record = {"model": spec.to_dict(), "tokenizer": tokenizer.to_config(), "training": config_to_dict(config)}
    announce(
        f"Model {config.model.name}: {_count_parameters(spec):,} parameters; mesh {dict(mesh.shape)} over "
        f"{jax.device_count()} devices in {jax.process_count()} process(es); workdir {workdir}"
    )

    if resumed is not None:
        _, _, state, progress = resumed
        _, state_shardings = abstract_train_state(config, model, mesh)
        start_step = int(progress["step"])
        data_states = progress.get("data_states")  # every process's data iterator state
        announce(f"Resumed from the checkpoint of step {start_step} in {checkpointer.directory}")
    else:
        state, state_shardings = create_train_state(config, model, mesh)
        if config.init.checkpoint:
            state = load_pretrained_params(
                state, state_shardings, config.init.checkpoint, config.init.regex,
                trust_torchscript=bool(config.init.get("trust_torchscript", False)),
            )  # fmt: skip
        elif config.optimizer.freeze_regex:
            announce(
                f"Warning: optimizer.freeze_regex {config.optimizer.freeze_regex!r} freezes parameters that "
                "keep their random initialisation; set config.init.checkpoint to load pre-trained ones"
            )
        start_step = 0
        data_states = None

    total_steps = int(config.total_steps)
    global_batch_size = int(config.global_batch_size)
    batch_sharding = sharding.batch_sharding(mesh)
    image_size = spec.vision.image_size
    abstract_batch = {
        "images": jax.ShapeDtypeStruct((global_batch_size, image_size, image_size, 3), jnp.float32, sharding=batch_sharding),
        "texts": jax.ShapeDtypeStruct((global_batch_size, spec.text.context_length), jnp.int32, sharding=batch_sharding),
    }
    train_step = make_train_step(model, config, mesh, state_shardings)
    compile_start = time.perf_counter()
    compiled_step = train_step.lower(state, abstract_batch).compile()
    compile_seconds = time.perf_counter() - compile_start
    flops_per_device = train_step_flops_per_device(compiled_step, model, config, mesh, abstract_batch)
    peak_flops = metrics.device_peak_flops()
    announce(
        f"Compiled the train step in {compile_seconds:.1f} s: "
        f"{'unknown' if flops_per_device is None else f'{flops_per_device:.3g}'} FLOPs per device per step; "
        + ("MFU unavailable (no peak known for this device)" if peak_flops is None else f"device peak {peak_flops:.3g} FLOP/s")
    )

    writer = metrics.MetricsWriter(workdir)
    # Stops the run (NonFiniteError) on non-finite steps; reads the state only when the loop syncs.
    guard = nonfinite.Guard(config.nonfinite, checkpointer, mesh, announce)
    writer.write(start_step, {"compile_seconds": compile_seconds, "flops_per_device_per_step": flops_per_device})
    eval_settings = evaluation_settings(config) if int(config.eval.num_examples) else None
    # The built-in dataset the model trains on, evaluated on its held-out combinations.
    synthetic_data = train_source.dataset if isinstance(train_source, SyntheticSource) else None
    if eval_settings is not None and synthetic_data is None:
        # The built-in dataset's evaluations mean nothing for a model trained on other data.
        kept = tuple(name for name in eval_settings.datasets if name not in suite.SYNTHETIC_DATASETS)
        if kept != eval_settings.datasets:
            announce(
                f"Not evaluating on {sorted(set(eval_settings.datasets) - set(kept))} during training: the built-in "
                f"dataset's, and this run trains on data.name={config.data.name!r} (set config.eval.datasets)"
            )
        eval_settings = dataclasses.replace(eval_settings, datasets=kept) if kept else None

    def evaluate(step: int) -> None:
        if eval_settings is None:
            return
        # Every process runs it: embedding gathers across processes.
        results = suite.run_evaluation(
            model, state.variables, tokenizer, eval_settings, synthetic=synthetic_data, mesh=mesh, log=logging.info
        )
        writer.write(step, suite.flatten_metrics(results))
        announce(f"step {step}: {evaluation_summary(results)}")

    def save(step: int, force: bool) -> None:
        if force or checkpointer.manager.should_save(step):
            guard.check_before_save(state, step)  # never save a state that is not finite
        progress = {"step": step}
        if force or checkpointer.manager.should_save(step):
            progress["data_states"] = data_iterator.gather_states(data_state)  # a collective: only when saving
        checkpointer.save(step, state, progress, run_record, force=force)

    # Every source, the built-in one included, goes through the one iterator: (local batch,
    # iterator state after it) pairs, resumed from the checkpoint's states.
    train_iterator = data_iterator.make_train_iterator(
        config.data,
        tokenizer,
        global_batch_size,
        image_size,
        jax.process_index(),
        jax.process_count(),
        start_state=data_iterator.local_state(data_states, jax.process_index(), jax.process_count()),
        source=train_source,
    )
    batches = Prefetcher(
        ((to_global_batch(batch, batch_sharding), batch_state) for batch, batch_state in train_iterator.batches_with_state()),
        int(config.data.prefetch_batches),
    )
    progress_bar = metrics.ProgressBar(total_steps, start_step)
    step = start_step
    preempted = False
    try:
        last_log_time, last_log_step, data_wait = time.perf_counter(), step, 0.0
        step_metrics = None
        while step < total_steps:
            wait_start = time.perf_counter()
            batch, data_state = next(batches)
            data_wait += time.perf_counter() - wait_start
            state, step_metrics = compiled_step(state, batch)
            step += 1
            progress_bar.update()
            checkpointer.check_for_errors()  # a failed background save stops the run now

            if step % config.log_every_steps == 0 or step == total_steps:
                scalars = _scalar_metrics(step_metrics)  # waits for this step: the only sync
                now = time.perf_counter()
                step_seconds = (now - last_log_time) / (step - last_log_step)
                scalars.update(
                    step_seconds=step_seconds,
                    pairs_per_second=global_batch_size / step_seconds,
                    pairs_per_second_per_device=global_batch_size / step_seconds / jax.device_count(),
                    data_wait_fraction=data_wait / (now - last_log_time),
                    mfu=metrics.model_flops_utilization(flops_per_device, step_seconds, peak_flops),
                )
                counters = data_iterator.summed_counters(data_iterator.gather_states(data_state))
                scalars.update({f"data/{name}": count for name, count in counters.items()})
                writer.write(step, scalars)
                progress_bar.show({name: scalars.get(name) for name in ("loss", "pairs_per_second", "mfu")})
                guard.check_counters(state, step)
                last_log_time, last_log_step, data_wait = time.perf_counter(), step, 0.0

            if preemption.should_stop(step):
                preempted = True
                save(step, force=True)
                announce(f"Preemption notice: saving the checkpoint of step {step} and stopping")
                break
            # Saving first lets the checkpoint's write (asynchronous) overlap the evaluation.
            save(step, force=step == total_steps)
            if step % config.eval_every_steps == 0 or step == total_steps:
                evaluate(step)
                last_log_time = time.perf_counter()  # the evaluation is not training time
        if start_step >= total_steps:
            announce(f"The workdir's checkpoint is already at step {start_step} >= total_steps={total_steps}")
    finally:
        batches.close()
        train_iterator.close()  # its decoding threads and the source's readers
        progress_bar.close()
        writer.close()
    checkpointer.wait_until_finished()  # the last save is committed before the run says it is done
    if preempted:
        announce(f"Stopped at step {step} on a preemption notice; run the same command to resume")
    else:
        announce(f"Done: step {step}; checkpoints in {checkpointer.directory}")
    return state
