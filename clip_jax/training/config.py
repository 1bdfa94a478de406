"""A training run's settings, in one place: the schema of every field with its default
(`base_config`, which the recipes in configs/ start from), the CLIP paper's recipe written as its
difference from the schema (`paper_config`), and `validate(config)`, which reads every field once,
checks it, and returns small frozen settings objects. The rest of training/ takes those objects,
never the ConfigDict, so a value is checked where it is read: here, before anything is built,
compiled or written to the workdir.

    settings = validate(config)
    settings.optimizer.learning_rate     # a finite float > 0, or validate raised naming the field
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import jax
import ml_collections

from clip_jax import losses
from clip_jax.data import iterator as data_iterator
from clip_jax.data.config import default_data_config
from clip_jax.evaluation.suite import EvaluationSettings
from clip_jax.models import CLIPConfig, get_model_config

TOKENIZER_KINDS = ("sentencepiece", "clip")
NONFINITE_POLICIES = ("skip", "stop")


# --------------------------------------------------------------------------------------------
# The schema.
# --------------------------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with its default (the recipes in configs/ change some).

    A config file starts from this so that any field can be set from the command line
    (`--config.FIELD=VALUE`; a locked ConfigDict refuses names it does not have).
    """
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter initialisation and the state's RNG
    config.global_batch_size = 256
    config.accumulation_steps = 1  # GradCache micro-batches per step
    config.total_steps = 1000
    # FLIP's unmasked tuning (docs/training.md, "Masked-patch training"): the last this many steps
    # of the schedule run without patch dropout (model.overrides.vision.patch_dropout). 0 = none.
    config.unmasked_tuning_steps = 0
    config.train_batch_norm = False  # ResNet BatchNorm: stored statistics unless True
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.model = _model_fields()
    config.loss = ml_collections.ConfigDict(
        # name: an objective of clip_jax.losses.OBJECTIVES (each says what it needs of the model);
        # "all_gather" or "ring"; the temperature's clamp [1, max]; the weights some objectives read.
        {"name": "softmax", "impl": "all_gather", "max_logit_scale": 100.0, "caption_weight": 2.0,
         "contrastive_weight": 1.0}
    )  # fmt: skip
    config.optimizer = _optimizer_fields()
    # A step whose loss, gradient norm or BatchNorm statistics are NaN or inf is not applied
    # (docs/training.md, "Non-finite steps"): "skip" counts it and stops the run after more than
    # max_consecutive_skips (>= 1) in a row; "stop" stops the run at the first.
    config.nonfinite = ml_collections.ConfigDict({"policy": "skip", "max_consecutive_skips": 10})
    # The axes inside one slice (-1 = the devices of a slice the others leave), and dcn_data: the
    # slices of a multislice TPU job that the data axis spans over the data-centre network (on GPU
    # hosts, one slice per process); -1 = every slice of the job, 1 on a single slice.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1, "dcn_data": -1})
    # An exponential moving average of the parameters (docs/training.md, "EMA"): decay 0 = off,
    # else in (0, 1); warmup: the decay of the n-th applied update is min(decay, (1 + n) / (10 + n)).
    config.ema = ml_collections.ConfigDict({"decay": 0.0, "warmup": True})
    # name, seed, prefetch_batches, decoding limits, data.tfds.*, data.webdataset.* (docs/data.md)
    config.data = default_data_config()
    config.tokenizer = _tokenizer_fields()
    config.eval = _eval_fields()
    config.init = _init_fields()
    config.checkpoint = ml_collections.ConfigDict(
        # keep_period: also keep every step divisible by it (0 = off).
        {"every_steps": 1000, "max_to_keep": 3, "keep_period": 0, "async_save": True}
    )
    return config


