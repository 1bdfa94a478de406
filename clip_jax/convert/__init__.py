"""PyTorch CLIP checkpoints (OpenAI, open_clip, Hugging Face) <-> clip_jax variables, and the CLI.

Every source is first brought to open_clip's state-dict layout (numpy arrays keyed like
`visual.transformer.resblocks.0.attn.in_proj_weight`); one pair of functions then maps that layout
to and from the Flax variable tree, so the three formats share one well-tested path.

    python -m clip_jax.convert ViT-B-32.pt converted/vit_b32    (clip_jax/convert/__main__.py runs `main`)

PyTorch files are read and written where they lie on a local (or mounted) filesystem: safetensors
maps them into memory, and torch and the TorchScript reader open them as zip archives. Everything
else (the HF config.json and tokenizer files beside them, model directories) goes through epath.

Nothing a checkpoint contains is executed: OpenAI's TorchScript archives are read by
`clip_jax.torchscript` (tensors only, never `torch.jit.load`) unless the caller passes
`trust_torchscript=True` / `--trust-torchscript` for an archive that reader cannot handle, and
pickles go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from clip_jax import checkpoint, paths, torchscript
from clip_jax import tokenizer as tokenizers
from clip_jax.cli import one_line_errors
from clip_jax.convert import hf
from clip_jax.models import CLIP, CLIPConfig, TextConfig, VisionConfig, get_model_config
from clip_jax.models.layout import FlatVariables, stack_layers, unstack_layers

StateDict = dict[str, np.ndarray]

# Keys that carry no learned value: buffers rebuilt by the model, or OpenAI's hyper-parameter scalars.
_IGNORED_KEYS = re.compile(
    r"(^|\.)(attn_mask|input_resolution|context_length|vocab_size|position_ids)$|num_batches_tracked$"
)


class ConversionError(ValueError):
    """The checkpoint does not match the CLIP architecture: a missing, extra or mis-shaped tensor."""


class UntrustedTorchScriptError(ConversionError):
    """A TorchScript archive that only `torch.jit.load`, which runs its code, could read; not loaded."""


class ActivationGuessWarning(UserWarning):
    """The MLP activation of an open_clip file was assumed (open_clip's default), not read from it."""


_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Reading checkpoints into open_clip's layout
# ----------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array; bf16/fp16 weights (OpenAI's files are fp16) are widened to fp32."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return value.numpy()
    value = np.asarray(value)
    return value.astype(np.float32) if str(value.dtype) in ("bfloat16", "float16") else value


# torch.load(weights_only=True) could run code before 2.6 (CVE-2025-32434); pyproject's floor
# only binds installs through the `convert` extra, so an older torch already present is refused here.
MIN_TORCH = (2, 6)


def _import_torch(path: str):
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs PyTorch (pickled checkpoints); `pip install 'torch>=2.6'`, "
            "or convert a .safetensors file, which needs no torch"
        ) from error
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if found is None or tuple(int(n) for n in found.groups()) < MIN_TORCH:
        raise ImportError(
            f"reading {path} needs torch>={'.'.join(map(str, MIN_TORCH))}: torch {torch.__version__}'s "
            "torch.load(weights_only=True) can run code from the file (CVE-2025-32434); `pip install -U torch`"
        )
    return torch


def _read_torchscript(path: str, trust_torchscript: bool) -> StateDict:
    """An OpenAI archive's tensors: by the safe reader, or (only with consent) by torch.jit.load."""
    try:
        state_dict = torchscript.read_state_dict(path)
    except torchscript.UnsafeToRead as error:
        if not trust_torchscript:
            raise UntrustedTorchScriptError(
                f"{path!r}: the safe TorchScript reader cannot read it ({error}); torch.jit.load might, but "
                "TorchScript executes code when loaded, so it was not tried. If you trust the file, pass "
                "--trust-torchscript (trust_torchscript=True in Python)"
            ) from None
        _logger.warning("%s: %s; loading it with torch.jit.load, as trust_torchscript=True allows", path, error)
        torch = _import_torch(path)
        state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    return {k: _to_numpy(v) for k, v in state_dict.items()}


def _not_a_checkpoint_file(directory: str) -> str:
    """What a directory given as a checkpoint file is, and what takes it (never "does not exist")."""
    try:
        checkpoint.read_model_config(directory)
    except (OSError, ValueError):
        return (
            f"{directory!r} is a directory, not a checkpoint: expected a .pt/.bin/.safetensors file or a "
            "transformers CLIPModel directory (config.json + model.safetensors)"
        )
    return (
        f"{directory!r} is already a clip_jax model directory: clip_jax.load and evaluate.py --checkpoint read it "
        "as it is; --to-hf or --to-open-clip export it"
    )


