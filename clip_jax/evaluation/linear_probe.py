"""Linear probes on frozen features, the CLIP paper's protocol: L2-regularised multinomial logistic
regression fitted by L-BFGS (optax, in JAX), the regularisation chosen on a validation split; and
k-shot probes (k examples per class, several seeds, sampling reproducible by seed)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import sharding
from clip_jax.evaluation.features import default_mesh
from clip_jax.evaluation.zero_shot import classification_metrics

# L2 strengths tried first, one per decade; the best is then refined half a decade either side.
DEFAULT_L2_GRID: tuple[float, ...] = tuple(float(10.0**exponent) for exponent in range(-6, 3))
DEFAULT_SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
# With one example per class there is nothing to validate on; this strength is used instead.
ONE_SHOT_L2 = 1e-2
MAX_ITERATIONS = 1000
GRADIENT_TOLERANCE = 1e-5
# float32 resolves relative changes of about 1e-7; smaller decreases are rounding, not progress.
LOSS_TOLERANCE = 1e-7
# Probes with fewer rows than this per device run on one device: for them, splitting the rows
# costs more in collectives (several per L-BFGS iteration) than it saves.
MIN_ROWS_PER_DEVICE = 2048


def _loss(params: dict[str, jax.Array], features, one_hot, weights, l2) -> jax.Array:
    """Weighted mean cross-entropy plus l2 / 2 * |W|^2 (the bias is not penalised)."""
    logits = features @ params["weights"] + params["bias"]  # (n, classes)
    per_example = -jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(weights * per_example) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(params["weights"] ** 2)


def _solve(features, one_hot, weights, l2, initial, max_iterations: int, tolerance: float):
    """L-BFGS (optax, zoom line search) from `initial` until the gradient norm is below `tolerance`
    or an iteration lowers the loss by less than LOSS_TOLERANCE relatively (as scipy's `ftol`:
    on separable data the loss creeps towards 0 without the gradient ever becoming small)."""
    loss = functools.partial(_loss, features=features, one_hot=one_hot, weights=weights, l2=l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        params, state, _, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        # `value` is the loss before this update; the state holds the loss after it.
        return optax.apply_updates(params, updates), state, value, optax.tree.get(state, "value")

    def keep_going(carry):
        _, state, previous, current = carry
        count = optax.tree.get(state, "count")
        gradient_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        stalled = previous - current <= LOSS_TOLERANCE * jnp.maximum(
            jnp.maximum(jnp.abs(previous), jnp.abs(current)), 1.0
        )
        return (count == 0) | ((count < max_iterations) & (gradient_norm >= tolerance) & ~stalled)

    infinity = jnp.asarray(jnp.inf, jnp.float32)
    params, _, _, _ = jax.lax.while_loop(keep_going, step, (initial, solver.init(initial), infinity, infinity))
    return params


# One compile per (rows, features, classes) shape; the strength and the starting point are traced.
_solve_jit = jax.jit(_solve, static_argnames=("max_iterations", "tolerance"))

# Rows are padded (with zero weight) to a power of two of at least this many, so that the many
# small probes of a few-shot sweep share one compiled solver.
MIN_ROWS = 512


def _padded_rows(rows: int, multiple: int) -> int:
    size = max(MIN_ROWS, 1 << max(0, math.ceil(math.log2(max(rows, 1)))))
    return int(math.ceil(size / multiple) * multiple)


def fit_logistic_regression(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2: float | Sequence[float],
    *,
    mesh: Mesh | None = None,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = GRADIENT_TOLERANCE,
) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """Multinomial logistic regression by L-BFGS: {"weights": (D, C), "bias": (C,)}, or a list of
    them when `l2` is a sequence (fitted from the strongest strength to the weakest, each started
    from the previous solution). The rows are split over the mesh's batch axes; padding rows carry
    zero weight."""
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"expected features (n, D) and labels (n,), got {features.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no training examples")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels range over [{labels.min()}, {labels.max()}], outside {num_classes} classes")
    strengths = [float(value) for value in np.atleast_1d(np.asarray(l2, np.float64))]
    if any(value < 0 for value in strengths):
        raise ValueError(f"L2 strengths must be >= 0, got {strengths}")
    mesh = mesh or default_mesh()
    if len(features) < MIN_ROWS_PER_DEVICE * sharding.batch_axis_size(mesh):
        mesh = default_mesh(mesh.devices.flat[:1])
    rows = _padded_rows(len(features), sharding.batch_axis_size(mesh))
    padding = rows - len(features)
    by_rows = sharding.batch_sharding(mesh)
    everywhere = NamedSharding(mesh, P())
    data = [
        np.concatenate([features, np.zeros((padding, features.shape[1]), np.float32)]),
        np.concatenate([np.eye(num_classes, dtype=np.float32)[labels], np.zeros((padding, num_classes), np.float32)]),
        np.concatenate([np.ones(len(features), np.float32), np.zeros(padding, np.float32)]),
    ]
    data = [jax.device_put(array, by_rows) for array in data]
    params = jax.device_put(
        {
            "weights": np.zeros((features.shape[1], num_classes), np.float32),
            "bias": np.zeros((num_classes,), np.float32),
        },
        everywhere,
    )
    solutions: dict[float, dict[str, np.ndarray]] = {}
    for strength in sorted(set(strengths), reverse=True):
        params = _solve_jit(*data, np.float32(strength), params, max_iterations, float(tolerance))
        solutions[strength] = {name: np.asarray(value) for name, value in params.items()}
    if np.isscalar(l2):
        return solutions[strengths[0]]
    return [solutions[value] for value in strengths]


def predict_logits(params: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Class scores (n, C) of a fitted probe (without the leading strength axis)."""
    return np.asarray(features, np.float32) @ params["weights"] + params["bias"]