def _model_fields() -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.name = "tiny-vit"  # a clip_jax.available_models() name
    # CLIPConfig fields replaced for this run; vision=dict(...) may be added by a recipe. The text
    # tower's vocab_size, context_length, pooling and pad_id always come from the tokenizer.
    model.overrides = ml_collections.ConfigDict(
        {"dtype": "float32", "scan_layers": False, "remat_policy": "none", "attention_implementation": "auto"}
    )
    # FLIP's masked-patch training: the fraction of each image's patches a ViT drops while training
    # (0 = off), e.g. --config.model.overrides.vision.patch_dropout=0.5; see unmasked_tuning_steps.
    model.overrides.vision = ml_collections.ConfigDict({"patch_dropout": 0.0})
    return model


def _optimizer_fields() -> ml_collections.ConfigDict:
    optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = 5e-4
    optimizer.warmup_steps = 2000
    optimizer.b1 = 0.9
    optimizer.b2 = 0.98
    optimizer.eps = 1e-6
    optimizer.weight_decay = 0.2
    optimizer.no_decay_regex = r"(bias|norm|scale|embedding|logit_scale|logit_bias)"
    optimizer.grad_clip_norm = 1.0  # 0 = off
    optimizer.freeze_regex = ""  # e.g. "^visual/" for LiT
    return optimizer


def _tokenizer_fields() -> ml_collections.ConfigDict:
    tokenizer = ml_collections.ConfigDict()
    tokenizer.kind = "sentencepiece"  # trained on the training captions at the start; or "clip"
    tokenizer.vocab_size = 256
    tokenizer.model_type = "bpe"
    tokenizer.context_length = 16
    tokenizer.training_captions = 20000
    return tokenizer


def _eval_fields() -> ml_collections.ConfigDict:
    # Every eval_every_steps steps and at the end: clip_jax.evaluation.suite, as evaluate.py runs it.
    evaluation = ml_collections.ConfigDict()
    evaluation.num_examples = 512  # test images per dataset (0 = no evaluation during training)
    evaluation.tasks = "zero_shot"  # comma-separated: zero_shot, retrieval, linear_probe, few_shot
    # Comma-separated suite datasets: "synthetic" (the held-out colour x shape combinations),
    # "synthetic_seen" (only when training on the built-in dataset), TFDS names (docs/evaluation.md).
    evaluation.datasets = "synthetic"
    evaluation.prompt_modes = "class_name,single,ensemble"
    evaluation.data_dir = ""  # TFDS directory of the evaluation datasets ("" = TFDS's default)
    return evaluation


def _init_fields() -> ml_collections.ConfigDict:
    init = ml_collections.ConfigDict()
    init.checkpoint = ""  # a file or directory clip_jax.load reads, e.g. for LiT
    init.regex = "^visual/"  # which of its parameters to take
    # Only for a TorchScript init.checkpoint the safe reader cannot read: load it with torch.jit.load,
    # which runs the file's code. OpenAI's usual .pt files need no such consent.
    init.trust_torchscript = False
    return init


def paper_config() -> ml_collections.ConfigDict:
    """`base_config` changed to the CLIP paper's recipe at pod scale (configs/vit_*.py, rn50.py).

    The schema's optimizer is already the paper's AdamW (beta2 0.98, eps 1e-6, weight decay 0.2,
    2,000 warmup steps then cosine, peak 5e-4); the paper adds: no gradient clipping, a global
    batch of 32,768 for 32 epochs of 400M pairs, OpenAI's BPE with 77-token captions, and (ours)
    bf16 compute with scanned, rematerialised layers.
    """
    config = base_config()
    config.model.overrides.dtype = "bfloat16"  # compute; parameters stay float32
    config.model.overrides.scan_layers = True  # one compiled block per tower: fast compiles
    config.model.overrides.remat_policy = "dots_with_no_batch_dims_saveable"
    config.tokenizer.kind = "clip"  # OpenAI's byte-level BPE, 49,408 tokens
    config.tokenizer.context_length = 77
    config.optimizer.grad_clip_norm = 0.0  # the paper does not clip
    config.global_batch_size = 32768
    config.total_steps = 390_625
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint.every_steps = 2000
    config.checkpoint.keep_period = 50_000
    return config


