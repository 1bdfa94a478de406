"""The supervised baseline of the paper's §4.3 and §4.5: CLIP's image tower (the tiny ViT of
configs/default.py, or a narrower or shallower one) trained with cross-entropy on the colour x shape
labels of the built-in training split, then used as a frozen feature extractor for linear probes.

Self-contained: a flax module (the ViT plus a linear head), AdamW with warmup and cosine decay
(optax), one jitted step, and the training images drawn once into memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.data.synthetic import SyntheticShapes
from clip_jax.evaluation.features import preprocess_images
from clip_jax.models import CLIPConfig, get_model_config
from clip_jax.models.vit import VisionTransformer

FEATURE_BATCH = 512


@dataclasses.dataclass(frozen=True)
class SupervisedSettings:
    """One supervised run: the image tower's width and depth, and the optimisation."""

    width: int = 64
    layers: int = 2
    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 1.0 / 15.0  # of the steps, as configs/default.py
    train_examples: int = 16384  # distinct training images, drawn once
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "layers", "steps", "batch_size", "train_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"supervised {name} must be >= 1, got {getattr(self, name)}")
        if self.width % 32:
            raise ValueError(f"supervised width must be a multiple of 32 (heads of 32), got {self.width}")
        if not self.learning_rate > 0:
            raise ValueError(f"supervised learning_rate must be > 0, got {self.learning_rate}")

    @property
    def label(self) -> str:
        return f"supervised w{self.width} l{self.layers} {self.steps} steps"


class SupervisedClassifier(nn.Module):
    """CLIP's image tower and a linear head: (logits (n, classes), features (n, embed_dim))."""

    config: CLIPConfig
    num_classes: int

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = VisionTransformer(self.config, name="visual")(images)
        return nn.Dense(self.num_classes, name="head")(features), features


@dataclasses.dataclass
class SupervisedModel:
    """A trained baseline: the module, its parameters and the loss logged every step."""

    settings: SupervisedSettings
    module: SupervisedClassifier
    params: Any
    losses: list[float]
    seconds: float


def model_config(settings: SupervisedSettings) -> CLIPConfig:
    """The tiny ViT of configs/default.py at the settings' width and depth."""
    return get_model_config(
        "tiny-vit", vision={"width": settings.width, "layers": settings.layers, "heads": settings.width // 32}
    )


def _optimizer(settings: SupervisedSettings) -> optax.GradientTransformation:
    warmup = max(1, int(settings.steps * settings.warmup_fraction))
    schedule = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, warmup, max(settings.steps, warmup + 1))
    return optax.adamw(schedule, b2=0.98, eps=1e-6, weight_decay=settings.weight_decay)


def train_supervised(
    dataset: SyntheticShapes, settings: SupervisedSettings, log: Callable[[str], None] = print
) -> SupervisedModel:
    """Cross-entropy on the colour x shape labels of the first `train_examples` training images."""
    started = time.time()
    config = model_config(settings)
    size = config.vision.image_size
    if dataset.config.image_size != size:
        raise ValueError(f"the dataset draws {dataset.config.image_size}px images, the model takes {size}px")
    batch = dataset.get_batch("train", np.arange(settings.train_examples))
    images = preprocess_images(batch["images"], size)
    labels = batch["labels"].astype(np.int32)
    module = SupervisedClassifier(config, len(dataset.all_class_names))
    params = nn.meta.unbox(module.init(jax.random.PRNGKey(settings.seed), images[:1])["params"])
    optimizer = _optimizer(settings)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params: Any, opt_state: Any, images: jax.Array, labels: jax.Array) -> tuple[Any, Any, jax.Array]:
        def loss_fn(params: Any) -> jax.Array:
            logits, _ = module.apply({"params": params}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(settings.seed)
    order = np.zeros(0, np.int64)
    losses = []
    for _ in range(settings.steps):
        if len(order) < settings.batch_size:
            order = np.concatenate([order, rng.permutation(settings.train_examples)])
        rows, order = order[: settings.batch_size], order[settings.batch_size :]
        params, opt_state, loss = step(params, opt_state, images[rows], labels[rows])
        losses.append(loss)
    losses = [float(value) for value in jax.device_get(losses)]
    seconds = time.time() - started
    log(f"{settings.label}: loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f} in {seconds:.0f}s")
    return SupervisedModel(settings, module, params, losses, seconds)


def supervised_features(model: SupervisedModel, images: np.ndarray) -> np.ndarray:
    """L2-normalised features (n, embed_dim) float32 of uint8 images (n, H, W, 3), as CLIP's Encoder
    gives its embeddings, for the linear probes."""
    size = model.module.config.vision.image_size

    @jax.jit
    def embed(params: Any, images: jax.Array) -> jax.Array:
        _, features = model.module.apply({"params": params}, images)
        return features / jnp.linalg.norm(features, axis=-1, keepdims=True)

    parts = []
    for start in range(0, len(images), FEATURE_BATCH):
        chunk = preprocess_images(images[start : start + FEATURE_BATCH], size)
        padded = np.concatenate([chunk, np.zeros((FEATURE_BATCH - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        parts.append(np.asarray(embed(model.params, padded))[: len(chunk)])
    return np.concatenate(parts).astype(np.float32)
