"""Embedding images and texts for evaluation: an `Encoder` that runs a CLIP's towers over a mesh of
every available device in fixed-size batches, and streaming feature extraction over datasets.

Only the embeddings (n, embed_dim) are kept; images pass through one batch at a time.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import sharding
from clip_jax.models import CLIP

# preprocess_images lives with the transforms (clip_jax.captioning needs it without this package);
# it stays importable from here, where evaluation code has always found it.
from clip_jax.transforms import preprocess_images

DEFAULT_BATCH_SIZE = 256


@functools.partial(jax.jit, static_argnames=("model",))
def embed_images(model: CLIP, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    return model.apply(variables, images, normalize=True, method=model.encode_image)


@functools.partial(jax.jit, static_argnames=("model",))
def embed_texts(model: CLIP, variables: dict[str, Any], texts: jax.Array) -> jax.Array:
    return model.apply(variables, texts, normalize=True, method=model.encode_text)


def default_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The training mesh's axes with every device on the data axis: pure data parallelism."""
    return sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}, devices)


def _place_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Every leaf on `mesh`: leaves already laid out over the mesh's devices (e.g. the sharded
    parameters of a training state) stay as they are; everything else is replicated."""
    replicated = NamedSharding(mesh, P())
    mesh_devices = set(mesh.devices.flat)

    def place(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and set(leaf.sharding.device_set) == mesh_devices:
            return leaf
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(
                f"a variable is laid out over {len(leaf.sharding.device_set)} devices that are not the "
                f"mesh's {len(mesh_devices)}; pass the mesh it was created on"
            )
        return jax.device_put(np.asarray(leaf), replicated)

    return jax.tree.map(place, tree)


class Encoder:
    """L2-normalised float32 embeddings of a CLIP, computed in batches split over a device mesh.

    `variables` = {"params": ...[, "batch_stats": ...]} (unboxed). `mesh` defaults to every device
    on the data axis; a training mesh may be passed with the training state's variables (they are
    used where they lie). Inputs are numpy arrays that every process holds whole; outputs are numpy
    arrays on every process. Each call pads to `batch_size` rows so the towers compile once.
    """

    def __init__(
        self,
        model: CLIP,
        variables: dict[str, Any],
        mesh: Mesh | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if not isinstance(model, CLIP):
            raise TypeError(f"model must be a clip_jax CLIP, got {type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.mesh = mesh if mesh is not None else default_mesh()
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        shards = sharding.batch_axis_size(self.mesh)
        # Every batch shard must get the same number of rows.
        self.batch_size = int(math.ceil(batch_size / shards) * shards)
        self.variables = _place_on_mesh(dict(variables), self.mesh)

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.model.config.text.context_length

    @property
    def embed_dim(self) -> int:
        return self.model.config.embed_dim

    @property
    def local_batch_size(self) -> int:
        """Rows each process contributes per batch when the data is split across processes."""
        return self.batch_size // jax.process_count()

    def encode_images(self, images: np.ndarray, process_local: bool = False) -> np.ndarray:
        """float32 (n, size, size, 3) normalised images -> (n, embed_dim) unit-norm float32.

        `process_local`: each process passes its own rows (the same number on every process) and
        gets every process's embeddings back, in process order."""
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected preprocessed images (n, {', '.join(map(str, expected))}), got {images.shape}")
        if not np.issubdtype(images.dtype, np.floating):
            raise TypeError(f"expected preprocessed float images, got dtype {images.dtype}; see preprocess_images")
        return self._run(embed_images, images.astype(np.float32), process_local)

    def encode_texts(self, texts: np.ndarray, process_local: bool = False) -> np.ndarray:
        """int32 (n, context_length) token ids -> (n, embed_dim) unit-norm float32."""
        texts = np.asarray(texts)
        if texts.ndim != 2 or texts.shape[1] != self.context_length:
            raise ValueError(f"expected token ids (n, {self.context_length}), got {texts.shape}")
        if not np.issubdtype(texts.dtype, np.integer):
            raise TypeError(f"expected integer token ids, got dtype {texts.dtype}")
        return self._run(embed_texts, texts.astype(np.int32), process_local)

    def _run(self, embed: Callable, inputs: np.ndarray, process_local: bool) -> np.ndarray:
        chunk_size = self.local_batch_size if process_local else self.batch_size
        outputs = []
        for start in range(0, len(inputs), chunk_size):
            chunk = inputs[start : start + chunk_size]
            rows = len(chunk)
            if rows < chunk_size:
                chunk = np.concatenate([chunk, np.zeros((chunk_size - rows, *chunk.shape[1:]), chunk.dtype)])
            if process_local:
                global_chunk = jax.make_array_from_process_local_data(self.batch_sharding, chunk)
                local = local_rows(embed(self.model, self.variables, global_chunk))[:rows]
                outputs.append(gather_from_processes(local))
            else:
                # Each process supplies the rows of its own devices from the whole chunk it holds.
                global_chunk = jax.make_array_from_callback(
                    chunk.shape, self.batch_sharding, lambda index, chunk=chunk: chunk[index]
                )
                outputs.append(_to_host(embed(self.model, self.variables, global_chunk))[:rows])
        if not outputs:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(outputs)