# --------------------------------------------------------------------------------------------
# The settings objects: each checks its own fields when built.
# --------------------------------------------------------------------------------------------


def _require(condition: bool, field: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"{field} must be {expected}; got {value!r}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{field} {pattern!r} is not a valid regular expression: {error}") from None


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with linear warmup then cosine decay to 0 at `total_steps` (clip_jax.training.optimizer)."""

    learning_rate: float
    warmup_steps: int
    total_steps: int
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    no_decay_regex: str = r"(bias|norm|scale|embedding|logit_scale|logit_bias)"
    grad_clip_norm: float = 0.0  # 0 = off
    freeze_regex: str = ""  # "" = train everything

    def __post_init__(self) -> None:
        # A negative rate trains uphill, zero not at all, and NaN or inf poisons the first update.
        _require(_finite(self.learning_rate) and self.learning_rate > 0, "optimizer.learning_rate",
                 self.learning_rate, "a finite number > 0")  # fmt: skip
        _require(_is_integer(self.total_steps) and self.total_steps >= 1, "total_steps", self.total_steps, ">= 1")
        # The cosine divides by total - warmup.
        _require(_is_integer(self.warmup_steps) and 0 <= self.warmup_steps < self.total_steps,
                 "optimizer.warmup_steps", self.warmup_steps, f">= 0 and below total_steps ({self.total_steps})")  # fmt: skip
        for name in ("b1", "b2"):  # Adam's bias correction divides by 1 - beta ** t
            value = getattr(self, name)
            _require(_finite(value) and 0 <= value < 1, f"optimizer.{name}", value, "in [0, 1)")
        _require(_finite(self.eps) and self.eps > 0, "optimizer.eps", self.eps, "> 0")
        _require(
            _finite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0"
        )
        _require(_finite(self.grad_clip_norm) and self.grad_clip_norm >= 0, "optimizer.grad_clip_norm",
                 self.grad_clip_norm, ">= 0 (0 = off)")  # fmt: skip
        _check_regex("optimizer.no_decay_regex", self.no_decay_regex)
        _check_regex("optimizer.freeze_regex", self.freeze_regex)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    name: str = "softmax"  # losses.OBJECTIVES
    impl: str = "all_gather"  # losses.IMPLEMENTATIONS
    max_logit_scale: float = 100.0  # the temperature is clamped to [1, this]
    # The weights of the terms an objective's record weights by these settings (CoCa's: open_clip's
    # defaults, caption 2, contrastive 1); an objective with fixed weights ignores them.
    caption_weight: float = 2.0
    contrastive_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.name in losses.OBJECTIVES, "loss.name", self.name, f"one of {tuple(losses.OBJECTIVES)}")
        _require(self.impl in losses.IMPLEMENTATIONS, "loss.impl", self.impl, f"one of {losses.IMPLEMENTATIONS}")
        _require(_finite(self.max_logit_scale) and self.max_logit_scale >= 1, "loss.max_logit_scale",
                 self.max_logit_scale, ">= 1")  # fmt: skip
        for field in ("caption_weight", "contrastive_weight"):
            value = getattr(self, field)
            _require(_finite(value) and value > 0, f"loss.{field}", value, "a finite number > 0")

    @property
    def objective(self) -> losses.Objective:
        """The record of loss.name: its terms, what it needs of the model, its zero-shot scoring."""
        return losses.OBJECTIVES[self.name]

    @property
    def contrastive(self) -> str | None:
        """The contrastive loss of this objective (losses.LOSSES), or None when it has none."""
        return self.objective.contrastive

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each term the objective sums (losses.TERMS), in the order it sums them."""
        return self.objective.weights(self)


