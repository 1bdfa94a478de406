"""Helpers shared by the data tests: draw batches from an iterator and compare two runs of batches."""

from __future__ import annotations

import numpy as np


def take(iterator, count):
    """The next `count` batches of `iterator`."""
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    """Two lists of batches are bit-identical: images byte for byte, token ids exactly."""
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert one["images"].tobytes() == other["images"].tobytes()
        np.testing.assert_array_equal(one["texts"], other["texts"])
