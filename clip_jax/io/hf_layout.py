"""The transformers `CLIPModel` format, read side: its directory, its config.json as a
`CLIPConfig`, and the one table of names between its state dict and open_clip's, read both ways
(`rename_state_dict`). Writing such a directory is `clip_jax.convert.hf`'s job. Nothing here
imports torch or transformers.

An exported model's `logit_bias`, which `CLIPModel` has no place for, is kept in config.json under
`clip_jax_logit_bias` (transformers ignores it); `hf_hints` restores it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from etils import epath

from clip_jax.io.openclip_layout import ConversionError, StateDict
from clip_jax.models import CLIPConfig, TextConfig, VisionConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LOGIT_BIAS_KEY = "clip_jax_logit_bias"  # {"value": float, "init": float}: what CLIPModel cannot hold


# The one table of names between open_clip's layout and CLIPModel's: (open_clip, CLIPModel, where
# the part stands in a name: the "whole" name, its "start", or "inside" it). Both directions are
# made from it (`rename_state_dict`), with TRANSPOSED: the projections, stored transposed; the
# q/k/v split of in_proj is done by the code, not by renaming.
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
# open_clip's projection matrices -> CLIPModel's Linear weights, their transposes.
TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_FUSED = re.compile(r"(.*)\.attn\.in_proj_(weight|bias)$")  # open_clip's q/k/v in one tensor
_SEPARATE = re.compile(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")  # CLIPModel's three


def rename_state_dict(state_dict: StateDict, to_hf: bool) -> StateDict:
    """An open_clip-layout state dict in CLIPModel's layout (`to_hf`, in_proj split into q/k/v),
    or the other way (q/k/v fused into in_proj). Keys the table does not name keep their names."""
    transposed = TRANSPOSED if to_hf else {hf_key: key for key, hf_key in TRANSPOSED.items()}
    out: StateDict = {}
    separate_qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        if key in transposed:
            out[transposed[key]] = value.T
            continue
        for pattern, replacement in TO_HF if to_hf else FROM_HF:
            key = re.sub(pattern, replacement, key)
        fused, separate = _FUSED.match(key), _SEPARATE.match(key)
        if to_hf and fused:
            for name, part in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{fused[1]}.self_attn.{name}_proj.{fused[2]}"] = part
        elif not to_hf and separate:
            separate_qkv.setdefault(f"{separate[1]}.attn.in_proj_{separate[3]}", {})[separate[2]] = value
        else:
            out[key] = value
    for key, parts in separate_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"attention {key!r} lacks its {sorted({'q', 'k', 'v'} - set(parts))} projection")
        out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


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
                patch_size=int(vision.get("patch_size", 32)),
                **_tower_sizes(vision, width=768, layers=12, heads=12, intermediate=3072),
            ),
            text=TextConfig(
                context_length=int(text.get("max_position_embeddings", 77)),
                vocab_size=int(text.get("vocab_size", 49408)),
                **_tower_sizes(text, width=512, layers=12, heads=8, intermediate=2048),
            ),
            activation="quick_gelu" if act == "quick_gelu" else "gelu",
            logit_scale_init=float(record.get("logit_scale_init_value", CLIPConfig.logit_scale_init)),
            logit_bias_init=float(bias["init"]) if isinstance(bias, dict) else None,
        ).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"the Hugging Face config.json does not describe a CLIP clip_jax can build: {error}") from None


def _tower_sizes(tower: dict[str, Any], width: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    """A tower's width, depth, heads and MLP ratio from its transformers config (the defaults are
    CLIP ViT-B/32's, transformers' own)."""
    hidden = tower.get("hidden_size", width)
    return {
        "width": int(hidden),
        "layers": int(tower.get("num_hidden_layers", layers)),
        "heads": int(tower.get("num_attention_heads", heads)),
        "mlp_ratio": _mlp_ratio(tower.get("intermediate_size", intermediate), hidden),
    }


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


def hf_hints(path: str) -> dict[str, Any]:
    """What the transformers config.json beside the weights file `path` says of the model: its
    "config", "logit_bias", "activation" and where that came from; {} without such a file."""
    config_file = epath.Path(path).parent / "config.json"
    config_path = os.fspath(config_file)
    if not config_file.is_file():
        return {}
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(
            f"{config_path!r} (the Hugging Face config beside {epath.Path(path).name!r}) is not valid JSON "
            f"({error.msg} at line {error.lineno} column {error.colno}); restore it, or move it away"
        ) from None
    if not isinstance(hf_config, dict):
        return {}
    hints: dict[str, Any] = {}
    try:
        model_config = clip_config_from_hf(hf_config)
    except ValueError as error:
        raise ConversionError(f"{config_path!r}: {error}") from None
    if model_config is not None:  # a whole CLIPModel config: heads and MLP widths stated, not guessed
        hints["config"] = model_config
    bias = logit_bias_from_hf(hf_config)
    if bias is not None:
        hints["logit_bias"] = bias
    act = (hf_config.get("text_config") or {}).get("hidden_act") or hf_config.get("hidden_act")
    if act:
        hints["activation"] = "quick_gelu" if act == "quick_gelu" else "gelu"
        hints["activation_source"] = f"from config.json hidden_act {act!r}"
    return hints