def _accuracy(params: dict[str, np.ndarray], features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(predict_logits(params, features), axis=1) == labels))


def split_train_validation(labels: np.ndarray, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), stratified: each class with >= 2 examples gives
    round(fraction * count) of them (at least one, never all) to validation, chosen by `seed`."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        take = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(validation_fraction * len(members))))
        validation.extend(members[:take])
        train.extend(members[take:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(validation, np.int64))


def select_l2(
    folds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    mesh: Mesh | None = None,
    refine: bool = True,
) -> tuple[float, list[dict[str, float]]]:
    """The L2 strength of best mean validation accuracy over `folds` ((train x, train y, val x,
    val y) each): the grid first, then half a decade either side of its best. Ties go to the
    stronger regularisation. Returns (best strength, every tried strength with its accuracy)."""
    tried: dict[float, float] = {}

    def evaluate(strengths: Sequence[float]) -> None:
        strengths = [float(s) for s in strengths if float(s) not in tried]
        if not strengths:
            return
        accuracies = np.zeros(len(strengths))
        for train_x, train_y, val_x, val_y in folds:
            fits = fit_logistic_regression(train_x, train_y, num_classes, strengths, mesh=mesh)
            accuracies += [_accuracy(params, val_x, val_y) for params in fits]
        tried.update(zip(strengths, (accuracies / len(folds)).tolist()))

    def best() -> float:
        # Highest accuracy; among equals, the largest strength.
        return max(tried, key=lambda strength: (tried[strength], strength))

    evaluate(l2_grid)
    if refine:
        center = best()
        evaluate([center * 10.0**-0.5, center * 10.0**0.5])
    sweep = [{"l2": strength, "validation_accuracy": tried[strength]} for strength in sorted(tried)]
    return best(), sweep


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int | None = None,
    *,
    validation_fraction: float = 0.2,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    seed: int = 0,
    class_subset: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """The paper's linear probe: the L2 strength chosen on a stratified validation split of the
    training features, then a probe on all of them scored on the test features (predicting among
    `class_subset` when given, as zero-shot does). Returns top-1 / top-5 / mean per-class recall,
    the chosen strength and the sweep."""
    train_labels = np.asarray(train_labels).astype(np.int64)
    test_labels = np.asarray(test_labels).astype(np.int64)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()) + 1)
    fit_rows, validation_rows = split_train_validation(train_labels, validation_fraction, seed)
    if len(validation_rows) == 0:
        raise ValueError("no class has two training examples: nothing to validate the regularisation on")
    train_features = np.asarray(train_features, np.float32)
    fold = (
        train_features[fit_rows],
        train_labels[fit_rows],
        train_features[validation_rows],
        train_labels[validation_rows],
    )
    l2, sweep = select_l2([fold], num_classes, l2_grid, mesh)
    params = fit_logistic_regression(train_features, train_labels, num_classes, l2, mesh=mesh)
    results: dict[str, Any] = classification_metrics(predict_logits(params, test_features), test_labels, class_subset)
    results.update(l2=l2, sweep=sweep, num_train=int(len(train_labels)))
    return results


