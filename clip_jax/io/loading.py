"""`load_any`: the one entry that reads every model format clip_jax knows, as (config, variables,
tokenizer). `clip_jax.load`, LiT's initialisation (`config.init.checkpoint`) and
`python -m clip_jax.convert` all read through it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from etils import epath

from clip_jax import cli
from clip_jax.io import hf_layout, model_directory, torch_checkpoint, training_workdir
from clip_jax.io.variables import warn_if_not_finite
from clip_jax.models import CLIPConfig


def is_training_workdir(path: str) -> bool:
    """Whether `path` is a workdir of train.py, which `load_any` reads as one (its newest checkpoint)."""
    return epath.Path(path).is_dir() and training_workdir.is_training_workdir(path)


def load_any(
    path: str,
    model: str | CLIPConfig | None = None,
    activation: str | None = None,
    *,
    trust_torchscript: bool = False,
    ema: bool = True,
    announce: Callable[[str], None] | None = None,
    **overrides: Any,
) -> tuple[CLIPConfig, dict[str, Any], Any]:
    """(config, variables, tokenizer) of the model at `path`, its variables on the first local device.

    `path` is a clip_jax model directory (`model_directory`), a training workdir of `train.py` (its
    newest complete checkpoint, `training_workdir`), a transformers `CLIPModel` directory
    (config.json + model.safetensors), or an OpenAI `.pt`, open_clip `.pt`/`.bin`/`.safetensors` or
    Hugging Face safetensors file (`torch_checkpoint`, converted in memory; `model` names the model config
    if it should not be read off the shapes). `activation` and `overrides` replace model-config fields that
    leave the parameters' meaning as it is (dtype, scan_layers, ...). Weights holding NaN or inf
    load with a RuntimeWarning.

    `ema` and `announce` concern training workdirs: a run that kept a moving average of the
    parameters gives the average unless `ema=False`, and which was loaded is said in one line to
    `announce` (default: logging, at INFO). `trust_torchscript`: see `torch_checkpoint.read_checkpoint`.
    """
    if activation is not None:
        overrides["activation"] = activation
    if is_training_workdir(path):
        # Its checkpoints may be rotated out under the read (a live run): the retries' abandoned
        # Orbax reads would print tracebacks although the load succeeds.
        with cli.library_noise_quieted():
            config, variables, tokenizer = training_workdir.load_training_workdir(
                path, ema=ema, announce=announce, **overrides
            )
    elif epath.Path(path).is_dir() and hf_layout.model_file(path) is None:
        config, variables = model_directory.load_model_directory(path, **overrides)
        tokenizer = model_directory.load_tokenizer(path)
    elif epath.Path(path).is_file() or epath.Path(path).is_dir():  # a checkpoint file, a transformers directory
        config, variables = torch_checkpoint.load_checkpoint(
            path, model, trust_torchscript=trust_torchscript, **overrides
        )
        tokenizer = torch_checkpoint.checkpoint_tokenizer(path, config.text.context_length)
        # Converted files come as numpy.
        variables = jax.device_put(variables, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    else:
        raise FileNotFoundError(f"no model directory or checkpoint file at {path!r}")
    warn_if_not_finite(path, variables, stacklevel=2)
    return config, variables, tokenizer
