"""clip_jax -> Hugging Face transformers: the `CLIPModel` directory format, written. Reading one
is `clip_jax.io.hf_layout`'s, and both directions rename through its one table of names.

`write_hf_directory` writes what `transformers.CLIPModel.from_pretrained(DIR)` and
`CLIPProcessor.from_pretrained(DIR)` load offline: config.json, model.safetensors, the tokenizer's
vocab.json / merges.txt / tokenizer_config.json / special_tokens_map.json, and
preprocessor_config.json. It takes an open_clip-layout state dict (`convert.variables_to_openclip`),
so the Flax side of the mapping stays the one two-way table of `clip_jax.io.openclip_layout`; this
module only renames keys (`hf_layout.rename_state_dict`) and writes files. Nothing here imports torch or transformers.

Only what `CLIPModel` computes the same way is written (`check_exportable` says why not otherwise):
OpenAI's ViT (pre-LN, class-token pooling, ln_pre), QuickGELU or exact GELU, OpenAI's byte-level BPE
tokenizer, text pooled at the end-of-text token. clip_jax's SigLIP-loss models are that same
architecture with a learned `logit_bias`, not SigLIP's (no class token, attention-pool head,
bidirectional text, last-token pooling with a biased head), so they export as `CLIPModel` too: the
embeddings are exact, and the bias, which `CLIPModel` has no place for, is kept in config.json under
`clip_jax_logit_bias` (transformers ignores it; the import here restores it).

`hf_layout.clip_config_from_hf` reads such a config.json back into a `CLIPConfig` (heads, MLP width
and the activation are stated there, not guessed), which `io.torch_checkpoint.read_checkpoint` uses
for HF files.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from etils import epath
from safetensors.numpy import save_file

from clip_jax import tokenizer as tokenizers
from clip_jax import transforms
from clip_jax.io import hf_layout, model_directory
from clip_jax.io.hf_layout import CONFIG_FILE, LOGIT_BIAS_KEY, MODEL_FILE
from clip_jax.io.openclip_layout import StateDict
from clip_jax.models import CLIPConfig

# clip_jax's activations -> transformers' ACT2FN names computing the same function: "quick_gelu" is
# x * sigmoid(1.702 x), "gelu" is torch's exact erf GELU (GELUActivation), as in models/layers.py.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
LAYER_NORM_EPS = 1e-5  # clip_jax's LayerNorm epsilon (models/layers.py), also CLIPModel's default


class ExportError(ValueError):
    """The model has no faithful transformers form; the message says what and why, in one line."""


def check_exportable(config: CLIPConfig, tokenizer: Any) -> None:
    """Raise ExportError unless `CLIPModel` + `CLIPTokenizer` compute what clip_jax computes."""
    if not config.vision.is_vit:
        raise ExportError(
            f"cannot export to transformers: the image tower is a ModifiedResNet (layers {config.vision.layers}); "
            "transformers' CLIPModel has only a ViT image tower and no class for OpenAI's ResNet CLIP"
        )
    if config.decoder is not None or config.bag_of_words:
        head = "caption decoder" if config.decoder is not None else "bag-of-words head"
        raise ExportError(
            f"cannot export to transformers: the model has a {head}, which transformers' CLIPModel has no "
            "place for (export would drop it silently)"
        )
    if config.activation not in HF_ACTIVATIONS:
        raise ExportError(
            f"cannot export to transformers: activation {config.activation!r} has no transformers equivalent "
            f"(supported: {sorted(HF_ACTIVATIONS)})"
        )
    if not isinstance(tokenizer, tokenizers.ClipTokenizer):
        raise ExportError(
            f"cannot export to transformers: the tokenizer is a {type(tokenizer).__name__}; transformers' "
            "CLIPTokenizer is OpenAI's byte-level BPE and cannot reproduce it"
        )
    if config.text.pooling != "argmax":
        raise ExportError(
            f"cannot export to transformers: text pooling {config.text.pooling!r}; CLIPModel pools at the "
            "end-of-text token only"
        )
    vocabulary, _ = tokenizer.bpe_tables()
    # CLIPModel pools at the first end-of-text id, clip_jax at the largest id: the same position only
    # when end-of-text is the largest id a row can hold.
    if tokenizer.eot_token_id != max(vocabulary.values()):
        raise ExportError(
            f"cannot export to transformers: end-of-text id {tokenizer.eot_token_id} is not the vocabulary's "
            "largest id, so CLIPModel (first end-of-text) and clip_jax (largest id) would pool differently"
        )
    if max(vocabulary.values()) >= config.text.vocab_size:
        raise ExportError(
            f"cannot export to transformers: the tokenizer has ids up to {max(vocabulary.values())}, beyond the "
            f"model's vocab_size {config.text.vocab_size}"
        )
    if tokenizer.context_length > config.text.context_length:
        raise ExportError(
            f"cannot export to transformers: the tokenizer's context_length {tokenizer.context_length} exceeds "
            f"the model's {config.text.context_length}"
        )


# ----------------------------------------------------------------------------------------------
# Weights: open_clip layout -> CLIPModel's state dict
# ----------------------------------------------------------------------------------------------

_HF_KEY = re.compile(r"^(text_model|vision_model)\.|^(logit_scale|visual_projection\.weight|text_projection\.weight)$")


def openclip_to_hf(state_dict: StateDict) -> StateDict:
    """An open_clip-layout ViT CLIP state dict in CLIPModel's layout (in_proj split into q/k/v).

    `logit_bias` is not a CLIPModel tensor: the caller takes it out first (see `hf_config`)."""
    out = hf_layout.rename_state_dict(state_dict, to_hf=True)
    for key in out:
        if not _HF_KEY.match(key):
            raise ExportError(f"cannot export to transformers: tensor {key!r} has no place in CLIPModel")
    # np.array, not np.ascontiguousarray, which makes the 0-d logit_scale 1-d.
    return {key: np.array(value, dtype=np.float32, order="C") for key, value in out.items()}


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------


def hf_config(config: CLIPConfig, tokenizer: tokenizers.ClipTokenizer, logit_bias: float | None) -> dict[str, Any]:
    """CLIPModel's config.json for a model `check_exportable` accepted."""
    vision, text, act = config.vision, config.text, HF_ACTIVATIONS[config.activation]
    record: dict[str, Any] = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.logit_scale_init,
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "projection_dim": config.embed_dim,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "bos_token_id": tokenizer.sot_token_id,
            # The real end-of-text id (not the legacy 2), so CLIPModel pools at its first occurrence.
            "eos_token_id": tokenizer.eot_token_id,
            "pad_token_id": tokenizer.eot_token_id,  # what the exported tokenizer pads with
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "projection_dim": config.embed_dim,
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.num_heads,
            "num_channels": 3,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
        },
    }
    if logit_bias is not None:
        record[LOGIT_BIAS_KEY] = {"value": logit_bias, "init": config.logit_bias_init}
    return record


