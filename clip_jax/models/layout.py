"""The two layouts of a tower's residual blocks in a flattened variable tree, and the moves between them.

`models.layers.Transformer` names its blocks `block_0`, `block_1`, ... when unrolled, and keeps one
`blocks` entry whose leaves carry the layers on axis 0 when scanned (`nn.scan`). Checkpoints are
stored in either layout; these functions convert a flattened tree (`flax.traverse_util.flatten_dict`,
tuple keys) from one to the other so a model can be loaded with `scan_layers` set either way.
"""

from __future__ import annotations

import numpy as np

FlatVariables = dict[tuple[str, ...], np.ndarray]

UNROLLED_PREFIX = "block_"  # the unrolled blocks' names: block_0, block_1, ...
SCANNED_NAME = "blocks"  # the scanned blocks' single name


def stack_layers(flat: FlatVariables) -> FlatVariables:
    """Unrolled `block_{i}` leaves -> one `blocks` leaf per parameter, layers on axis 0 (nn.scan layout)."""
    out: FlatVariables = {}
    groups: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for path, value in flat.items():
        block = next((i for i, part in enumerate(path) if part.startswith(UNROLLED_PREFIX)), None)
        if block is None:
            out[path] = value
            continue
        key = (*path[:block], SCANNED_NAME, *path[block + 1 :])
        groups.setdefault(key, {})[int(path[block][len(UNROLLED_PREFIX) :])] = value
    for key, by_layer in groups.items():
        out[key] = np.stack([by_layer[i] for i in range(len(by_layer))])
    return out


def unstack_layers(flat: FlatVariables) -> FlatVariables:
    """One `blocks` leaf per parameter (layers on axis 0) -> unrolled `block_{i}` leaves; the inverse of
    `stack_layers`."""
    out: FlatVariables = {}
    for path, value in flat.items():
        if SCANNED_NAME not in path:
            out[path] = value
            continue
        at = path.index(SCANNED_NAME)
        for i in range(value.shape[0]):
            out[(*path[:at], f"{UNROLLED_PREFIX}{i}", *path[at + 1 :])] = value[i]
    return out
