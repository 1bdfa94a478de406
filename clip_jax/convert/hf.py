"""Hugging Face transformers <-> clip_jax: the `CLIPModel` directory format, written and read.

`write_hf_directory` writes what `transformers.CLIPModel.from_pretrained(DIR)` and
`CLIPProcessor.from_pretrained(DIR)` load offline: config.json, model.safetensors, the tokenizer's
vocab.json / merges.txt / tokenizer_config.json / special_tokens_map.json, and
preprocessor_config.json. It takes an open_clip-layout state dict (`convert.variables_to_openclip`),
so the Flax side of the mapping stays the one two-way table of `clip_jax.convert`; this module only
renames keys (splitting q/k/v) and writes files. Nothing here imports torch or transformers.

Only what `CLIPModel` computes the same way is written (`check_exportable` says why not otherwise):
OpenAI's ViT (pre-LN, class-token pooling, ln_pre), QuickGELU or exact GELU, OpenAI's byte-level BPE
tokenizer, text pooled at the end-of-text token. clip_jax's SigLIP-loss models are that same
architecture with a learned `logit_bias`, not SigLIP's (no class token, attention-pool head,
bidirectional text, last-token pooling with a biased head), so they export as `CLIPModel` too: the
embeddings are exact, and the bias, which `CLIPModel` has no place for, is kept in config.json under
`clip_jax_logit_bias` (transformers ignores it; the import here restores it).

`clip_config_from_hf` reads such a config.json back into a `CLIPConfig` (heads, MLP width and the
activation are stated there, not guessed), which `convert.read_checkpoint` uses for HF files.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from etils import epath
from safetensors.numpy import save_file

from clip_jax import checkpoint, transforms
from clip_jax import tokenizer as tokenizers
from clip_jax.models import CLIPConfig, TextConfig, VisionConfig

StateDict = dict[str, np.ndarray]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LOGIT_BIAS_KEY = "clip_jax_logit_bias"  # {"value": float, "init": float}: what CLIPModel cannot hold
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

# The one table of names between open_clip's layout and CLIPModel's: (open_clip, CLIPModel, where
# the part stands in a name: the "whole" name, its "start", or "inside" it). Both directions are
# made from it: TO_HF here, FROM_HF for the import (clip_jax.convert.hf_to_openclip). The q/k/v
# split of in_proj and the transposed projections are done by the code, not by renaming.
NAMES = [
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "whole"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", "whole"),
    ("ln_final.", "text_model.final_layer_norm.", "start"),
    ("transformer.resblocks.", "text_model.encoder.layers.", "start"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", "whole"),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "whole"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "whole"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm.", "start"),
    ("visual.ln_post.", "vision_model.post_layernorm.", "start"),
    ("visual.transformer.resblocks.", "vision_model.encoder.layers.", "start"),
    (".attn.out_proj.", ".self_attn.out_proj.", "inside"),
    (".ln_1.", ".layer_norm1.", "inside"),
    (".ln_2.", ".layer_norm2.", "inside"),
    (".mlp.c_fc.", ".mlp.fc1.", "inside"),
    (".mlp.c_proj.", ".mlp.fc2.", "inside"),
]


def _renames(to_hf: bool) -> list[tuple[str, str]]:
    """(regex, replacement) pairs of NAMES in one direction, applied in order."""
    anchors = {"whole": ("^", "$"), "start": ("^", ""), "inside": ("", "")}
    renames = []
    for open_clip_name, hf_name, where in NAMES:
        source, target = (open_clip_name, hf_name) if to_hf else (hf_name, open_clip_name)
        before, after = anchors[where]
        renames.append((before + re.escape(source) + after, target))
    return renames


TO_HF, FROM_HF = _renames(to_hf=True), _renames(to_hf=False)
_HF_KEY = re.compile(r"^(text_model|vision_model)\.|^(logit_scale|visual_projection\.weight|text_projection\.weight)$")


def openclip_to_hf(state_dict: StateDict) -> StateDict:
    """An open_clip-layout ViT CLIP state dict in CLIPModel's layout (in_proj split into q/k/v).

    `logit_bias` is not a CLIPModel tensor: the caller takes it out first (see `hf_config`)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key == "visual.proj":
            out["visual_projection.weight"] = value.T
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.T
            continue
        for pattern, replacement in TO_HF:
            key = re.sub(pattern, replacement, key)
        fused = re.match(r"(.*)\.attn\.in_proj_(weight|bias)$", key)
        if fused:
            for name, part in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{fused[1]}.self_attn.{name}_proj.{fused[2]}"] = part
            continue
        if not _HF_KEY.match(key):
            raise ExportError(f"cannot export to transformers: tensor {key!r} has no place in CLIPModel")
        out[key] = value
    # np.array, not np.ascontiguousarray, which makes the 0-d logit_scale 1-d.
    return {key: np.array(value, dtype=np.float32, order="C") for key, value in out.items()}


