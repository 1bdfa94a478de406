"""Naming the leaves of a variable tree ("visual/transformer/block_0/attn/query/kernel"), and the
check that loaded weights are finite."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np


def parameter_path(key_path: tuple[Any, ...]) -> str:
    """ "/"-joined names of a key path from `jax.tree_util.tree_map_with_path`, e.g.
    "visual/transformer/block_0/attn/query/kernel"."""
    names = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            names.append(str(key))
    return "/".join(names)


def nonfinite_paths(tree: Any, flags: np.ndarray) -> list[str]:
    """The "/"-joined paths of the leaves of `tree` whose flag (one bool per leaf, True where the
    leaf is free of NaN and inf) is False."""
    paths = [parameter_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return [path for path, finite in zip(paths, np.asarray(flags)) if not finite]


def warn_if_not_finite(path: str, variables: dict[str, Any], stacklevel: int = 2) -> None:
    """One RuntimeWarning if an array of `variables` holds NaN or inf: such weights load, but the
    outputs they touch are NaN (a diverged run's checkpoint, a broken conversion). `stacklevel`
    as `warnings.warn`'s, counted from the caller of this function."""
    # Reduced where the arrays live: only one bool per array comes to the host.
    flags = np.array(jax.device_get([jax.numpy.isfinite(leaf).all() for leaf in jax.tree.leaves(variables)]))
    if flags.all():
        return
    paths = nonfinite_paths(variables, flags)
    warnings.warn(
        f"{path}: {len(paths)} of {flags.size} arrays hold non-finite values (NaN or inf), first {paths[0]}; "
        "the model's outputs will not be finite",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
