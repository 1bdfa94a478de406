"""Self-contained model directories (Orbax variables + config.json + tokenizer assets): writing and reading them.

`clip_jax.io.load_any` (behind `clip_jax.load`) reads these, training workdirs and PyTorch checkpoints.

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

Paths go through etils epath, so a model directory may be read from a bucket (gs://...). Writing
one needs a local (or mounted) filesystem: the final step is `os.rename`, whose POSIX semantics are
the protocol (see `_publish`); an object store has no atomic rename of a directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn
from flax import traverse_util

from clip_jax import paths
from clip_jax import tokenizer as tokenizers
from clip_jax.models import CLIP, CLIPConfig
from clip_jax.models.layout import stack_layers, unstack_layers

FORMAT = "clip_jax.model"
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def save_model_directory(
    output_dir: str | os.PathLike,
    config: CLIPConfig,
    variables: dict[str, Any],
    tokenizer: Any,
    overwrite: bool = False,
) -> str:
    """Write `variables` (numpy or jax arrays), the model config and the tokenizer's assets; atomic
    (`write_directory_atomically`). Returns the directory's absolute path."""

    def write(staging: epath.Path) -> None:
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(staging / VARIABLES_DIR, jax.tree_util.tree_map(np.asarray, nn.unbox(dict(variables))))
            checkpointer.wait_until_finished()
        except BaseException:
            _wait_for_abandoned_writes(staging)  # before the staging directory is removed
            raise
        finally:
            with contextlib.suppress(Exception):  # its background threads end here
                checkpointer.close()
        for asset in tokenizer.asset_files():
            asset = epath.Path(asset)
            asset.copy(staging / asset.name)
        record = {"format": FORMAT, "model": config.to_dict(), "tokenizer": tokenizer.to_config()}
        (staging / CONFIG_FILE).write_text(json.dumps(record, indent=2))

    return write_directory_atomically(output_dir, write, overwrite)