@dataclasses.dataclass(frozen=True)
class NonFiniteSettings:
    policy: str = "skip"  # NONFINITE_POLICIES
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        _require(self.policy in NONFINITE_POLICIES, "nonfinite.policy", self.policy, f"one of {NONFINITE_POLICIES}")
        # No "unlimited": a run whose every step is non-finite is not training, only spending its
        # budget; a large limit says the same thing explicitly.
        _require(_is_integer(self.max_consecutive_skips) and self.max_consecutive_skips >= 1,
                 "nonfinite.max_consecutive_skips", self.max_consecutive_skips,
                 ">= 1 (nonfinite.policy='stop' stops at the first non-finite step)")  # fmt: skip

    @property
    def tolerated_skips(self) -> int:
        """How many non-finite steps in a row the run survives: 0 for "stop"."""
        return 0 if self.policy == "stop" else self.max_consecutive_skips


@dataclasses.dataclass(frozen=True)
class EMASettings:
    """The exponential moving average of the parameters the step keeps (`TrainState.ema_params`).

    After each applied update the average moves toward the new parameters:
    ema <- ema + (1 - d) * (params - ema). With `warmup`, d = min(decay, (1 + n) / (10 + n)) for
    the update that follows n applied ones (TensorFlow's ExponentialMovingAverage `num_updates`
    rule, as in Flax's and big_vision's examples), so early averages are not dominated by the
    random initialisation; without it, d = decay from the first update."""

    decay: float = 0.0  # 0 = no EMA
    warmup: bool = True

    def __post_init__(self) -> None:
        # decay 1 would never move; a decay in (0, 1) is an average, 0 turns it off.
        _require(_finite(self.decay) and 0 <= self.decay < 1, "ema.decay", self.decay, "in [0, 1) (0 = off)")
        _require(isinstance(self.warmup, bool), "ema.warmup", self.warmup, "True or False")

    @property
    def enabled(self) -> bool:
        return self.decay > 0


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the jitted train step needs (clip_jax.training.step)."""

    global_batch_size: int
    optimizer: OptimizerSettings
    loss: LossSettings = LossSettings()
    nonfinite: NonFiniteSettings = NonFiniteSettings()
    accumulation_steps: int = 1  # GradCache micro-batches
    train_batch_norm: bool = False  # ResNet BatchNorm: stored statistics unless True
    ema: EMASettings = EMASettings()

    def __post_init__(self) -> None:
        _require(_is_integer(self.global_batch_size) and self.global_batch_size >= 1, "global_batch_size",
                 self.global_batch_size, ">= 1")  # fmt: skip
        _require(_is_integer(self.accumulation_steps) and self.accumulation_steps >= 1, "accumulation_steps",
                 self.accumulation_steps, ">= 1")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int = 1000
    max_to_keep: int = 3
    keep_period: int = 0  # also keep every step divisible by this (0 = off)
    async_save: bool = True

    def __post_init__(self) -> None:
        _require(
            _is_integer(self.every_steps) and self.every_steps >= 1, "checkpoint.every_steps", self.every_steps, ">= 1"
        )
        _require(
            _is_integer(self.max_to_keep) and self.max_to_keep >= 1, "checkpoint.max_to_keep", self.max_to_keep, ">= 1"
        )
        _require(_is_integer(self.keep_period) and self.keep_period >= 0, "checkpoint.keep_period",
                 self.keep_period, ">= 0 (0 = off)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    kind: str = "sentencepiece"  # TOKENIZER_KINDS
    vocab_size: int = 256  # sentencepiece only
    model_type: str = "bpe"  # sentencepiece only
    context_length: int = 16
    training_captions: int = 20000  # sentencepiece only: captions it is trained on

    def __post_init__(self) -> None:
        _require(self.kind in TOKENIZER_KINDS, "tokenizer.kind", self.kind, f"one of {TOKENIZER_KINDS}")
        _require(_is_integer(self.context_length) and self.context_length >= 2, "tokenizer.context_length",
                 self.context_length, ">= 2")  # fmt: skip
        if self.kind == "sentencepiece":
            _require(
                _is_integer(self.vocab_size) and self.vocab_size >= 1, "tokenizer.vocab_size", self.vocab_size, ">= 1"
            )
            _require(_is_integer(self.training_captions) and self.training_captions >= 1,
                     "tokenizer.training_captions", self.training_captions, ">= 1")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    name: str  # a clip_jax.available_models() name
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # CLIPConfig fields replaced

    def spec(self, tokenizer: Any | None = None) -> CLIPConfig:
        """The CLIPConfig the run trains: the registry entry and the overrides, with the text tower's
        vocabulary, context length, pooling and pad id taken from the tokenizer (when given)."""
        overrides = dict(self.overrides)
        if tokenizer is not None:
            overrides["text"] = {
                **overrides.get("text", {}),
                "vocab_size": tokenizer.vocab_size,
                "context_length": tokenizer.context_length,
                "pooling": tokenizer.pooling,
                "pad_id": tokenizer.pad_token_id,
            }
        return get_model_config(self.name, **overrides)


@dataclasses.dataclass(frozen=True)
class InitSettings:
    checkpoint: str = ""  # anything clip_jax.load reads ("" = train from scratch)
    regex: str = "^visual/"  # which of its parameters replace the fresh ones
    trust_torchscript: bool = False  # let torch.jit.load run an archive the safe reader refuses

    def __post_init__(self) -> None:
        _check_regex("init.regex", self.regex)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    data: int = -1  # -1 = the devices of a slice the other axes leave
    fsdp: int = 1
    model: int = 1
    dcn_data: int = -1  # slices the data axis spans (multislice); -1 = every slice of the job


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    every_steps: int
    suite: EvaluationSettings | None  # None: no evaluation during training (eval.num_examples = 0)

    def __post_init__(self) -> None:
        _require(_is_integer(self.every_steps) and self.every_steps >= 1, "eval_every_steps", self.every_steps, ">= 1")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run reads, checked. `record` is the config as JSON, saved with every checkpoint."""

    seed: int
    total_steps: int
    log_every_steps: int
    unmasked_tuning_steps: int
    model: ModelSettings
    tokenizer: TokenizerSettings
    step: StepSettings
    checkpoint: CheckpointSettings
    mesh: MeshSettings
    data: ml_collections.FrozenConfigDict
    eval: EvalSettings
    init: InitSettings
    record: dict[str, Any]

    @property
    def optimizer(self) -> OptimizerSettings:
        return self.step.optimizer

    @property
    def ema(self) -> EMASettings:
        return self.step.ema


