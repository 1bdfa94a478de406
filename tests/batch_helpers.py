"""Helpers shared by the data tests: draw batches from an iterator, compare two runs of batches, and
make the iterator training reads the built-in dataset through."""

from __future__ import annotations

import numpy as np

from clip_jax.data import iterator as data_iterator
from clip_jax.data.config import default_data_config


def take(iterator, count):
    """The next `count` batches of `iterator`."""
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    """Two lists of batches are bit-identical: images byte for byte, token ids exactly."""
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert one["images"].tobytes() == other["images"].tobytes()
        np.testing.assert_array_equal(one["texts"], other["texts"])


def synthetic_train_iterator(
    tokenizer, global_batch_size, process_index=0, process_count=1, *, image_size=32, start_state=None
):
    """The iterator `train.py` reads the default dataset through (data.name="synthetic", seed 0, 16
    held out), made as training/setup.py makes it: the source first, then the iterator over it."""
    config = default_data_config()
    config.num_workers = 2
    layout = {"image_size": image_size, "global_batch_size": global_batch_size}
    source = data_iterator.make_train_source(config, process_index, process_count, **layout)
    return data_iterator.make_train_iterator(
        config, tokenizer, global_batch_size, image_size, process_index, process_count,
        start_state=start_state, source=source,
    )  # fmt: skip
