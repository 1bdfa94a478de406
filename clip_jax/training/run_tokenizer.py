"""A run's tokenizer: built once at the start of a new run (a SentencePiece model trained on the
training captions, or OpenAI's BPE) and saved in the workdir, then restored from the workdir by
every resumed run so that it tokenizes exactly as before. Workdirs may be remote (gs://): files
go through etils `epath`, and a tokenizer that needs a local file gets a scratch copy."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
from etils import epath

from clip_jax import paths
from clip_jax import tokenizer as tokenizers
from clip_jax.io.training_workdir import scratch_directory
from clip_jax.training.config import TokenizerSettings
from clip_jax.training.multihost import broadcast_bytes

SENTENCEPIECE_FILE = "tokenizer.model"


def _write_atomically(path: epath.Path, data: bytes) -> None:
    """A reader never sees half a file: written beside it, then renamed (a plain write on object
    stores, where an object appears whole anyway)."""
    if not paths.is_local(os.fspath(path)):
        path.write_bytes(data)
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)  # atomic, and replaces (epath's rename refuses an existing file)


def build_tokenizer(settings: TokenizerSettings, caption_sample: Callable[[int], list[str]], workdir: str) -> Any:
    """A fresh tokenizer for a new run, its files written into `workdir` (by process 0).

    "sentencepiece": trained by process 0 on the first `training_captions` training captions and
    sent to the other processes (no shared filesystem needed); "clip": OpenAI's BPE (its file is
    copied into the workdir).
    """
    directory = epath.Path(workdir)
    if settings.kind == "clip":
        tokenizer = tokenizers.ClipTokenizer(context_length=settings.context_length)
        if jax.process_index() == 0:
            for asset in tokenizer.asset_files():
                _write_atomically(directory / os.path.basename(asset), epath.Path(asset).read_bytes())
        return tokenizer
    model_bytes = None
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory(prefix="clip_jax-") as scratch:
            path = tokenizers.train_sentencepiece(
                caption_sample(settings.training_captions),
                settings.vocab_size,
                os.path.join(scratch, SENTENCEPIECE_FILE),
                model_type=settings.model_type,
                hard_vocab_limit=False,  # a small caption vocabulary may need fewer pieces
            )
            model_bytes = epath.Path(path).read_bytes()
    model_bytes = broadcast_bytes(model_bytes)
    if jax.process_index() == 0:
        _write_atomically(directory / SENTENCEPIECE_FILE, model_bytes)
    if jax.process_index() == 0 and paths.is_local(workdir):
        # Load the run's own copy: no scratch file to outlive a killed process.
        local_path = os.path.join(workdir, SENTENCEPIECE_FILE)
    else:
        local_path = os.path.join(scratch_directory(), SENTENCEPIECE_FILE)
        epath.Path(local_path).write_bytes(model_bytes)
    return tokenizers.SentencePieceTokenizer(local_path, context_length=settings.context_length)


def tokenizer_files_digest(tokenizer_record: dict[str, Any], workdir: str) -> dict[str, str]:
    """{file name: SHA-256} of the files of a run's tokenizer in `workdir` (its `*_file` entries,
    e.g. tokenizer.model), saved with every checkpoint so that a resume can tell that a file was
    replaced between runs (clip_jax.training.resume)."""
    digests = {}
    for key, name in sorted(tokenizer_record.items()):
        if key.endswith("_file"):
            digests[name] = hashlib.sha256((epath.Path(workdir) / name).read_bytes()).hexdigest()
    return digests