# ----------------------------------------------------------------------------------------------
# config.json and its inverse
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


def clip_config_from_hf(record: dict[str, Any]) -> CLIPConfig | None:
    """The CLIPConfig a CLIPModel config.json describes, or None if it is not one (no text/vision configs).

    Heads and MLP widths come from the file; clip_jax has one activation for both towers (the text
    tower's, as `convert` has always read it) and pools at the largest id (CLIP's end-of-text)."""
    text, vision = record.get("text_config"), record.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        return None
    try:
        act = text.get("hidden_act") or vision.get("hidden_act") or "quick_gelu"
        embed_dim = record.get("projection_dim") or text.get("projection_dim") or 512
        bias = record.get(LOGIT_BIAS_KEY)
        return CLIPConfig(
            embed_dim=int(embed_dim),
            vision=VisionConfig(
                image_size=int(vision.get("image_size", 224)),
                width=int(vision.get("hidden_size", 768)),
                layers=int(vision.get("num_hidden_layers", 12)),
                heads=int(vision.get("num_attention_heads", 12)),
                patch_size=int(vision.get("patch_size", 32)),
                mlp_ratio=_mlp_ratio(vision.get("intermediate_size", 3072), vision.get("hidden_size", 768)),
            ),
            text=TextConfig(
                context_length=int(text.get("max_position_embeddings", 77)),
                vocab_size=int(text.get("vocab_size", 49408)),
                width=int(text.get("hidden_size", 512)),
                heads=int(text.get("num_attention_heads", 8)),
                layers=int(text.get("num_hidden_layers", 12)),
                mlp_ratio=_mlp_ratio(text.get("intermediate_size", 2048), text.get("hidden_size", 512)),
            ),
            activation="quick_gelu" if act == "quick_gelu" else "gelu",
            logit_scale_init=float(record.get("logit_scale_init_value", CLIPConfig.logit_scale_init)),
            logit_bias_init=float(bias["init"]) if isinstance(bias, dict) else None,
        ).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"the Hugging Face config.json does not describe a CLIP clip_jax can build: {error}") from None


def _mlp_ratio(intermediate: int, width: int) -> float:
    """The ratio whose int(width * ratio), as models/layers.py computes the MLP width, is `intermediate`
    (intermediate / width can land a hair below it in floating point, e.g. ViT-bigG's 8192 / 1664)."""
    intermediate, width = int(intermediate), int(width)
    ratio = intermediate / width
    while int(width * ratio) < intermediate:
        ratio = float(np.nextafter(ratio, np.inf))
    return ratio


def logit_bias_from_hf(record: dict[str, Any]) -> np.ndarray | None:
    """The `logit_bias` an export kept in config.json, as the float32 scalar it was; None if absent."""
    bias = record.get(LOGIT_BIAS_KEY)
    return None if not isinstance(bias, dict) else np.asarray(bias["value"], dtype=np.float32)


def model_file(directory: str | os.PathLike) -> str | None:
    """`directory`/model.safetensors if `directory` is a transformers CLIPModel directory, else None."""
    path = epath.Path(directory)
    config_file, weights = path / CONFIG_FILE, path / MODEL_FILE
    if not (config_file.is_file() and weights.is_file()):
        return None
    try:
        record = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("model_type") != "clip":
        return None
    return os.fspath(weights)


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
    `checkpoint.save_model_directory`. Raises ExportError (before writing) for what CLIPModel cannot
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

    return checkpoint.write_directory_atomically(output_dir, write, overwrite)