def sample_few_shot(labels: np.ndarray, shots: int, seed: int, classes: Sequence[int] | None = None) -> np.ndarray:
    """Indices (sorted) of `shots` examples of each class, drawn by `seed` alone: the same seed gives
    the same examples, and for one seed the k-shot sample contains every smaller one's."""
    labels = np.asarray(labels)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    classes = np.unique(labels) if classes is None else np.asarray(sorted(set(classes)))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise ValueError(f"class {int(label)} has {len(members)} examples, fewer than {shots} shots")
        # A full permutation per class, drawn whatever `shots` is, keeps the samples nested.
        chosen.extend(rng.permutation(members)[:shots])
    return np.sort(np.asarray(chosen, np.int64))


def _two_folds(labels: np.ndarray, indices: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The k shots of each class split into two halves (for choosing the strength by 2-fold CV)."""
    rng = np.random.default_rng([seed, 1])
    first, second = [], []
    for label in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == label])
        half = len(members) // 2
        first.extend(members[:half])
        second.extend(members[half:])
    return np.asarray(first, np.int64), np.asarray(second, np.int64)


def few_shot(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int | None = None,
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    class_subset: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """k-shot linear probes: for each k and seed, k training examples per class (sample_few_shot),
    the L2 strength chosen by 2-fold cross-validation over those shots (k = 1: ONE_SHOT_L2), scored
    on the test set (among `class_subset` when given). Returns {"shots": {k: {"top1_mean",
    "top1_std", "mean_per_class_recall_mean", "per_seed": [...]}}}."""
    train_labels = np.asarray(train_labels).astype(np.int64)
    test_labels = np.asarray(test_labels).astype(np.int64)
    train_features = np.asarray(train_features, np.float32)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()) + 1)
    results: dict[str, Any] = {"shots": {}}
    for k in shots:
        per_seed = []
        for seed in seeds:
            chosen = sample_few_shot(train_labels, k, seed)
            if k == 1:
                l2 = ONE_SHOT_L2
            else:
                first, second = _two_folds(train_labels, chosen, seed)
                folds = [
                    (train_features[a], train_labels[a], train_features[b], train_labels[b])
                    for a, b in ((first, second), (second, first))
                ]
                l2, _ = select_l2(folds, num_classes, l2_grid, mesh)
            params = fit_logistic_regression(train_features[chosen], train_labels[chosen], num_classes, l2, mesh=mesh)
            metrics = classification_metrics(predict_logits(params, test_features), test_labels, class_subset)
            per_seed.append({"seed": int(seed), "l2": float(l2), **metrics})
        top1 = np.asarray([run["top1"] for run in per_seed])
        results["shots"][int(k)] = {
            "top1_mean": float(top1.mean()),
            "top1_std": float(top1.std()),
            "mean_per_class_recall_mean": float(np.mean([run["mean_per_class_recall"] for run in per_seed])),
            "per_seed": per_seed,
        }
    return results
