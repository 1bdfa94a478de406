"""The public API: `load` (any model clip_jax reads, as `(model, variables, preprocess, tokenizer)`),
and notebook helpers over its outputs: embeddings of images (PIL, numpy or paths) and texts, and
zero-shot classification in one call; batches are split over every available device. Captions:
`clip_jax.generate_captions` (clip_jax.captioning) with what `load` returns, or
`captions_from_checkpoint` from a path in one call.

Every format is read by `clip_jax.io.load_any`, below the layers that train or evaluate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clip_jax import captioning, transforms
from clip_jax.data.templates import Template
from clip_jax.evaluation.features import Encoder, encode_prompts
from clip_jax.evaluation.zero_shot import class_embeddings
from clip_jax.io import load_any
from clip_jax.models import CLIP

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def load(
    path: str,
    model: str | None = None,
    *,
    trust_torchscript: bool = False,
    ema: bool = True,
    announce: Callable[[str], None] | None = None,
    **overrides: Any,
) -> tuple[CLIP, dict[str, Any], Callable, Any]:
    """`(model, variables, preprocess, tokenizer)` from a clip_jax model directory or a PyTorch checkpoint.

    `path` is a directory written by `python -m clip_jax.convert` / `save_model_directory`, a training
    workdir of `train.py` (its newest complete checkpoint), a transformers `CLIPModel` directory
    (config.json + model.safetensors, e.g. from `--to-hf`), or an OpenAI `.pt`, open_clip
    `.pt`/`.bin`/`.safetensors` or Hugging Face safetensors file (converted in memory; `model` names the
    model config if it should not be read off the shapes). Weights holding NaN or inf load with a RuntimeWarning.

    A training workdir whose run kept a moving average of the parameters (config.ema) gives the
    average; `ema=False` gives the trained parameters instead. Which was loaded is said in one
    line to `announce` (default: logging, at INFO). Other
    paths hold one set of parameters and ignore `ema`.

    No file's code is run: `trust_torchscript=True` is needed only for a TorchScript archive that
    `clip_jax.torchscript` cannot read, and lets `torch.jit.load` run it (see
    `clip_jax.io.torch_checkpoint.read_checkpoint`).
    """
    config, variables, text_tokenizer = load_any(
        path, model, trust_torchscript=trust_torchscript, ema=ema, announce=announce, **overrides
    )
    preprocess = transforms.make_eval_transform(config.vision.image_size)
    return CLIP(config), variables, preprocess, text_tokenizer


def encode_images(
    model: CLIP,
    variables: dict[str, Any],
    images: Any,
    preprocess: Callable | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Unit-norm image embeddings, float32 (n, embed_dim).

    `images`: a PIL image, a path, a uint8 array (H, W, 3), or a list of them, or a batch array
    (n, H, W, 3) — uint8 of any size, or float32 already preprocessed at the model's size.
    `preprocess` defaults to the model's evaluation transform (what `clip_jax.load` returns).
    """
    encoder = Encoder(model, variables, batch_size=batch_size)
    batch = transforms.preprocess_images(transforms.as_image_batch(images), encoder.image_size, preprocess)
    return encoder.encode_images(batch)


def encode_texts(
    model: CLIP, variables: dict[str, Any], tokenizer: Callable, texts: str | Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """Unit-norm text embeddings, float32 (n, embed_dim); a single string gives one row.
    Texts longer than the context are truncated."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return encode_prompts(Encoder(model, variables, batch_size=batch_size), tokenizer, texts)


def _logit_scale(variables: dict[str, Any]) -> float:
    # CLIP clamps the learned temperature at 100.
    return float(min(np.exp(np.asarray(variables["params"]["logit_scale"])), 100.0))


def zero_shot_classify(
    model: CLIP,
    variables: dict[str, Any],
    preprocess: Callable | None,
    tokenizer: Callable,
    images: Any,
    class_names: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
) -> np.ndarray:
    """Class probabilities (n, len(class_names)): softmax over the model's scaled cosine
    similarities between each image and each class's ensembled prompt embedding.

        model, variables, preprocess, tokenizer = clip_jax.load(path)
        probabilities = clip_jax.zero_shot_classify(model, variables, preprocess, tokenizer,
                                                    images, ["cat", "dog"])
    """
    encoder = Encoder(model, variables, batch_size=batch_size)
    classifier = class_embeddings(encoder, tokenizer, class_names, templates)  # (classes, D)
    features = encoder.encode_images(
        transforms.preprocess_images(transforms.as_image_batch(images), encoder.image_size, preprocess)
    )
    logits = _logit_scale(variables) * (features @ classifier.T)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def captions_from_checkpoint(
    path: str,
    images: Any,
    method: str = "greedy",
    *,
    model: str | None = None,
    ema: bool = True,
    batch_size: int = captioning.DEFAULT_BATCH_SIZE,
    **generation: Any,
) -> list[str]:
    """One caption per image from the model at `path` (anything `load` reads, with `model` and
    `ema` as there), images as `generate_captions` takes them; `generation` passes max_length,
    beam_width and length_penalty on. The same path and images give the same captions in any
    process: what a test that a saved model captions as it did when trained can compare.

        captions = clip_jax.api.captions_from_checkpoint("./workdir", ["cat.jpg"], method="beam")
    """
    loaded, variables, preprocess, tokenizer = load(path, model, ema=ema, announce=lambda line: None)
    return captioning.generate_captions(
        loaded, variables, images, tokenizer, method, preprocess=preprocess, batch_size=batch_size, **generation
    )