def _to_host(array: jax.Array) -> np.ndarray:
    """A global array, whole, on every process."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in their global order (replicas once)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def gather_from_processes(local: np.ndarray) -> np.ndarray:
    """Every process's `local` rows concatenated in process order (the same count on each)."""
    if jax.process_count() == 1:
        return np.asarray(local)
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


# ------------------------------------------------------------------------------------------------
# Streaming over datasets.
# ------------------------------------------------------------------------------------------------


def rebatch(
    batches: Iterable[dict[str, Any]], batch_size: int, keys: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[dict[str, Any]]:
    """Batches of exactly `batch_size` rows (the last one shorter) from batches of any size, so
    the towers see one shape; only `keys` (required) and `optional` keys (kept when every batch
    has them) are passed on."""
    pending: dict[str, list[Any]] = {}
    pending_rows = 0
    kept_keys: list[str] | None = None
    for batch in batches:
        missing = [key for key in keys if key not in batch]
        if missing:
            raise KeyError(f"a batch lacks {missing}; it has {sorted(batch)}")
        batch_keys = list(keys) + [key for key in optional if batch.get(key) is not None]
        if kept_keys is None:
            kept_keys = batch_keys
            pending = {key: [] for key in kept_keys}
        elif batch_keys != kept_keys:
            raise KeyError(f"batches disagree on their keys: {kept_keys} then {batch_keys}")
        for key in kept_keys:
            pending[key].append(batch[key])
        pending_rows += len(batch[keys[0]])
        while pending_rows >= batch_size:
            merged = {key: _concatenate(pending[key]) for key in kept_keys}
            yield {key: value[:batch_size] for key, value in merged.items()}
            pending = {key: [value[batch_size:]] for key, value in merged.items()}
            pending_rows -= batch_size
    if pending_rows:
        yield {key: _concatenate(pending[key]) for key in kept_keys}


def _concatenate(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [item for part in parts for item in part]


def extract_image_features(
    encoder: Encoder,
    batches: Iterable[dict[str, Any]],
    preprocess: Callable | None = None,
    image_key: str = "images",
    label_key: str | None = "labels",
    max_examples: int | None = None,
    process_local: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(features float32 (n, embed_dim), labels (n,) or None) of a stream of batches.

    Each batch is a dict with `image_key` (uint8 or float arrays, or a list of PIL images/paths,
    see `preprocess_images`), integer labels unless `label_key` is None, and optionally a boolean
    "mask" (rows where it is False, e.g. padding, are dropped). At most `max_examples` are kept.
    `process_local`: each process streams its own share (as `ClassificationDataset.batches` with
    the process index gives, `encoder.local_batch_size` rows per batch); every process gets all.
    """
    keys = [image_key] + ([label_key] if label_key else [])
    features, labels = [], []
    kept = 0
    stream = batches if process_local else rebatch(batches, encoder.batch_size, keys, optional=("mask",))
    for batch in stream:
        images = preprocess_images(batch[image_key], encoder.image_size, preprocess)
        mask = np.ones(len(images), bool) if batch.get("mask") is None else np.asarray(batch["mask"], bool)
        batch_labels = np.asarray(batch[label_key]) if label_key else None
        embeddings = encoder.encode_images(images, process_local=process_local)
        if process_local:
            mask = gather_from_processes(mask)
            batch_labels = gather_from_processes(batch_labels) if label_key else None
        rows = np.flatnonzero(mask)
        if max_examples is not None:
            rows = rows[: max_examples - kept]
        features.append(embeddings[rows])
        if label_key:
            labels.append(batch_labels[rows])
        kept += len(rows)
        if max_examples is not None and kept >= max_examples:
            break
    if kept == 0:
        raise ValueError("the dataset yielded no examples")
    return np.concatenate(features), (np.concatenate(labels).astype(np.int64) if label_key else None)


def encode_prompts(encoder: Encoder, tokenizer: Callable, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm embeddings (n, embed_dim) of texts; over-long texts are truncated to the context."""
    if len(texts) == 0:
        return np.zeros((0, encoder.embed_dim), np.float32)
    tokens = _tokenize(tokenizer, list(texts))
    return encoder.encode_texts(tokens)


def _tokenize(tokenizer: Callable, texts: list[str]) -> np.ndarray:
    # clip_jax's tokenizers raise on over-long texts unless told to truncate; other tokenizers
    # (open_clip's) truncate by themselves and have no such option.
    if "truncate" in inspect.signature(tokenizer).parameters:
        return np.asarray(tokenizer(texts, truncate=True))
    return np.asarray(tokenizer(texts))
