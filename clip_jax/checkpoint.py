"""Self-contained model directories (Orbax variables + config.json + tokenizer assets): writing and reading them.

`clip_jax.load` (in `clip_jax.api`) reads these, training workdirs and PyTorch checkpoints.

A model directory looks like

    config.json        {"format": "clip_jax.model", "model": <CLIPConfig>, "tokenizer": <tokenizer config>}
    variables/         an Orbax checkpoint of {"params": ..., ["batch_stats": ...]}
    <tokenizer files>  e.g. bpe_simple_vocab_16e6.txt.gz or spm.model

It is written into a hidden staging directory beside the target (created like any `mkdir`, so it
follows the umask) and renamed into place only when complete, so an interrupted or failed write
never leaves a half-written model directory. The rename is the only check that counts: it fails if
another writer's output got there first (which is then kept), and with `overwrite` the old directory
is moved aside just before it and deleted only after it succeeded.

Loading a damaged directory raises one `ValueError` (or `FileNotFoundError`) naming the directory
and the file, e.g. a `config.json` that is not JSON or a truncated file under `variables/`.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import traverse_util

from clip_jax import tokenizer as tokenizers
from clip_jax.models import CLIP, CLIPConfig
from clip_jax.models.layout import stack_layers, unstack_layers

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
    check_output_directory(output_dir, overwrite)
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = _make_hidden_directory(output_dir, "partial")
    try:
        variables = jax.tree_util.tree_map(np.asarray, nn.unbox(dict(variables)))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
        checkpointer.wait_until_finished()
        for asset in tokenizer.asset_files():
            shutil.copy2(asset, os.path.join(staging, os.path.basename(asset)))
        with open(os.path.join(staging, CONFIG_FILE), "w") as file:
            json.dump({"format": FORMAT, "model": config.to_dict(), "tokenizer": tokenizer.to_config()}, file, indent=2)
        _publish(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _hidden_name(output_dir: str, kind: str) -> str:
    return os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.{kind}-{secrets.token_hex(4)}")


def _make_hidden_directory(output_dir: str, kind: str) -> str:
    """A new, uniquely named hidden directory beside `output_dir`. A plain `os.mkdir`, unlike
    `tempfile.mkdtemp` (always 0700), so the published directory gets the umask's permissions."""
    for _ in range(100):
        path = _hidden_name(output_dir, kind)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging directory beside {output_dir!r}")


def _publish(staging: str, output_dir: str, overwrite: bool) -> None:
    """Rename the complete `staging` to `output_dir`, atomically and without clobbering another writer.

    `os.rename` of a directory fails onto a non-empty directory, so it is the check: no window lies
    between a test and the act. With `overwrite`, an existing output is first moved aside (itself an
    atomic rename) and deleted only once the new one is in place; if another writer lands in
    between, its output is kept and the old one is moved back, or left at its hidden name and
    reported if that is not possible.
    """
    aside = None
    if overwrite and os.path.lexists(output_dir):
        aside = _hidden_name(output_dir, "old")
        try:
            os.rename(output_dir, aside)
        except FileNotFoundError:  # someone else removed it meanwhile: nothing to move aside
            aside = None
    try:
        os.rename(staging, output_dir)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        kept = ""
        if aside is not None:
            try:
                os.rename(aside, output_dir)
            except OSError:
                kept = f"; the output it was to replace is kept at {aside!r}"
        raise FileExistsError(
            f"output directory {output_dir!r} was written by another process during this one's work; "
            f"it is left as that process wrote it{kept}; nothing was written; check it, then re-run "
            "(with overwrite to replace it)"
        ) from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _damaged(directory: str, what: str, reason: str) -> ValueError:
    reason = " ".join(reason.split())
    if len(reason) > 300:
        reason = reason[:300] + "…"
    return ValueError(
        f"model directory {directory!r}: {what} ({reason}); re-convert the model, or restore the directory from a copy"
    )


def read_model_config(directory: str) -> dict[str, Any]:
    """The parsed config.json of a model directory; one-line errors naming the file if it is damaged."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a clip_jax model directory: no {CONFIG_FILE}")
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as error:
        raise _damaged(
            directory, f"{CONFIG_FILE} is not valid JSON", f"{error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except UnicodeDecodeError as error:
        raise _damaged(directory, f"{CONFIG_FILE} is not UTF-8 text", str(error)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path!r} is not a clip_jax model config (format {found!r}, expected {FORMAT!r})")
    for key in ("model", "tokenizer"):
        if not isinstance(data.get(key), dict):
            raise _damaged(directory, f"{CONFIG_FILE} lacks its {key!r} section", f"keys {sorted(data)}")
    return data


def _innermost_message(error: BaseException) -> str:
    """The root cause's message: Orbax wraps TensorStore's one-line reason in a page-long spec dump."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _single_device_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load_model_directory(
    directory: str, sharding: jax.sharding.Sharding | None = None, **overrides: Any
) -> tuple[CLIPConfig, dict[str, Any]]:
    """(spec, variables) of a model directory, restored onto `sharding` (default: the first local device).

    `overrides` replace spec fields that do not change the parameters' meaning (dtype, scan_layers, …).
    """
    data = read_model_config(directory)
    try:  # a spec that parses may still fail to build (a string where a size belongs): both are damage
        stored = CLIPConfig.from_dict(data["model"]).validate()
        abstract = jax.eval_shape(lambda: nn.unbox(CLIP(stored).init_variables(jax.random.key(0))))
    except (TypeError, ValueError, KeyError) as error:
        first_line = (str(error).splitlines() or [""])[0]
        reason = f"{type(error).__name__}: {first_line}"
        raise _damaged(directory, f"{CONFIG_FILE} holds an invalid model spec", reason) from None
    config = stored.replace(**overrides) if overrides else stored
    sharding = sharding or _single_device_sharding()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    variables_dir = os.path.join(os.path.abspath(directory), VARIABLES_DIR)
    if not os.path.isdir(variables_dir):
        raise FileNotFoundError(f"model directory {directory!r} has no {VARIABLES_DIR}/; re-convert the model")
    try:
        variables = ocp.StandardCheckpointer().restore(variables_dir, abstract)
    except Exception as error:  # Orbax/TensorStore raise bare Exceptions with pages of detail
        raise _damaged(directory, f"{VARIABLES_DIR}/ could not be read", _innermost_message(error)) from None
    if config.scan_layers != stored.scan_layers:
        flat = traverse_util.flatten_dict(jax.device_get(variables))
        flat = stack_layers(flat) if config.scan_layers else unstack_layers(flat)
        variables = jax.device_put(traverse_util.unflatten_dict(flat), sharding)
    return config, variables


def load_tokenizer(directory: str) -> Any:
    """The tokenizer stored in a model directory; one that cannot be loaded is one ValueError
    naming the directory."""
    data = read_model_config(directory)
    try:
        return tokenizers.tokenizer_from_config(data["tokenizer"], directory)
    except (OSError, ValueError) as error:
        raise _damaged(directory, "its tokenizer could not be loaded", str(error)) from None