# --------------------------------------------------------------------------------------------
# Reading the ConfigDict: every field once.
# --------------------------------------------------------------------------------------------


def _number(value: Any) -> Any:
    """An int as a float (`--config.ema.decay=0` parses as 0); anything else as it is, for the
    settings to refuse naming it."""
    return float(value) if _is_integer(value) else value


def _comma_separated(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in str(value).split(",") if item.strip())


def _evaluation(config: ml_collections.ConfigDict) -> EvalSettings:
    num_examples = config.eval.num_examples
    _require(_is_integer(num_examples) and num_examples >= 0, "eval.num_examples", num_examples,
             ">= 0 (0 = no evaluation during training)")  # fmt: skip
    suite = None
    if num_examples:
        try:
            suite = EvaluationSettings(
                tasks=_comma_separated(config.eval.tasks),
                datasets=_comma_separated(config.eval.datasets),
                prompt_modes=_comma_separated(config.eval.prompt_modes),
                batch_size=int(config.global_batch_size),
                max_examples=num_examples,
                data_dir=config.eval.data_dir or None,
            )
        except ValueError as error:
            raise ValueError(f"config.eval: {error}") from None
    return EvalSettings(every_steps=config.eval_every_steps, suite=suite)


def _optimizer(config: ml_collections.ConfigDict) -> OptimizerSettings:
    optimizer = config.optimizer
    return OptimizerSettings(
        learning_rate=float(optimizer.learning_rate),
        warmup_steps=optimizer.warmup_steps,
        total_steps=config.total_steps,
        b1=float(optimizer.b1),
        b2=float(optimizer.b2),
        eps=float(optimizer.eps),
        weight_decay=float(optimizer.weight_decay),
        no_decay_regex=str(optimizer.no_decay_regex),
        grad_clip_norm=float(optimizer.grad_clip_norm),
        freeze_regex=str(optimizer.freeze_regex),
    )


