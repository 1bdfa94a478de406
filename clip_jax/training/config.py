"""A training run's settings, in one place: every field written once, with its type, default and
comment, in the frozen dataclasses below (`Settings`, the root, and its sections); the ConfigDict
schema made from them (`base_config`, which the recipes in configs/ start from); the CLIP paper's
recipe written as its difference from the schema (`paper_config`); and `validate(config)`, which
reads every field back by its type (clip_jax.settings_schema), checks it, and returns the settings
objects. The rest of training/ takes those objects, never the ConfigDict, so a value is checked
where it is read: here, before anything is built, compiled or written to the workdir.

    settings = validate(config)
    settings.optimizer.learning_rate     # a finite float > 0, or validate raised naming the field
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from typing import Any

import jax
import ml_collections

from clip_jax import losses
from clip_jax import settings_schema as schema
from clip_jax.data.config import DataSettings
from clip_jax.evaluation.suite import EvaluationSettings
from clip_jax.models import CLIPConfig, get_model_config

TOKENIZER_KINDS = ("sentencepiece", "clip")
NONFINITE_POLICIES = ("skip", "stop")


# --------------------------------------------------------------------------------------------
# The schema: `Settings` and the dataclasses of its sections, each field with its default.
# --------------------------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with its default (the recipes in configs/ change some): the
    ConfigDict of `Settings`'s defaults.

    A config file starts from this so that any field can be set from the command line
    (`--config.FIELD=VALUE`; a locked ConfigDict refuses names it does not have).
    """
    return schema.config_dict(Settings)


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
        schema.refuse(field, expected, value)


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

    total_steps: int = schema.given("total_steps")  # the run's, a top-level field
    learning_rate: float = 5e-4
    warmup_steps: int = 2000
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    no_decay_regex: str = r"(bias|norm|scale|embedding|logit_scale|logit_bias)"
    grad_clip_norm: float = 1.0  # 0 = off
    freeze_regex: str = ""  # "" = train everything, e.g. "^visual/" for LiT

    def __post_init__(self) -> None:
        # A negative rate trains uphill, zero not at all, and NaN or inf poisons the first update.
        _require(_finite(self.learning_rate) and self.learning_rate > 0, "optimizer.learning_rate",
                 self.learning_rate, "a finite number > 0")  # fmt: skip
        _require(schema.is_int(self.total_steps) and self.total_steps >= 1, "total_steps", self.total_steps, ">= 1")
        # The cosine divides by total - warmup.
        _require(schema.is_int(self.warmup_steps) and 0 <= self.warmup_steps < self.total_steps,
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
    # An objective of clip_jax.losses.OBJECTIVES: its record says its terms and what it needs of the
    # model (e.g. "caption" a decoder: model.overrides.decoder.layers=2).
    name: str = "softmax"
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
    """A step whose loss, gradient norm or BatchNorm statistics are NaN or inf is not applied
    (docs/training.md, "Non-finite steps"): "skip" counts it and stops the run after more than
    max_consecutive_skips (>= 1) in a row; "stop" stops the run at the first."""

    policy: str = "skip"  # NONFINITE_POLICIES
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        _require(self.policy in NONFINITE_POLICIES, "nonfinite.policy", self.policy, f"one of {NONFINITE_POLICIES}")
        # No "unlimited": a run whose every step is non-finite is not training, only spending its
        # budget; a large limit says the same thing explicitly.
        _require(schema.is_int(self.max_consecutive_skips) and self.max_consecutive_skips >= 1,
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
        _require(schema.is_int(self.global_batch_size) and self.global_batch_size >= 1, "global_batch_size",
                 self.global_batch_size, ">= 1")  # fmt: skip
        _require(schema.is_int(self.accumulation_steps) and self.accumulation_steps >= 1, "accumulation_steps",
                 self.accumulation_steps, ">= 1")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int = 1000
    max_to_keep: int = 3
    keep_period: int = 0  # also keep every step divisible by this (0 = off)
    async_save: bool = True

    def __post_init__(self) -> None:
        _require(
            schema.is_int(self.every_steps) and self.every_steps >= 1,
            "checkpoint.every_steps",
            self.every_steps,
            ">= 1",
        )
        _require(
            schema.is_int(self.max_to_keep) and self.max_to_keep >= 1,
            "checkpoint.max_to_keep",
            self.max_to_keep,
            ">= 1",
        )
        _require(schema.is_int(self.keep_period) and self.keep_period >= 0, "checkpoint.keep_period",
                 self.keep_period, ">= 0 (0 = off)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    kind: str = "sentencepiece"  # TOKENIZER_KINDS: trained on the training captions at the start, or "clip"
    vocab_size: int = 256  # sentencepiece only
    model_type: str = "bpe"  # sentencepiece only
    context_length: int = 16
    training_captions: int = 20000  # sentencepiece only: captions it is trained on

    def __post_init__(self) -> None:
        _require(self.kind in TOKENIZER_KINDS, "tokenizer.kind", self.kind, f"one of {TOKENIZER_KINDS}")
        _require(schema.is_int(self.context_length) and self.context_length >= 2, "tokenizer.context_length",
                 self.context_length, ">= 2")  # fmt: skip
        if self.kind == "sentencepiece":
            _require(
                schema.is_int(self.vocab_size) and self.vocab_size >= 1, "tokenizer.vocab_size", self.vocab_size, ">= 1"
            )
            _require(schema.is_int(self.training_captions) and self.training_captions >= 1,
                     "tokenizer.training_captions", self.training_captions, ">= 1")  # fmt: skip


def _default_overrides() -> dict[str, Any]:
    # FLIP's masked-patch training: vision.patch_dropout is the fraction of each image's patches a
    # ViT drops while training (0 = off), e.g. --config.model.overrides.vision.patch_dropout=0.5;
    # see unmasked_tuning_steps.
    overrides = {"dtype": "float32", "scan_layers": False, "remat_policy": "none", "attention_implementation": "auto"}
    return {**overrides, "vision": {"patch_dropout": 0.0}}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    name: str = "tiny-vit"  # a clip_jax.available_models() name
    # CLIPConfig fields replaced for this run (nested: vision, text, decoder); a field not given
    # keeps the registry model's value. The command line sets any of them, e.g.
    # --config.model.overrides.decoder.layers=2 (clip_jax.cli adds the field it names). The text
    # tower's vocab_size, context_length, pooling and pad_id always come from the tokenizer.
    overrides: dict[str, Any] = dataclasses.field(default_factory=_default_overrides)

    def __post_init__(self) -> None:  # each field checked and coerced against CLIPConfig's types
        try:
            overrides = schema.partial(CLIPConfig, self.overrides, "model.overrides.")
        except ValueError as wrong:
            with contextlib.suppress(TypeError, AttributeError):
                self.model_config()  # the model's own check says it in its words, where it has one
            raise wrong from None
        object.__setattr__(self, "overrides", overrides)

    def model_config(self, tokenizer: Any | None = None) -> CLIPConfig:
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
    checkpoint: str = ""  # anything clip_jax.load reads, e.g. for LiT ("" = train from scratch)
    regex: str = "^visual/"  # which of its parameters replace the fresh ones
    # Only for a TorchScript init.checkpoint the safe reader cannot read: load it with torch.jit.load,
    # which runs the file's code. OpenAI's usual .pt files need no such consent.
    trust_torchscript: bool = False

    def __post_init__(self) -> None:
        _check_regex("init.regex", self.regex)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """The axes inside one slice (-1 = the devices of a slice the others leave), and dcn_data: the
    slices of a multislice TPU job that the data axis spans over the data-centre network (on GPU
    hosts, one slice per process); -1 = every slice of the job, 1 on a single slice."""

    data: int = -1  # -1 = the devices of a slice the other axes leave
    fsdp: int = 1
    model: int = 1
    dcn_data: int = -1  # slices the data axis spans (multislice); -1 = every slice of the job


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Every eval_every_steps steps and at the end: clip_jax.evaluation.suite, as evaluate.py runs it."""

    every_steps: int = schema.given("eval_every_steps")
    batch_size: int = schema.given("global_batch_size")
    num_examples: int = 512  # test images per dataset (0 = no evaluation during training)
    tasks: tuple[str, ...] = schema.comma_separated(("zero_shot",))  # zero_shot, retrieval, linear_probe, few_shot
    # Suite datasets: "synthetic" (the held-out colour x shape combinations), "synthetic_seen"
    # (only when training on the built-in dataset), TFDS names (docs/evaluation.md).
    datasets: tuple[str, ...] = schema.comma_separated(("synthetic",))
    prompt_modes: tuple[str, ...] = schema.comma_separated(("class_name", "single", "ensemble"))
    data_dir: str = ""  # TFDS directory of the evaluation datasets ("" = TFDS's default)
    # None: no evaluation during training (num_examples = 0).
    suite: EvaluationSettings | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        _require(
            schema.is_int(self.every_steps) and self.every_steps >= 1, "eval_every_steps", self.every_steps, ">= 1"
        )
        _require(
            self.num_examples >= 0, "eval.num_examples", self.num_examples, ">= 0 (0 = no evaluation during training)"
        )
        if not self.num_examples:
            return
        try:
            suite = EvaluationSettings(
                tasks=self.tasks,
                datasets=self.datasets,
                prompt_modes=self.prompt_modes,
                batch_size=self.batch_size,
                max_examples=self.num_examples,
                data_dir=self.data_dir or None,
            )
        except ValueError as error:
            raise ValueError(f"config.eval: {error}") from None
        object.__setattr__(self, "suite", suite)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a run reads, checked: the schema's root. `record` is the config as JSON, saved
    with every checkpoint; `step` is what the train step reads, gathered from the fields."""

    seed: int = 0  # parameter initialisation and the state's RNG
    global_batch_size: int = 256
    accumulation_steps: int = 1  # GradCache micro-batches per step
    total_steps: int = 1000
    # FLIP's unmasked tuning (docs/training.md, "Masked-patch training"): the last this many steps
    # of the schedule run without patch dropout (model.overrides.vision.patch_dropout). 0 = none.
    unmasked_tuning_steps: int = 0
    train_batch_norm: bool = False  # ResNet BatchNorm: stored statistics unless True
    log_every_steps: int = 50
    eval_every_steps: int = 1000
    model: ModelSettings = ModelSettings()
    loss: LossSettings = LossSettings()
    optimizer: OptimizerSettings
    nonfinite: NonFiniteSettings = NonFiniteSettings()
    mesh: MeshSettings = MeshSettings()
    # An exponential moving average of the parameters (EMASettings; docs/training.md, "EMA").
    ema: EMASettings = EMASettings()
    # name, seed, prefetch_batches, decoding limits, data.tfds.*, data.webdataset.* (docs/data.md)
    data: DataSettings = DataSettings()
    tokenizer: TokenizerSettings = TokenizerSettings()
    eval: EvalSettings
    init: InitSettings = InitSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    record: dict[str, Any] = schema.given(default_factory=dict)
    step: StepSettings = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        _require(self.log_every_steps >= 1, "log_every_steps", self.log_every_steps, ">= 1")
        _require(0 <= self.unmasked_tuning_steps <= self.total_steps, "unmasked_tuning_steps",
                 self.unmasked_tuning_steps, f">= 0 and at most total_steps ({self.total_steps})")  # fmt: skip
        step = StepSettings(
            global_batch_size=self.global_batch_size,
            optimizer=self.optimizer,
            loss=self.loss,
            nonfinite=self.nonfinite,
            accumulation_steps=self.accumulation_steps,
            train_batch_norm=self.train_batch_norm,
            ema=self.ema,
        )
        object.__setattr__(self, "step", step)


# --------------------------------------------------------------------------------------------
# Reading the ConfigDict: every field once, by its type (clip_jax.settings_schema).
# --------------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict, process_count: int | None = None) -> Settings:
    """The settings of `config`, every field read and checked here; ValueError naming the field
    otherwise. Builds nothing (so it runs before anything is compiled or written)."""
    settings = schema.read(Settings, config, record=json.loads(config.to_json_best_effort()))
    process_count = jax.process_count() if process_count is None else process_count
    if settings.global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {settings.global_batch_size} is not divisible by the {process_count} processes"
        )
    # An unknown model name or override raises here, naming it; then what the objective needs of it.
    settings.loss.objective.check_model(settings.model.model_config())
    return settings


def model_override_placeholders(config: ml_collections.ConfigDict, paths: list[str]) -> None:
    """Give `config.model.overrides` an empty typed field for each `model.overrides.…` path of
    `paths` it lacks (CLIPConfig's type), so that the command line can set any model field."""
    prefix = "model.overrides."
    wanted = [path[len(prefix) :] for path in paths if path.startswith(prefix)]
    if wanted and "model" in config and "overrides" in config.model:
        schema.placeholders(config.model.overrides, CLIPConfig, wanted, prefix)
