"""Self-contained model directories (Orbax variables + config.json + tokenizer assets) and `load()`.

A model directory looks like

    config.json        {"format": "clip_jax.model", "model": <CLIPConfig>, "tokenizer": <tokenizer config>}
    variables/         an Orbax checkpoint of {"params": ..., ["batch_stats": ...]}
    <tokenizer files>  e.g. bpe_simple_vocab_16e6.txt.gz or spm.model

It is written into a hidden temporary directory beside the target and renamed into place only when
complete, so an interrupted or failed write never leaves a half-written model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable

import jax
import numpy as np

from clip_jax.models import CLIP, CLIPConfig

FORMAT = "clip_jax.model"
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def check_output_directory(output_dir: str, overwrite: bool = False) -> None:
    """Refuse, before any work, to write over an existing non-empty directory unless `overwrite`."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output {output_dir!r} exists and is not a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"output directory {output_dir!r} is not empty; pass overwrite=True to replace it")


def save_model_directory(
    output_dir: str, config: CLIPConfig, variables: dict[str, Any], tokenizer: Any, overwrite: bool = False
) -> str:
    """Write `variables` (numpy or jax arrays), the spec and the tokenizer's assets; atomic."""
    import orbax.checkpoint as ocp
    from flax import linen as nn

    check_output_directory(output_dir, overwrite)
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        variables = jax.tree_util.tree_map(np.asarray, nn.unbox(dict(variables)))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
        checkpointer.wait_until_finished()
        for asset in tokenizer.asset_files():
            shutil.copy2(asset, os.path.join(staging, os.path.basename(asset)))
        with open(os.path.join(staging, CONFIG_FILE), "w") as file:
            json.dump({"format": FORMAT, "model": config.to_dict(), "tokenizer": tokenizer.to_config()}, file, indent=2)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def read_model_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a clip_jax model directory: no {CONFIG_FILE}")
    with open(path) as file:
        data = json.load(file)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a clip_jax model config (format {data.get('format')!r})")
    return data


def _single_device_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load_model_directory(
    directory: str, sharding: jax.sharding.Sharding | None = None, **overrides: Any
) -> tuple[CLIPConfig, dict[str, Any]]:
    """(spec, variables) of a model directory, restored onto `sharding` (default: the first local device).

    `overrides` replace spec fields that do not change the parameters' meaning (dtype, scan_layers, …).
    """
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from clip_jax.convert import _stack_layers, _unstack_layers
    from flax import traverse_util

    data = read_model_config(directory)
    stored = CLIPConfig.from_dict(data["model"])
    config = stored.replace(**overrides) if overrides else stored
    sharding = sharding or _single_device_sharding()
    abstract = jax.eval_shape(lambda: nn.unbox(CLIP(stored).init_variables(jax.random.key(0))))
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    variables = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), VARIABLES_DIR), abstract)
    if config.scan_layers != stored.scan_layers:
        flat = traverse_util.flatten_dict(jax.device_get(variables))
        flat = _stack_layers(flat, config) if config.scan_layers else _unstack_layers(flat)
        variables = jax.device_put(traverse_util.unflatten_dict(flat), sharding)
    return config, variables


def warn_if_not_finite(path: str, variables: dict[str, Any]) -> None:
    """One RuntimeWarning if an array of `variables` holds NaN or inf: such weights load, but the
    outputs they touch are NaN (a diverged run's checkpoint, a broken conversion)."""
    from clip_jax.training.nonfinite import nonfinite_paths

    # Reduced where the arrays live: only one bool per array comes to the host.
    flags = np.array(jax.device_get([jax.numpy.isfinite(leaf).all() for leaf in jax.tree.leaves(variables)]))
    if flags.all():
        return
    paths = nonfinite_paths(variables, flags)
    warnings.warn(
        f"{path}: {len(paths)} of {flags.size} arrays hold non-finite values (NaN or inf), first {paths[0]}; "
        "the model's outputs will not be finite",
        RuntimeWarning,
        stacklevel=3,
    )


def load(
    path: str, model: str | None = None, **overrides: Any
) -> tuple[CLIP, dict[str, Any], Callable, Any]:
    """`(model, variables, preprocess, tokenizer)` from a clip_jax model directory or a PyTorch checkpoint.

    `path` is a directory written by `python -m clip_jax.convert` / `save_model_directory`, a training
    workdir of `train.py` (its newest complete checkpoint), or an OpenAI `.pt`, open_clip
    `.pt`/`.bin`/`.safetensors` or Hugging Face safetensors file (converted in memory; `model` names the
    spec if it should not be read off the shapes). Weights holding NaN or inf load with a RuntimeWarning.
    """
    from clip_jax import tokenizer as tokenizers
    from clip_jax import transforms
    from clip_jax.training import checkpointing

    if os.path.isdir(path) and checkpointing.is_training_workdir(path):
        config, variables, text_tokenizer = checkpointing.load_training_workdir(path, **overrides)
    elif os.path.isdir(path):
        data = read_model_config(path)
        config, variables = load_model_directory(path, **overrides)
        text_tokenizer = tokenizers.tokenizer_from_config(data["tokenizer"], path)
    elif os.path.isfile(path):
        from clip_jax import convert

        config, variables = convert.load_checkpoint(path, model, **overrides)
        hf_files = convert._hf_tokenizer_files(path)
        context = config.text.context_length
        text_tokenizer = (
            tokenizers.ClipTokenizer.from_hf_files(*hf_files, context_length=context)
            if hf_files
            else tokenizers.ClipTokenizer(context_length=context)
        )
        variables = jax.device_put(variables, _single_device_sharding())
    else:
        raise FileNotFoundError(f"no model directory or checkpoint file at {path!r}")
    warn_if_not_finite(path, variables)
    preprocess = transforms.make_eval_transform(config.vision.image_size)
    return CLIP(config), variables, preprocess, text_tokenizer