def _torch_load_reason(error: Exception) -> str:
    """Why `torch.load(weights_only=True)` failed, in one line, without torch's advice to load
    the file with weights_only=False or to allow-list its globals (both run the file's code)."""
    text = str(error)
    needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if needed:
        return (
            f"it holds an object of type {needed[1]}, not only tensors, and clip_jax runs no code from a checkpoint; "
            "where the file was made, save the model's state_dict() alone (or as .safetensors)"
        )
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\.?\n|$)", text)
    if found:
        return f"unpickling it needs more than tensors ({found[1]})"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(error).__name__}: {lines[0] if lines else 'unreadable'}"


def read_checkpoint(path: str, trust_torchscript: bool = False) -> tuple[StateDict, str, dict[str, Any]]:
    """(open_clip-layout state dict, source kind "openai"|"open_clip"|"hf", hints for the model spec).

    Runs nothing the file contains. A TorchScript archive (recognised by its content, whatever its
    extension) is read by `clip_jax.torchscript`; one that reader refuses raises
    `UntrustedTorchScriptError` unless `trust_torchscript`, which falls back to `torch.jit.load`.
    """
    if epath.Path(path).is_dir() and hf.model_file(path) is not None:
        path = hf.model_file(path)  # a transformers CLIPModel directory: its weights file
    if epath.Path(path).is_dir():
        raise ConversionError(_not_a_checkpoint_file(path))
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    hints: dict[str, Any] = {}
    if path.endswith(".safetensors"):
        try:
            raw = load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError type
            raise ConversionError(f"{path!r} is not a readable safetensors file: {error}") from error
        kind = None
    elif torchscript.is_torchscript(path):
        raw = _read_torchscript(path, trust_torchscript)
        kind, hints["activation"], hints["activation_source"] = "openai", "quick_gelu", "OpenAI TorchScript file"
    else:
        torch = _import_torch(path)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            # `from None`: torch's message advises re-running with weights_only=False, i.e. running
            # the file's pickle; not even --verbose's traceback may repeat that.
            raise ConversionError(
                f"{path!r} is not a PyTorch checkpoint clip_jax can read: {_torch_load_reason(error)}"
            ) from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]  # an open_clip training checkpoint
        if not isinstance(loaded, dict):
            raise ConversionError(f"{path!r} holds a {type(loaded).__name__}, not a state dict")
        raw = {k: _to_numpy(v) for k, v in loaded.items() if hasattr(v, "shape")}
        kind = None
    raw = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in raw.items()}
    if kind is None:
        kind = "hf" if any(k.startswith(("text_model.", "vision_model.")) for k in raw) else "open_clip"
    if kind == "hf":
        hints.update(_hf_hints(path))
        raw = hf_to_openclip(raw)
        if "logit_bias" in hints:  # kept in config.json by `export_to_hf`: CLIPModel has no such tensor
            raw["logit_bias"] = hints.pop("logit_bias")
    if "token_embedding.weight" not in raw or not any(k.startswith("visual.") for k in raw):
        sample = ", ".join(sorted(raw)[:5]) or "no tensors"
        raise ConversionError(
            f"{path!r} is not a CLIP checkpoint: no text and image towers among its keys ({sample}, …)"
        )
    return raw, kind, hints


def _hf_hints(path: str) -> dict[str, Any]:
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
        spec = hf.clip_config_from_hf(hf_config)
    except ValueError as error:
        raise ConversionError(f"{config_path!r}: {error}") from None
    if spec is not None:  # a whole CLIPModel config: heads and MLP widths stated, not guessed
        hints["config"] = spec
    bias = hf.logit_bias_from_hf(hf_config)
    if bias is not None:
        hints["logit_bias"] = bias
    act = (hf_config.get("text_config") or {}).get("hidden_act") or hf_config.get("hidden_act")
    if act:
        hints["activation"] = "quick_gelu" if act == "quick_gelu" else "gelu"
        hints["activation_source"] = f"from config.json hidden_act {act!r}"
    return hints