def write_directory_atomically(
    output_dir: str | os.PathLike, write: Callable[[epath.Path], None], overwrite: bool = False
) -> str:
    """Call `write(staging)` on a new hidden directory beside `output_dir`, then publish it there
    with one rename (`overwrite` replaces an existing output). If `write` fails, nothing is left
    behind. Returns the directory's absolute path. Model directories and `--to-hf` exports."""
    paths.check_output(output_dir, directory=True, replace=overwrite)
    output = paths.absolute(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_hidden_directory(output, "partial")
    try:
        try:
            write(staging)
        except Exception as error:
            # Orbax and TensorStore report a full disk as pages naming files of the staging directory.
            raise OSError(
                f"could not write {os.fspath(output)!r}: {_write_failure(error)}; nothing was written "
                "(free space or choose another output, then re-run)"
            ) from error
        _publish(staging, output, overwrite)
    except BaseException:
        _remove_tree(staging)
        raise
    return os.fspath(output)


def _wait_for_abandoned_writes(directory: epath.Path, quiet_seconds: float = 0.5, limit_seconds: float = 5.0) -> None:
    """Return once nothing under `directory` has changed for `quiet_seconds` (at most after
    `limit_seconds`). Orbax raises at the first failed array write, while TensorStore's other
    writes of the same save go on in its own threads, beyond Orbax's reach, and would recreate
    the directories of a staging directory removed meanwhile (the last one writes the OCDBT
    manifest: one full-disk conversion in ten left such a directory behind)."""

    def snapshot() -> list[tuple[str, int]]:
        found = []
        for root, _, files in os.walk(os.fspath(directory)):
            for name in files:
                with contextlib.suppress(OSError):
                    found.append((os.path.join(root, name), os.path.getsize(os.path.join(root, name))))
        return sorted(found)

    deadline, last, quiet_since = time.monotonic() + limit_seconds, snapshot(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_seconds:
        time.sleep(0.05)
        current = snapshot()
        if current != last:
            last, quiet_since = current, time.monotonic()


def _write_failure(error: BaseException) -> str:
    """The reason of a failed write in a few words: the OS's own ("No space left on device") when
    the error carries an errno, as OSError does and TensorStore's text does ("[os_error_code='28']")."""
    while True:
        if isinstance(error, OSError) and error.errno is not None:
            return os.strerror(error.errno)
        code = re.search(r"os_error_code='?(\d+)", str(error))
        if code:
            return os.strerror(int(code[1]))
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is None:
            return _innermost_message(error)
        error = cause


def _remove_tree(path: epath.Path) -> None:
    """Delete a directory this process made, as far as it can: a cleanup that fails must not hide
    the error being handled."""
    for _ in range(3):  # a file written meanwhile makes a pass fail ("Directory not empty")
        try:
            path.rmtree()
            return
        except FileNotFoundError:
            return
        except OSError:
            continue


def _hidden_name(output: epath.Path, kind: str) -> epath.Path:
    return output.parent / f".{output.name}.{kind}-{secrets.token_hex(4)}"


def _make_hidden_directory(output: epath.Path, kind: str) -> epath.Path:
    """A new, uniquely named hidden directory beside `output`. A plain mkdir (`os.mkdir` on a local
    disk), unlike `tempfile.mkdtemp` (always 0700), so the published directory gets the umask's
    permissions; it fails if the name exists, so the directory is this process's alone."""
    for _ in range(100):
        path = _hidden_name(output, kind)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging directory beside {os.fspath(output)!r}")


def _publish(staging: epath.Path, output: epath.Path, overwrite: bool) -> None:
    """Rename the complete `staging` to `output`, atomically and without clobbering another writer.

    `os.rename` of a directory fails onto a non-empty directory, so it is the check: no window lies
    between a test and the act. With `overwrite`, an existing output is first moved aside (itself an
    atomic rename) and deleted only once the new one is in place; if another writer lands in
    between, its output is kept and the old one is moved back, or left at its hidden name and
    reported if that is not possible.

    The renames are `os.rename`, not epath's: epath tests for the destination first and refuses an
    empty directory, which `os.rename` replaces (an empty output directory is allowed, see
    `paths.check_output`), and its test is the window this protocol has none of.
    """
    output_dir = os.fspath(output)
    aside = None
    if overwrite and os.path.lexists(output_dir):
        aside = os.fspath(_hidden_name(output, "old"))
        try:
            os.rename(output_dir, aside)
        except FileNotFoundError:  # someone else removed it meanwhile: nothing to move aside
            aside = None
    try:
        os.rename(os.fspath(staging), output_dir)
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
        _remove_tree(epath.Path(aside))


def _damaged(directory: str, what: str, reason: str) -> ValueError:
    reason = " ".join(reason.split())
    if len(reason) > 300:
        reason = reason[:300] + "…"
    return ValueError(
        f"model directory {directory!r}: {what} ({reason}); re-convert the model, or restore the directory from a copy"
    )


def read_model_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a model directory; one-line errors naming the file if it is damaged."""
    directory = os.fspath(directory)
    path = epath.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory!r} is not a clip_jax model directory: no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise _damaged(
            directory, f"{CONFIG_FILE} is not valid JSON", f"{error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except UnicodeDecodeError as error:
        raise _damaged(directory, f"{CONFIG_FILE} is not UTF-8 text", str(error)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{os.fspath(path)!r} is not a clip_jax model config (format {found!r}, expected {FORMAT!r})")
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
    directory: str | os.PathLike, sharding: jax.sharding.Sharding | None = None, **overrides: Any
) -> tuple[CLIPConfig, dict[str, Any]]:
    """(model_config, variables) of a model directory, restored onto `sharding` (default: the first local device).

    `overrides` replace model-config fields that do not change the parameters' meaning (dtype, scan_layers, …).
    """
    directory = os.fspath(directory)
    data = read_model_config(directory)
    try:  # a model config that parses may still fail to build (a string where a size belongs): both are damage
        stored = CLIPConfig.from_dict(data["model"]).validate()
        abstract = jax.eval_shape(lambda: nn.unbox(CLIP(stored).init_variables(jax.random.key(0))))
    except (TypeError, ValueError, KeyError) as error:
        first_line = (str(error).splitlines() or [""])[0]
        reason = f"{type(error).__name__}: {first_line}"
        raise _damaged(directory, f"{CONFIG_FILE} holds an invalid model config", reason) from None
    config = stored.replace(**overrides) if overrides else stored
    sharding = sharding or _single_device_sharding()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    variables_dir = paths.absolute(directory) / VARIABLES_DIR  # Orbax takes absolute paths only
    if not variables_dir.is_dir():
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


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer stored in a model directory; one that cannot be loaded is one ValueError
    naming the directory."""
    directory = os.fspath(directory)
    data = read_model_config(directory)
    try:
        return tokenizers.tokenizer_from_config(data["tokenizer"], directory)
    except (OSError, ValueError) as error:
        raise _damaged(directory, "its tokenizer could not be loaded", str(error)) from None
