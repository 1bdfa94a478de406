"""PyTorch CLIP checkpoints (OpenAI, open_clip, Hugging Face) read into clip_jax variables.

Every source is first brought to open_clip's state-dict layout (`read_checkpoint`), which
`clip_jax.io.openclip_layout` maps to the Flax variable tree; `load_checkpoint` does both, with the
model config read off the shapes (or named) and the activation chosen as the file allows.

PyTorch files are read where they lie on a local (or mounted) filesystem: safetensors maps them
into memory, and torch and the TorchScript reader open them as zip archives. Everything else (the
HF config.json and tokenizer files beside them) goes through epath.

Nothing a checkpoint contains is executed: OpenAI's TorchScript archives are read by
`clip_jax.torchscript` (tensors only, never `torch.jit.load`) unless the caller passes
`trust_torchscript=True` / `--trust-torchscript` for an archive that reader cannot handle, and
pickles go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath
from safetensors.numpy import load_file

from clip_jax import tokenizer as tokenizers
from clip_jax import torchscript
from clip_jax.io import hf_layout, model_directory
from clip_jax.io.openclip_layout import ConversionError, StateDict, convert_state_dict
from clip_jax.models import CLIPConfig


class UntrustedTorchScriptError(ConversionError):
    """A TorchScript archive that only `torch.jit.load`, which runs its code, could read; not loaded."""


class ActivationGuessWarning(UserWarning):
    """The MLP activation of an open_clip file was assumed (open_clip's default), not read from it."""


_logger = logging.getLogger(__name__)


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


def import_torch(path: str):
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
        torch = import_torch(path)
        state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    return {k: _to_numpy(v) for k, v in state_dict.items()}


def _not_a_checkpoint_file(directory: str) -> str:
    """What a directory given as a checkpoint file is, and what takes it (never "does not exist")."""
    try:
        model_directory.read_model_config(directory)
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
    """(open_clip-layout state dict, source kind "openai"|"open_clip"|"hf", hints for the model config).

    Runs nothing the file contains. A TorchScript archive (recognised by its content, whatever its
    extension) is read by `clip_jax.torchscript`; one that reader refuses raises
    `UntrustedTorchScriptError` unless `trust_torchscript`, which falls back to `torch.jit.load`.
    """
    if epath.Path(path).is_dir() and hf_layout.model_file(path) is not None:
        path = hf_layout.model_file(path)  # a transformers CLIPModel directory: its weights file
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
        torch = import_torch(path)
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
        hints.update(hf_layout.hf_hints(path))
        raw = hf_layout.rename_state_dict(raw, to_hf=False)
        if "logit_bias" in hints:  # kept in config.json by `export_to_hf`: CLIPModel has no such tensor
            raw["logit_bias"] = hints.pop("logit_bias")
    if "token_embedding.weight" not in raw or not any(k.startswith("visual.") for k in raw):
        sample = ", ".join(sorted(raw)[:5]) or "no tensors"
        raise ConversionError(
            f"{path!r} is not a CLIP checkpoint: no text and image towers among its keys ({sample}, …)"
        )
    return raw, kind, hints


@dataclasses.dataclass(frozen=True)
class ActivationChoice:
    """Which MLP activation a conversion used, and why: it cannot be read off the weights."""

    activation: str
    source: str  # "argument", "file" (OpenAI's format or an HF config.json), "model_config" or "default"
    detail: str = ""  # what the file said, or the model config's name

    @property
    def guessed(self) -> bool:
        return self.source == "default"

    def describe(self, cli: bool = False) -> str:
        """One line, e.g. "activation: gelu (open_clip's default; pass --activation quick_gelu ...)"."""
        if self.source == "argument":
            why = "from --activation" if cli else "from the activation argument"
        elif self.source in ("file", "model_config"):
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
    """(model_config, variables) from an OpenAI `.pt`, an open_clip `.pt`/`.bin`/`.safetensors` or an HF safetensors.

    Without `model`, the model config is read off the tensor shapes. The activation cannot be: OpenAI files
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
        chosen, source, detail = None, "model_config", f"from the {name} model config"
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


def checkpoint_tokenizer(path: str, context_length: int, bpe_path: str | None = None) -> tokenizers.ClipTokenizer:
    """The tokenizer of the PyTorch checkpoint at `path`: OpenAI's BPE from `bpe_path` if given, else
    the Hugging Face vocab.json + merges.txt beside the file when both are there, else OpenAI's BPE
    (what every CLIP checkpoint was trained with)."""
    directory = epath.Path(path) if epath.Path(path).is_dir() else epath.Path(path).parent  # an HF directory
    hf_files = tokenizers.hf_tokenizer_files(directory)
    if bpe_path is None and hf_files is not None:
        return tokenizers.ClipTokenizer.from_hf_files(*hf_files, context_length=context_length)
    return tokenizers.ClipTokenizer(bpe_path, context_length=context_length)
