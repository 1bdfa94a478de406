"""What the experiments share: their sizes (full and --quick), the context of one invocation (output
directory, dataset, the CLIP and supervised models it has already trained), test and probe sets of
the built-in downstream tasks, zero-shot and linear-probe correctness per test image, and paired
bootstrap intervals over test images (an ordering is stated only where its interval excludes 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.serialization
import numpy as np

from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from clip_jax.data.synthetic_tasks import DownstreamTask
from clip_jax.data.templates import DatasetPrompts, templates_for_mode
from clip_jax.evaluation import linear_probe as probes
from clip_jax.evaluation.features import Encoder, preprocess_images
from clip_jax.evaluation.zero_shot import class_embeddings, zero_shot_predict
from clip_jax.experiments import clip_runs
from clip_jax.experiments.supervised import SupervisedModel, SupervisedSettings, supervised_features, train_supervised

ALL_TASKS: tuple[str, ...] = ("shape", "color", "combination", "style", "size", "position")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big every experiment is: images per test and probe set, the bootstrap, the supervised
    models, few-shot shots and seeds, the efficiency runs' checkpoints."""

    quick: bool
    test_examples: int
    probe_examples: int
    bootstrap_samples: int
    supervised: SupervisedSettings  # the `supervised` command's baseline
    shift_models: tuple[SupervisedSettings, ...]  # the `shift` command's supervised family
    shots: tuple[int, ...]
    few_shot_seeds: tuple[int, ...]
    efficiency_steps: int
    efficiency_points: int  # checkpoints evaluated along each efficiency run
    efficiency_test_examples: int  # test images each checkpoint is scored on

    @staticmethod
    def make(quick: bool) -> Sizes:
        if quick:
            tiny = SupervisedSettings(
                width=32, layers=1, steps=40, batch_size=32, train_examples=256, learning_rate=3e-3
            )
            return Sizes(
                quick=True, test_examples=128, probe_examples=128, bootstrap_samples=200, supervised=tiny,
                shift_models=(tiny, dataclasses.replace(tiny, steps=20)),
                shots=(1, 2), few_shot_seeds=(0, 1, 2), efficiency_steps=20, efficiency_points=2,
                efficiency_test_examples=64,
            )  # fmt: skip
        base = SupervisedSettings(steps=1500)  # as many steps of 128 as the CLIP of configs/default.py
        family = (
            SupervisedSettings(width=32, layers=1, steps=250),
            SupervisedSettings(width=32, layers=1, steps=1000),
            SupervisedSettings(width=32, layers=2, steps=500),
            SupervisedSettings(width=64, layers=2, steps=250),
            SupervisedSettings(width=64, layers=2, steps=600),
            base,
        )
        return Sizes(
            quick=False, test_examples=2048, probe_examples=2048, bootstrap_samples=1000, supervised=base,
            shift_models=family, shots=(1, 2, 4, 8, 16), few_shot_seeds=(0, 1, 2), efficiency_steps=1500,
            efficiency_points=6, efficiency_test_examples=1024,
        )  # fmt: skip


@dataclasses.dataclass
class ClipModel:
    """A trained CLIP ready to evaluate: its encoder (compiled towers) and tokenizer."""

    name: str
    encoder: Encoder
    tokenizer: Any
    objective: str = "contrastive"


