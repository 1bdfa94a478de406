"""Batch rows across the devices of mesh axes, from inside `jax.shard_map`: gathered in the mesh's
row-major order (`gather`), or passed around the devices as a ring, one block per step
(`ring_pass`). The sharded losses (clip_jax.losses) are built on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def gather(local_rows: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """(local_batch, dim) on each device -> (global_batch, dim), in the mesh's row-major order.

    Under autodiff its transpose is a reduce-scatter: the gradient a device gets for its own rows
    sums what every device's logits contributed to them, which keeps the gradients exact.
    """
    return jax.lax.all_gather(local_rows, axes, tiled=True)


def shift(tree: Any, axes: tuple[str, ...]) -> Any:
    """Send every array one device down the ring: device j -> j - 1, so each device receives the
    block of the device after it."""
    num_devices = jax.lax.axis_size(axes)
    permutation = [(source, (source - 1) % num_devices) for source in range(num_devices)]
    return jax.tree.map(lambda array: jax.lax.ppermute(array, axes, permutation), tree)


def ring_pass(
    step: Callable[[Any, Any, Any, bool], tuple[Any, Any]],
    resident: Any,
    visitor: Any,
    accumulator: Any,
    axes: tuple[str, ...],
) -> tuple[Any, Any]:
    """Run `step(resident, visitor, accumulator, is_diagonal) -> (resident, accumulator)` once
    per block of the ring.

    `resident` stays on the device (its own rows' statistics or gradients); `visitor` is read-only
    data that travels (a text block and its fixed statistics); `accumulator` travels with the
    visitor and is updated by every device it visits. Returns the final resident and the
    accumulator of this device's own block, back home.
    """
    num_devices = jax.lax.axis_size(axes)
    # The diagonal block is peeled off the loop: it alone holds the positive pairs, so the other
    # blocks need no mask. The next visitor is sent before the current block is computed (it
    # does not depend on it) so that the transfer can overlap the matmuls.
    next_visitor = shift(visitor, axes)
    resident, accumulator = step(resident, visitor, accumulator, True)
    accumulator = shift(accumulator, axes)

    def off_diagonal_step(_, carry):
        resident, visitor, accumulator = carry
        next_visitor = shift(visitor, axes)
        resident, accumulator = step(resident, visitor, accumulator, False)
        return resident, next_visitor, shift(accumulator, axes)

    # After num_devices shifts each accumulator is home again. (The visitor is shifted once more
    # than needed: one extra block transfer per pass, the price of the overlap.)
    resident, _, accumulator = jax.lax.fori_loop(
        1, num_devices, off_diagonal_step, (resident, next_visitor, accumulator)
    )
    return resident, accumulator