# ----------------------------------------------------------------------------------------------
# Tokenizer and preprocessor files
# ----------------------------------------------------------------------------------------------


def tokenizer_files(tokenizer: tokenizers.ClipTokenizer) -> dict[str, str]:
    """{file name: text} of a CLIPTokenizer giving `tokenizer`'s ids on cleaned text (see docs/conversion.md).

    Rows are clip_jax's up to and including end-of-text (cut to context_length with end-of-text kept
    last); after it transformers pads with end-of-text where clip_jax pads with 0. Id 0 is "!" in
    OpenAI's vocabulary, and transformers matches a pad token in the raw text as a special token, so
    padding with it would turn every "!" of a text into id 0. The padding is outside the attention
    mask and after the pooled token of a causal model, so the embeddings are the same."""
    vocabulary, merges = tokenizer.bpe_tables()
    special = {
        "bos_token": tokenizers.START_OF_TEXT,
        "eos_token": tokenizers.END_OF_TEXT,
        "unk_token": tokenizers.END_OF_TEXT,
        "pad_token": tokenizers.END_OF_TEXT,
    }
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        **special,
        "model_max_length": tokenizer.context_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "processor_class": "CLIPProcessor",
    }
    return {
        "vocab.json": json.dumps(vocabulary, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in merges),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
    }


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor settings doing what `transforms.eval_transform` does: bicubic resize of the
    short side, centre crop, RGB, /255, OpenAI mean and std."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(transforms.OPENAI_MEAN),
        "image_std": list(transforms.OPENAI_STD),
        "do_convert_rgb": True,
    }


def write_hf_directory(
    output_dir: str | os.PathLike,
    config: CLIPConfig,
    state_dict: StateDict,
    tokenizer: Any,
    overwrite: bool = False,
) -> str:
    """Write a transformers CLIPModel directory from an open_clip-layout state dict; atomic like
    `model_directory.save_model_directory`. Raises ExportError (before writing) for what CLIPModel cannot
    represent. Returns the directory's absolute path."""
    check_exportable(config, tokenizer)
    state_dict = dict(state_dict)
    bias = state_dict.pop("logit_bias", None)
    logit_bias = None if bias is None else float(np.asarray(bias, dtype=np.float32))  # exact in JSON
    weights = openclip_to_hf(state_dict)
    files = {
        CONFIG_FILE: json.dumps(hf_config(config, tokenizer, logit_bias), indent=2),
        "preprocessor_config.json": json.dumps(preprocessor_config(config.vision.image_size), indent=2),
        **tokenizer_files(tokenizer),
    }

    def write(staging: epath.Path) -> None:
        save_file(weights, os.fspath(staging / MODEL_FILE), metadata={"format": "pt"})
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")

    return model_directory.write_directory_atomically(output_dir, write, overwrite)