def hf_to_openclip(hf_state_dict: StateDict) -> StateDict:
    """A Hugging Face `CLIPModel` state dict in open_clip's layout (q/k/v fused into in_proj)."""
    out: StateDict = {}
    separate_qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in hf_state_dict.items():
        if key == "visual_projection.weight":
            out["visual.proj"] = value.T
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T
            continue
        for pattern, replacement in hf.FROM_HF:
            key = re.sub(pattern, replacement, key)
        match = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if match:
            separate_qkv.setdefault(f"{match[1]}.attn.in_proj_{match[3]}", {})[match[2]] = value
            continue
        out[key] = value
    for key, parts in separate_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"attention {key!r} lacks its {sorted({'q', 'k', 'v'} - set(parts))} projection")
        out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def _count(state_dict: StateDict, pattern: str) -> int:
    return len({m[1] for k in state_dict if (m := re.match(pattern, k))})


def infer_config(state_dict: StateDict, activation: str = "quick_gelu") -> CLIPConfig:
    """The model spec read off tensor shapes, as OpenAI's `build_model` does."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ConversionError(f"cannot infer the architecture: missing tensor {key!r}")
        return state_dict[key].shape

    if "visual.class_embedding" in state_dict:  # a ViT; ModifiedResNets have no class token
        width, _, patch, _ = shape("visual.conv1.weight")
        grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=patch * grid,
            width=width,
            layers=_count(state_dict, r"visual\.transformer\.resblocks\.(\d+)\."),
            patch_size=patch,
        )
    else:
        width = shape("visual.layer1.0.conv1.weight")[0]
        grid = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=grid * 32,
            width=width,
            layers=tuple(_count(state_dict, rf"visual\.layer{s}\.(\d+)\.") for s in range(1, 5)),
            patch_size=None,
        )
    text_width = shape("ln_final.weight")[0]
    text = TextConfig(
        context_length=shape("positional_embedding")[0],
        vocab_size=shape("token_embedding.weight")[0],
        width=text_width,
        heads=text_width // 64,
        layers=_count(state_dict, r"transformer\.resblocks\.(\d+)\."),
    )
    projection = state_dict.get("text_projection")
    embed_dim = projection.shape[1] if projection is not None else shape("text_projection.weight")[0]
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        activation=activation,
        logit_bias_init=-10.0 if "logit_bias" in state_dict else None,
    ).validate()


# ----------------------------------------------------------------------------------------------
# open_clip layout <-> Flax variables
# ----------------------------------------------------------------------------------------------
# Each rule maps torch tensors to Flax leaves and back. `to_flax` receives the torch tensors named in
# `torch_keys` and returns {flax_path: array}; `to_torch` receives those Flax leaves and returns the
# torch tensors. Writing both directions side by side keeps the round trip exact by construction.


class _Rule:
    def __init__(
        self,
        torch_keys: list[str],
        flax_paths: list[tuple[str, ...]],
        to_flax: Callable[..., list[np.ndarray]],
        to_torch: Callable[..., list[np.ndarray]],
    ):
        self.torch_keys, self.flax_paths, self.to_flax, self.to_torch = torch_keys, flax_paths, to_flax, to_torch


def _copy(torch_key: str, flax_path: tuple[str, ...]) -> _Rule:
    return _Rule([torch_key], [flax_path], lambda t: [t], lambda f: [f])


def _transposed(torch_key: str, flax_path: tuple[str, ...]) -> _Rule:
    return _Rule([torch_key], [flax_path], lambda t: [t.T], lambda f: [f.T])


def _conv(torch_key: str, flax_path: tuple[str, ...]) -> _Rule:
    # torch (out, in, kh, kw) <-> flax (kh, kw, in, out)
    return _Rule([torch_key], [flax_path], lambda t: [t.transpose(2, 3, 1, 0)], lambda f: [f.transpose(3, 2, 0, 1)])


def _layer_norm(torch_prefix: str, flax_prefix: tuple[str, ...]) -> list[_Rule]:
    return [
        _copy(f"{torch_prefix}.weight", (*flax_prefix, "norm", "scale")),
        _copy(f"{torch_prefix}.bias", (*flax_prefix, "norm", "bias")),
    ]


def _batch_norm(torch_prefix: str, flax_prefix: tuple[str, ...]) -> list[_Rule]:
    return [
        _copy(f"{torch_prefix}.weight", ("params", *flax_prefix, "scale")),
        _copy(f"{torch_prefix}.bias", ("params", *flax_prefix, "bias")),
        _copy(f"{torch_prefix}.running_mean", ("batch_stats", *flax_prefix, "mean")),
        _copy(f"{torch_prefix}.running_var", ("batch_stats", *flax_prefix, "var")),
    ]


def _fused_attention(torch_prefix: str, flax_prefix: tuple[str, ...], heads: int) -> list[_Rule]:
    """torch in_proj (3W, W) + out_proj (W, W) <-> flax query/key/value (W, heads, head_dim) + out."""
    names = ("query", "key", "value")

    def weights_to_flax(in_proj):
        return [w.T.reshape(w.shape[1], heads, -1) for w in np.split(in_proj, 3, axis=0)]

    def biases_to_flax(in_bias):
        return [b.reshape(heads, -1) for b in np.split(in_bias, 3)]

    return [
        _Rule(
            [f"{torch_prefix}.in_proj_weight"],
            [(*flax_prefix, n, "kernel") for n in names],
            weights_to_flax,
            lambda q, k, v: [np.concatenate([x.reshape(x.shape[0], -1).T for x in (q, k, v)], axis=0)],
        ),
        _Rule(
            [f"{torch_prefix}.in_proj_bias"],
            [(*flax_prefix, n, "bias") for n in names],
            biases_to_flax,
            lambda q, k, v: [np.concatenate([x.reshape(-1) for x in (q, k, v)])],
        ),
        *_attention_output(f"{torch_prefix}.out_proj", flax_prefix, heads),
    ]


def _attention_output(torch_prefix: str, flax_prefix: tuple[str, ...], heads: int) -> list[_Rule]:
    return [
        _Rule(
            [f"{torch_prefix}.weight"],
            [(*flax_prefix, "out", "kernel")],
            lambda w: [w.T.reshape(heads, -1, w.shape[0])],
            lambda k: [k.reshape(-1, k.shape[-1]).T],
        ),
        _copy(f"{torch_prefix}.bias", (*flax_prefix, "out", "bias")),
    ]


def _separate_projection(torch_prefix: str, flax_path: tuple[str, ...], heads: int) -> list[_Rule]:
    """A torch Linear (W, W) <-> a flax DenseGeneral (W, heads, head_dim)."""
    return [
        _Rule(
            [f"{torch_prefix}.weight"],
            [(*flax_path, "kernel")],
            lambda w: [w.T.reshape(w.shape[1], heads, -1)],
            lambda k: [k.reshape(k.shape[0], -1).T],
        ),
        _Rule(
            [f"{torch_prefix}.bias"],
            [(*flax_path, "bias")],
            lambda b: [b.reshape(heads, -1)],
            lambda b: [b.reshape(-1)],
        ),
    ]


def _transformer(torch_prefix: str, flax_prefix: tuple[str, ...], layers: int, heads: int) -> list[_Rule]:
    rules = []
    for i in range(layers):
        t, f = f"{torch_prefix}.resblocks.{i}", (*flax_prefix, f"block_{i}")
        rules += _layer_norm(f"{t}.ln_1", (*f, "ln_1"))
        rules += _fused_attention(f"{t}.attn", (*f, "attn"), heads)
        rules += _layer_norm(f"{t}.ln_2", (*f, "ln_2"))
        rules += [
            _transposed(f"{t}.mlp.c_fc.weight", (*f, "mlp", "fc", "kernel")),
            _copy(f"{t}.mlp.c_fc.bias", (*f, "mlp", "fc", "bias")),
            _transposed(f"{t}.mlp.c_proj.weight", (*f, "mlp", "proj", "kernel")),
            _copy(f"{t}.mlp.c_proj.bias", (*f, "mlp", "proj", "bias")),
        ]
    return rules


def _conv_norm(torch_conv: str, torch_bn: str, flax_prefix: tuple[str, ...]) -> list[_Rule]:
    return [_conv(torch_conv, ("params", *flax_prefix, "conv", "kernel")), *_batch_norm(torch_bn, (*flax_prefix, "bn"))]


def _rules(config: CLIPConfig, state_dict_keys: set[str] | None = None) -> list[_Rule]:
    vision, text = config.vision, config.text
    params = ("params",)
    rules: list[_Rule] = []
    if vision.is_vit:
        v = (*params, "visual")
        rules += [
            _conv("visual.conv1.weight", (*v, "patch_embedding")),
            _copy("visual.class_embedding", (*v, "class_embedding")),
            _copy("visual.positional_embedding", (*v, "positional_embedding")),
            *_layer_norm("visual.ln_pre", (*v, "ln_pre")),
            *_transformer("visual.transformer", (*v, "transformer"), vision.layers, vision.num_heads),
            *_layer_norm("visual.ln_post", (*v, "ln_post")),
            _copy("visual.proj", (*v, "projection")),
        ]
    else:
        rules += _conv_norm("visual.conv1.weight", "visual.bn1", ("visual", "stem1"))
        rules += _conv_norm("visual.conv2.weight", "visual.bn2", ("visual", "stem2"))
        rules += _conv_norm("visual.conv3.weight", "visual.bn3", ("visual", "stem3"))
        in_planes = vision.width
        for stage, depth in enumerate(vision.layers):
            planes = vision.width * 2**stage
            for index in range(depth):
                t, f = f"visual.layer{stage + 1}.{index}", ("visual", f"layer{stage + 1}_{index}")
                for conv in ("conv1", "conv2", "conv3"):
                    rules += _conv_norm(f"{t}.{conv}.weight", f"{t}.bn{conv[-1]}", (*f, conv))
                stride = 2 if (stage > 0 and index == 0) else 1
                if stride > 1 or in_planes != planes * 4:
                    rules += _conv_norm(f"{t}.downsample.0.weight", f"{t}.downsample.1", (*f, "downsample"))
                in_planes = planes * 4
        a = (*params, "visual", "attnpool")
        rules += [
            _copy("visual.attnpool.positional_embedding", (*a, "positional_embedding")),
            *_separate_projection("visual.attnpool.q_proj", (*a, "attn", "query"), vision.num_heads),
            *_separate_projection("visual.attnpool.k_proj", (*a, "attn", "key"), vision.num_heads),
            *_separate_projection("visual.attnpool.v_proj", (*a, "attn", "value"), vision.num_heads),
            *_attention_output("visual.attnpool.c_proj", (*a, "attn"), vision.num_heads),
        ]
    t = (*params, "text")
    # open_clip's own text towers may hold the projection as a Linear ("text_projection.weight").
    if state_dict_keys is not None and "text_projection.weight" in state_dict_keys:
        text_projection = _Rule(["text_projection.weight"], [(*t, "projection")], lambda w: [w.T], lambda p: [p.T])
    else:
        text_projection = _copy("text_projection", (*t, "projection"))
    rules += [
        _copy("token_embedding.weight", (*t, "token_embedding")),
        _copy("positional_embedding", (*t, "positional_embedding")),
        *_transformer("transformer", (*t, "transformer"), text.layers, text.heads),
        *_layer_norm("ln_final", (*t, "ln_final")),
        text_projection,
        _copy("logit_scale", (*params, "logit_scale")),
    ]
    if config.logit_bias_init is not None:
        rules.append(_copy("logit_bias", (*params, "logit_bias")))
    return rules


def _expected_shapes(config: CLIPConfig) -> FlatVariables:
    unscanned = CLIP(config.replace(scan_layers=False, remat_policy="none"))
    shapes = jax.eval_shape(lambda: unscanned.init_variables(jax.random.key(0)))
    return traverse_util.flatten_dict(nn.unbox(shapes))


def openclip_to_variables(state_dict: StateDict, config: CLIPConfig) -> dict[str, Any]:
    """Flax variables ({"params", ["batch_stats"]}) of numpy arrays from an open_clip-layout state dict.

    Raises ConversionError naming the first missing or mis-shaped tensor, or the tensors left unused.
    """
    expected = _expected_shapes(config)
    flat: FlatVariables = {}
    used: set[str] = set()
    for rule in _rules(config, set(state_dict)):
        missing = [k for k in rule.torch_keys if k not in state_dict]
        if missing:
            tower = "ViT" if config.vision.is_vit else "ModifiedResNet"
            raise ConversionError(f"missing tensor {missing[0]!r} (needed by a {tower} CLIP)")
        inputs = [np.asarray(state_dict[k], dtype=np.float32) for k in rule.torch_keys]
        try:
            outputs = rule.to_flax(*inputs)
        except ValueError as error:  # a reshape that the shape cannot satisfy
            raise ConversionError(
                f"tensor {rule.torch_keys[0]!r} has shape {tuple(inputs[0].shape)}, which does not fit the model"
            ) from error
        for path, value in zip(rule.flax_paths, outputs):
            if path not in expected:
                raise ConversionError(f"internal: no parameter {'/'.join(path)} in the model")
            want = tuple(expected[path].shape)
            if tuple(value.shape) != want:
                raise ConversionError(
                    f"tensor {rule.torch_keys[0]!r} has shape {tuple(inputs[0].shape)}; the model needs "
                    f"{'/'.join(path)} of shape {want}"
                )
            flat[path] = np.array(value, order="C")
        used.update(rule.torch_keys)
    unused = sorted(k for k in state_dict if k not in used and not _IGNORED_KEYS.search(k))
    if unused:
        raise ConversionError(f"tensors not used by the model: {unused[:10]}{' …' if len(unused) > 10 else ''}")
    not_filled = sorted("/".join(p) for p in expected if p not in flat)
    if not_filled:
        raise ConversionError(f"internal: model parameters not filled: {not_filled[:5]}")
    if config.scan_layers:
        flat = stack_layers(flat)
    return traverse_util.unflatten_dict(flat)


def variables_to_openclip(variables: dict[str, Any], config: CLIPConfig) -> StateDict:
    """The inverse of `openclip_to_variables`: an open_clip-layout state dict of float32 numpy arrays.

    BatchNorm's `num_batches_tracked` counters are written as 0: they count training steps, are unused
    when the momentum is set (as in CLIP), and Flax keeps no such counter.
    """
    if config.decoder is not None or config.bag_of_words:
        # open_clip's CLIP has no place for them, and its CoCa's decoder is laid out differently: a
        # state dict without them would silently lose part of the model.
        raise ConversionError(
            "cannot export a model with a caption decoder or bag-of-words head to open_clip's CLIP layout"
        )
    flat = traverse_util.flatten_dict(nn.unbox(dict(variables)))
    flat = {path: np.asarray(jax.device_get(value), dtype=np.float32) for path, value in flat.items()}
    if config.scan_layers:
        flat = unstack_layers(flat)
    state_dict: StateDict = {}
    for rule in _rules(config):
        outputs = rule.to_torch(*[flat[p] for p in rule.flax_paths])
        for key, value in zip(rule.torch_keys, outputs):
            state_dict[key] = np.array(value, order="C")
        for key in rule.torch_keys:
            if key.endswith(".running_var"):
                state_dict[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return state_dict


# ----------------------------------------------------------------------------------------------
# Whole checkpoints
# ----------------------------------------------------------------------------------------------


def convert_state_dict(
    state_dict: StateDict, model: str | CLIPConfig | None = None, activation: str | None = None, **overrides: Any
) -> tuple[CLIPConfig, dict[str, Any]]:
    """(spec, variables) for an open_clip-layout state dict; the spec from `model` or read off the shapes."""
    if isinstance(model, CLIPConfig):
        config = model
    elif model is not None:
        config = get_model_config(model)
    else:
        config = infer_config(state_dict, activation or "gelu")
    if activation is not None:
        config = config.replace(activation=activation)
    if overrides:
        config = config.replace(**overrides)
    return config, openclip_to_variables(state_dict, config)


@dataclasses.dataclass(frozen=True)
class ActivationChoice:
    """Which MLP activation a conversion used, and why: it cannot be read off the weights."""

    activation: str
    source: str  # "argument", "file" (OpenAI's format or an HF config.json), "spec" or "default"
    detail: str = ""  # what the file said, or the spec's name

    @property
    def guessed(self) -> bool:
        return self.source == "default"

    def describe(self, cli: bool = False) -> str:
        """One line, e.g. "activation: gelu (open_clip's default; pass --activation quick_gelu ...)"."""
        if self.source == "argument":
            why = "from --activation" if cli else "from the activation argument"
        elif self.source in ("file", "spec"):
            why = self.detail
        else:
            flag = "--activation quick_gelu" if cli else "activation='quick_gelu'"
            why = f"open_clip's default, not stored in the file; pass {flag} for OpenAI-trained / -quickgelu models"
        return f"activation: {self.activation} ({why})"


def load_checkpoint(
    path: str,
    model: str | CLIPConfig | None = None,
    activation: str | None = None,
    *,
    trust_torchscript: bool = False,
    announce: Callable[[ActivationChoice], None] | None = None,
    **overrides: Any,
) -> tuple[CLIPConfig, dict[str, Any]]:
    """(spec, variables) from an OpenAI `.pt`, an open_clip `.pt`/`.bin`/`.safetensors` or an HF safetensors.

    Without `model`, the spec is read off the tensor shapes. The activation cannot be: OpenAI files
    imply QuickGELU, HF files carry it in their config.json, and other open_clip files default to GELU
    (open_clip's default) unless `activation="quick_gelu"` is passed (the "-quickgelu" models).
    The choice is passed to `announce`; without one, a guessed activation is a warning
    (`ActivationGuessWarning`) and the others are logged. `trust_torchscript`: see `read_checkpoint`.
    """
    state_dict, kind, hints = read_checkpoint(path, trust_torchscript=trust_torchscript)
    if model is None and "config" in hints:
        model = hints["config"]
    if activation is not None:
        chosen, source, detail = activation, "argument", ""
    elif "activation" in hints:
        chosen, source, detail = hints["activation"], "file", hints["activation_source"]
    elif model is not None:
        name = model if isinstance(model, str) else "given model"
        chosen, source, detail = None, "spec", f"from the {name} spec"
    else:
        chosen, source, detail = "gelu", "default", ""
    config, variables = convert_state_dict(state_dict, model, chosen, **overrides)
    choice = ActivationChoice(config.activation, source, detail)
    if announce is not None:
        announce(choice)
    elif choice.guessed:
        warnings.warn(f"{path}: {choice.describe()}", ActivationGuessWarning, stacklevel=2)
    else:
        _logger.info("%s: %s", path, choice.describe())
    return config, variables


def save_state_dict(state_dict: StateDict, path: str) -> None:
    """Write an open_clip-layout state dict: safetensors by extension, a torch pickle otherwise."""
    if path.endswith(".safetensors"):
        save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, path)
        return
    torch = _import_torch(path)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)


def checkpoint_tokenizer(path: str, context_length: int, bpe_path: str | None = None) -> tokenizers.ClipTokenizer:
    """The tokenizer of the PyTorch checkpoint at `path`: OpenAI's BPE from `bpe_path` if given, else
    the Hugging Face vocab.json + merges.txt beside the file when both are there, else OpenAI's BPE
    (what every CLIP checkpoint was trained with)."""
    directory = epath.Path(path) if epath.Path(path).is_dir() else epath.Path(path).parent  # an HF directory
    hf_files = tokenizers.hf_tokenizer_files(directory)
    if bpe_path is None and hf_files is not None:
        return tokenizers.ClipTokenizer.from_hf_files(*hf_files, context_length=context_length)
    return tokenizers.ClipTokenizer(bpe_path, context_length=context_length)


def convert_checkpoint(
    source: str,
    output_dir: str,
    model: str | None = None,
    activation: str | None = None,
    bpe_path: str | None = None,
    overwrite: bool = False,
    *,
    trust_torchscript: bool = False,
    announce: Callable[[ActivationChoice], None] | None = None,
) -> CLIPConfig:
    """Convert a PyTorch checkpoint into a self-contained clip_jax model directory (see `checkpoint`).

    `trust_torchscript` and `announce`: see `load_checkpoint`."""
    paths.check_output(output_dir, directory=True, replace=overwrite)  # before the (slow) conversion
    config, variables = load_checkpoint(
        source, model, activation, trust_torchscript=trust_torchscript, announce=announce
    )
    text_tokenizer = checkpoint_tokenizer(source, config.text.context_length, bpe_path)
    checkpoint.save_model_directory(output_dir, config, variables, text_tokenizer, overwrite=overwrite)
    return config


def export_to_hf(
    output_dir: str, config: CLIPConfig, variables: dict[str, Any], tokenizer: Any, overwrite: bool = False
) -> str:
    """Write a transformers `CLIPModel` directory (see `clip_jax.convert.hf`); atomic, like
    `convert_checkpoint`. Raises `hf.ExportError` in one line, before writing anything, for what
    transformers cannot represent. `python -m clip_jax.convert SRC OUT --to-hf` calls it.

        model, variables, _, tokenizer = clip_jax.load(SRC)
        convert.export_to_hf(OUT, model.config, variables, tokenizer)
    """
    hf.check_exportable(config, tokenizer)  # before the (slow) gathering of the weights
    state_dict = variables_to_openclip(variables, config)
    return hf.write_hf_directory(output_dir, config, state_dict, tokenizer, overwrite)


# (path, model, activation, trust_torchscript) -> (spec, variables, tokenizer) of anything clip_jax loads.
SourceLoader = Callable[[str, "str | None", "str | None", bool], tuple[CLIPConfig, dict[str, Any], Any]]


def load_source(
    path: str,
    model: str | None = None,
    activation: str | None = None,
    trust_torchscript: bool = False,
    **overrides: Any,
) -> tuple[CLIPConfig, dict[str, Any], Any]:
    """(spec, variables, tokenizer) of a clip_jax model directory, a transformers CLIPModel
    directory or a PyTorch / HF checkpoint file; `activation` and `overrides` replace spec fields.
    `clip_jax.load` reads these through it. Training workdirs need clip_jax.training, which this
    layer does not import: `python -m clip_jax.convert` passes `clip_jax.api`'s loader, which reads
    them too."""
    if activation is not None:
        overrides["activation"] = activation
    if epath.Path(path).is_dir() and hf.model_file(path) is None:
        config, variables = checkpoint.load_model_directory(path, **overrides)
        return config, variables, checkpoint.load_tokenizer(path)
    config, variables = load_checkpoint(path, model, trust_torchscript=trust_torchscript, **overrides)
    return config, variables, checkpoint_tokenizer(path, config.text.context_length)


def main(
    argv: list[str] | None = None,
    load: SourceLoader | None = None,
    is_training_workdir: Callable[[str], bool] | None = None,
) -> None:
    """The command line; errors are one `error: ...` line on stderr (exit 1), tracebacks with --verbose.

    `load` reads the source of --to-hf and --to-open-clip (default `load_source`);
    `is_training_workdir` recognises a train.py workdir given as a checkpoint to convert, to say
    so. `python -m clip_jax.convert` passes clip_jax.api's, which know workdirs (this layer does not)."""
    parser = argparse.ArgumentParser(
        prog="python -m clip_jax.convert",
        description="Convert an OpenAI / open_clip / Hugging Face CLIP checkpoint into a clip_jax directory, "
        "or (--to-open-clip) a clip_jax directory back into an open_clip state dict.",
    )
    parser.add_argument(
        "source",
        help="a .pt/.bin/.safetensors checkpoint, or a clip_jax directory or train.py workdir with --to-hf / --to-open-clip",
    )
    parser.add_argument("output", help="the directory to create (or the state-dict file with --to-open-clip)")
    parser.add_argument("--model", help="a registered spec name (default: read off the tensor shapes)")
    parser.add_argument("--activation", choices=["quick_gelu", "gelu"], help="override the MLP activation")
    parser.add_argument("--bpe", help="path of bpe_simple_vocab_16e6.txt.gz (default: CLIP_JAX_BPE or open_clip's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--to-open-clip",
        action="store_true",
        help="export SOURCE (a clip_jax directory or workdir, or a checkpoint file) as an open_clip state dict",
    )
    parser.add_argument(
        "--to-hf",
        action="store_true",
        help="export SOURCE (a clip_jax directory or workdir, or a checkpoint file) as a transformers CLIPModel directory",
    )
    parser.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="if a TorchScript archive cannot be read safely, load it with torch.jit.load, which RUNS ITS CODE: "
        "only for files you trust (OpenAI's usual .pt files need no such consent)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.to_hf and args.to_open_clip:
        parser.error("--to-hf and --to-open-clip exclude each other")
    with one_line_errors(args.verbose):
        _run(args, load or load_source, is_training_workdir or (lambda path: False))


def _run(args: argparse.Namespace, load: SourceLoader, is_training_workdir: Callable[[str], bool]) -> None:
    # Before the (slow) loading, and naming the command line's flag rather than the keyword.
    paths.check_output(
        args.output, directory=not args.to_open_clip, replace=args.overwrite, overwrite_hint="pass --overwrite"
    )
    if args.to_hf:
        config, variables, text_tokenizer = load(args.source, args.model, args.activation, args.trust_torchscript)
        export_to_hf(args.output, config, variables, text_tokenizer, args.overwrite)
        print(
            f"wrote {args.output}: transformers CLIPModel, ViT-{config.vision.patch_size}, activation {config.activation}"
        )
        if config.logit_bias_init is not None:
            print("note: CLIPModel has no logit_bias; its logits omit it (embeddings are exact); kept in config.json")
        return
    if args.to_open_clip:
        config, variables, _ = load(args.source, args.model, args.activation, args.trust_torchscript)
        paths.absolute(args.output).parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(variables_to_openclip(variables, config), args.output)
        print(f"wrote {args.output}")
        return
    if is_training_workdir(args.source):
        raise ConversionError(
            f"{args.source!r} is a train.py workdir, not a PyTorch checkpoint: clip_jax.load and evaluate.py "
            "--checkpoint read it as it is; to export its newest checkpoint add --to-hf (a transformers CLIPModel "
            "directory) or --to-open-clip with an output file such as model.safetensors (an open_clip state dict)"
        )
    config = convert_checkpoint(
        args.source, args.output, args.model, args.activation, args.bpe, args.overwrite,
        trust_torchscript=args.trust_torchscript, announce=lambda choice: print(choice.describe(cli=True), flush=True),
    )  # fmt: skip
    kind = f"ViT-{config.vision.patch_size}" if config.vision.is_vit else f"ResNet {config.vision.layers}"
    print(f"wrote {args.output}: {kind}, image {config.vision.image_size}px, embed {config.embed_dim}")