class Context:
    """One invocation: output directory, sizes, dataset, and the models trained so far (so that
    `all` trains each once; finished models are also reused from disk across invocations)."""

    def __init__(self, output: str, sizes: Sizes, log: Callable[[str], None] = print) -> None:
        self.output = output
        self.sizes = sizes
        self.log = log
        os.makedirs(output, exist_ok=True)
        self.dataset = SyntheticShapes(SyntheticShapesConfig(image_size=32))
        self._clip: ClipModel | None = None
        self._supervised: dict[SupervisedSettings, SupervisedModel] = {}
        self._features: dict[tuple, np.ndarray] = {}

    def clip(self) -> ClipModel:
        """The default recipe's CLIP (contrastive), trained once into OUTPUT/models/clip_default."""
        if self._clip is None:
            config = clip_runs.experiment_config(self.sizes.quick)
            workdir = clip_runs.trained_workdir(config, os.path.join(self.output, "models", "clip_default"), self.log)
            model, variables, tokenizer = clip_runs.load_clip(workdir)
            self._clip = ClipModel("zero-shot CLIP", Encoder(model, variables, batch_size=512), tokenizer)
        return self._clip

    def supervised(self, settings: SupervisedSettings) -> SupervisedModel:
        """A supervised baseline, trained once and kept in OUTPUT/models/ (parameters, msgpack)."""
        if settings not in self._supervised:
            name = f"supervised_w{settings.width}_l{settings.layers}_{settings.steps}_s{settings.seed}"
            path = os.path.join(self.output, "models", name + ".msgpack")
            if _saved_settings(path) == dataclasses.asdict(settings):
                template = train_supervised(self.dataset, dataclasses.replace(settings, steps=1), log=lambda _: None)
                with open(path, "rb") as file:
                    template.params = flax.serialization.from_bytes(template.params, file.read())
                with open(path + ".json", encoding="utf-8") as file:
                    template.losses = json.load(file)["losses"]
                template.settings = settings
                self.log(f"reusing {path}")
                self._supervised[settings] = template
            else:
                model = train_supervised(self.dataset, settings, self.log)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as file:
                    file.write(flax.serialization.to_bytes(model.params))
                with open(path + ".json", "w", encoding="utf-8") as file:
                    json.dump({"settings": dataclasses.asdict(settings), "losses": model.losses}, file)
                self._supervised[settings] = model
        return self._supervised[settings]

    # --- data and features

    def images(self, task: str, part: str, shift: str | None = None) -> dict[str, np.ndarray]:
        """A task's "test" images (examples [0, test)) or "probe" images (the next probe_examples)."""
        count = self.sizes.test_examples if part == "test" else self.sizes.probe_examples
        start = 0 if part == "test" else self.sizes.test_examples
        return self.dataset.task_batch(task, np.arange(start, start + count), shift)

    def features(
        self, model: ClipModel | SupervisedModel, task: str, part: str, shift: str | None = None
    ) -> np.ndarray:
        key = (id(model), task, part, shift)
        if key not in self._features:
            images = self.images(task, part, shift)["images"]
            if isinstance(model, ClipModel):
                self._features[key] = model.encoder.encode_images(preprocess_images(images, model.encoder.image_size))
            else:
                self._features[key] = supervised_features(model, images)
        return self._features[key]

    def labels(self, task: str, part: str) -> np.ndarray:
        return self.images(task, part)["labels"].astype(np.int64)

    def write(self, name: str, markdown: str, data: dict[str, Any]) -> str:
        """OUTPUT/name.md and OUTPUT/name.json; returns the Markdown's path."""
        path = os.path.join(self.output, name + ".md")
        with open(path, "w", encoding="utf-8") as file:
            file.write(markdown)
        with open(os.path.join(self.output, name + ".json"), "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1, default=float)
        return path


def _saved_settings(path: str) -> dict[str, Any] | None:
    """The settings a saved supervised model was trained with; None when there is none."""
    if not (os.path.isfile(path) and os.path.isfile(path + ".json")):
        return None
    with open(path + ".json", encoding="utf-8") as file:
        return json.load(file)["settings"]


def prompts_of(task: DownstreamTask) -> DatasetPrompts:
    """A task's class names and templates as the evaluation suite takes them."""
    return DatasetPrompts(task.class_names, task.templates, task.single_template)


def zero_shot_correct(context: Context, clip: ClipModel, task: str, mode: str = "ensemble",
                      shift: str | None = None) -> np.ndarray:  # fmt: skip
    """bool (test_examples,): which test images zero-shot CLIP classifies right under a prompt mode."""
    prompts = prompts_of(context.dataset.downstream_task(task))
    templates = templates_for_mode(prompts.templates, mode, prompts.single_template)
    classifier = class_embeddings(clip.encoder, clip.tokenizer, prompts.class_names, templates)
    scores = zero_shot_predict(context.features(clip, task, "test", shift), classifier)
    return np.argmax(scores, axis=1) == context.labels(task, "test")


def fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """The paper's linear probe (clip_jax.evaluation.linear_probe): L2 chosen on a stratified 20%
    validation split, then fitted on every probe image."""
    fit_rows, validation_rows = probes.split_train_validation(labels, 0.2, seed=0)
    fold = (features[fit_rows], labels[fit_rows], features[validation_rows], labels[validation_rows])
    l2, _ = probes.select_l2([fold], num_classes)
    return probes.fit_logistic_regression(features, labels, num_classes, l2)


def probe_correct(params: dict[str, np.ndarray], features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.argmax(probes.predict_logits(params, features), axis=1) == labels


# --- uncertainty


def bootstrap_indices(count: int, samples: int, seed: int = 0) -> np.ndarray:
    """(samples, count) resampled test-image indices; every statistic of one experiment uses the
    same rows, so differences between models on the same images are paired."""
    return np.random.default_rng([seed, count]).integers(0, count, size=(samples, count))


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(np.asarray(values, np.float64), [tail, 100.0 - tail])
    return float(low), float(high)


def compare(difference: float, low: float, high: float, first: str, second: str) -> str:
    """The ordering a difference (first - second) and its interval support, in words."""
    if low > 0:
        return f"{first} > {second}"
    if high < 0:
        return f"{first} < {second}"
    return "no clear difference (interval includes 0)"


def fmt_ci(value: float, low: float, high: float, scale: float = 100.0) -> str:
    return f"{value * scale:.1f} [{low * scale:.1f}, {high * scale:.1f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def timed(log: Callable[[str], None], name: str) -> Callable[[], float]:
    """Starts a clock; calling the result logs and returns the seconds since."""
    started = time.time()

    def stop() -> float:
        seconds = time.time() - started
        log(f"{name} {seconds:.0f} s ({seconds / 60:.1f} min)")
        return seconds

    return stop