def _step(config: ml_collections.ConfigDict) -> StepSettings:
    return StepSettings(
        global_batch_size=config.global_batch_size,
        optimizer=_optimizer(config),
        loss=LossSettings(
            name=config.loss.name,
            impl=config.loss.impl,
            max_logit_scale=_number(config.loss.max_logit_scale),
            caption_weight=_number(config.loss.caption_weight),
            contrastive_weight=_number(config.loss.contrastive_weight),
        ),
        nonfinite=NonFiniteSettings(
            policy=config.nonfinite.policy, max_consecutive_skips=config.nonfinite.max_consecutive_skips
        ),
        accumulation_steps=config.accumulation_steps,
        train_batch_norm=bool(config.train_batch_norm),
        ema=EMASettings(decay=_number(config.ema.decay), warmup=config.ema.warmup),
    )


def _model(config: ml_collections.ConfigDict, loss: LossSettings) -> ModelSettings:
    model = ModelSettings(name=str(config.model.name), overrides=config.model.overrides.to_dict())
    # An unknown name or override raises here, naming it; then what the objective needs of the model.
    loss.objective.check_model(model.spec())
    return model


def validate(config: ml_collections.ConfigDict, process_count: int | None = None) -> Settings:
    """The settings of `config`, every field read and checked here; ValueError naming the field
    otherwise. Builds nothing (so it runs before anything is compiled or written)."""
    step = _step(config)
    process_count = jax.process_count() if process_count is None else process_count
    if step.global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {step.global_batch_size} is not divisible by the {process_count} processes"
        )
    _require(
        config.data.name in data_iterator.SOURCE_NAMES,
        "data.name",
        config.data.name,
        f"one of {data_iterator.SOURCE_NAMES}",
    )
    log_every_steps = config.log_every_steps
    _require(_is_integer(log_every_steps) and log_every_steps >= 1, "log_every_steps", log_every_steps, ">= 1")
    tuning = config.unmasked_tuning_steps
    _require(_is_integer(tuning) and 0 <= tuning <= step.optimizer.total_steps, "unmasked_tuning_steps", tuning,
             f">= 0 and at most total_steps ({step.optimizer.total_steps})")  # fmt: skip
    tokenizer = config.tokenizer
    checkpoint = config.checkpoint
    return Settings(
        seed=int(config.seed),
        total_steps=step.optimizer.total_steps,
        log_every_steps=log_every_steps,
        unmasked_tuning_steps=tuning,
        model=_model(config, step.loss),
        tokenizer=TokenizerSettings(
            kind=tokenizer.kind,
            vocab_size=tokenizer.vocab_size,
            model_type=str(tokenizer.model_type),
            context_length=tokenizer.context_length,
            training_captions=tokenizer.training_captions,
        ),
        step=step,
        checkpoint=CheckpointSettings(
            every_steps=checkpoint.every_steps,
            max_to_keep=checkpoint.max_to_keep,
            keep_period=checkpoint.keep_period,
            async_save=bool(checkpoint.async_save),
        ),
        mesh=MeshSettings(
            data=config.mesh.data, fsdp=config.mesh.fsdp, model=config.mesh.model, dcn_data=config.mesh.dcn_data
        ),
        data=ml_collections.FrozenConfigDict(config.data),
        eval=_evaluation(config),
        init=InitSettings(
            checkpoint=str(config.init.checkpoint),
            regex=str(config.init.regex),
            trust_torchscript=bool(config.init.trust_torchscript),
        ),
        record=json.loads(config.to_json_best_effort()),
    )
