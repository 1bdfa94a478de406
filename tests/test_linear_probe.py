"""Linear probes: L-BFGS logistic regression reaches the optimum and recovers a separable problem,
the regularisation sweep, few-shot sampling reproducible by seed, rows sharded over 8 devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.evaluation import linear_probe
from clip_jax.evaluation.linear_probe import (
    few_shot,
    fit_logistic_regression,
    predict_logits,
    sample_few_shot,
    split_train_validation,
)

NUM_CLASSES, DIMENSION = 6, 12


def _separable(count: int, seed: int, margin: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors labelled by the best of 6 fixed directions, kept only where the best beats the
    runner-up by `margin`: linearly separable by construction."""
    directions = np.random.default_rng(1234).normal(size=(DIMENSION, NUM_CLASSES))
    rng = np.random.default_rng(seed)
    kept_features, kept_labels = [], []
    while sum(len(f) for f in kept_features) < count:
        x = rng.normal(size=(4 * count, DIMENSION))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        scores = np.sort(x @ directions, axis=1)
        keep = scores[:, -1] - scores[:, -2] > margin
        kept_features.append(x[keep])
        kept_labels.append(np.argmax(x[keep] @ directions, axis=1))
    return np.concatenate(kept_features)[:count].astype(np.float32), np.concatenate(kept_labels)[:count]


def _objective_gradient_norm(params, features, labels, l2) -> float:
    """The gradient of mean cross-entropy + l2/2 |W|^2, written out here independently."""

    def objective(p):
        logits = features @ p["weights"] + p["bias"]
        log_probabilities = jax.nn.log_softmax(logits)
        return -jnp.mean(log_probabilities[jnp.arange(len(labels)), labels]) + 0.5 * l2 * jnp.sum(p["weights"] ** 2)

    gradient = jax.grad(objective)({name: jnp.asarray(value) for name, value in params.items()})
    return float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(gradient))))


def test_fit_reaches_the_regularised_optimum():
    features, labels = _separable(300, seed=0, margin=0.0)
    for l2 in (1e-1, 1e-3):
        params = fit_logistic_regression(features, labels, NUM_CLASSES, l2)
        assert params["weights"].shape == (DIMENSION, NUM_CLASSES) and params["bias"].shape == (NUM_CLASSES,)
        # Strongly convex: a (near-)zero gradient means the unique optimum.
        assert _objective_gradient_norm(params, features, labels, l2) < 1e-3


def test_several_strengths_at_once_equal_one_at_a_time():
    features, labels = _separable(200, seed=1, margin=0.0)
    together = fit_logistic_regression(features, labels, NUM_CLASSES, [1e-1, 1e-2])
    for l2, params in zip((1e-1, 1e-2), together):
        alone = fit_logistic_regression(features, labels, NUM_CLASSES, l2)
        np.testing.assert_allclose(params["weights"], alone["weights"], atol=2e-3)


def test_rows_split_over_eight_devices_give_the_same_probe(monkeypatch):
    features, labels = _separable(200, seed=2, margin=0.0)
    single = fit_logistic_regression(features, labels, NUM_CLASSES, 1e-2)
    monkeypatch.setattr(linear_probe, "MIN_ROWS_PER_DEVICE", 0)  # split even this small problem
    assert jax.device_count() == 8
    sharded = fit_logistic_regression(features, labels, NUM_CLASSES, 1e-2)
    np.testing.assert_allclose(sharded["weights"], single["weights"], atol=1e-3)
    np.testing.assert_allclose(sharded["bias"], single["bias"], atol=1e-3)


def test_linear_probe_recovers_a_separable_problem():
    train_x, train_y = _separable(400, seed=3)
    test_x, test_y = _separable(300, seed=4)
    # A chance-level baseline first, so the check below can fail: random labels are not learnable.
    shuffled = np.random.default_rng(0).permutation(train_y)
    chance = linear_probe.linear_probe(train_x, shuffled, test_x, test_y, NUM_CLASSES)
    assert chance["top1"] < 0.5
    results = linear_probe.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES)
    assert results["top1"] >= 0.99 and results["mean_per_class_recall"] >= 0.99
    assert results["l2"] in [entry["l2"] for entry in results["sweep"]]
    assert len(results["sweep"]) >= len(linear_probe.DEFAULT_L2_GRID)
    assert results["num_train"] == 400 and results["num_examples"] == 300


def test_strength_ties_go_to_the_stronger_regularisation():
    # Each class is its own coordinate: any of these strengths classifies perfectly.
    rng = np.random.default_rng(5)
    train_y, val_y = rng.integers(0, NUM_CLASSES, 60), rng.integers(0, NUM_CLASSES, 30)
    train_x, val_x = (np.eye(NUM_CLASSES, dtype=np.float32)[y] for y in (train_y, val_y))
    best, sweep = linear_probe.select_l2(
        [(train_x, train_y, val_x, val_y)], NUM_CLASSES, [1e-3, 1e-1, 1e-2], refine=False
    )
    accuracies = {entry["l2"]: entry["validation_accuracy"] for entry in sweep}
    assert accuracies == {1e-3: 1.0, 1e-2: 1.0, 1e-1: 1.0}
    assert best == 1e-1


def test_validation_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    train, validation = split_train_validation(labels, 0.2, seed=0)
    assert np.intersect1d(train, validation).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, validation])), np.arange(len(labels)))
    assert [int(np.sum(labels[validation] == c)) for c in range(4)] == [2, 1, 1, 0]  # a lone example stays in train
    again = split_train_validation(labels, 0.2, seed=0)
    assert np.array_equal(again[1], validation)
    assert not np.array_equal(split_train_validation(labels, 0.2, seed=1)[1], validation)


def test_few_shot_sampling_is_reproducible_by_seed_and_nested():
    labels = np.random.default_rng(0).integers(0, 5, 400)
    first = sample_few_shot(labels, 4, seed=7)
    assert np.array_equal(first, sample_few_shot(labels, 4, seed=7))
    assert not np.array_equal(first, sample_few_shot(labels, 4, seed=8))
    assert np.bincount(labels[first], minlength=5).tolist() == [4] * 5
    # One seed: the 2-shot sample is inside the 4-shot sample, which is inside the 8-shot one.
    assert set(sample_few_shot(labels, 2, seed=7)) <= set(first) <= set(sample_few_shot(labels, 8, seed=7))
    with pytest.raises(ValueError, match="fewer than 500 shots"):
        sample_few_shot(labels, 500, seed=0)


def test_few_shot_probes():
    train_x, train_y = _separable(300, seed=8, margin=0.2)
    test_x, test_y = _separable(200, seed=9, margin=0.2)
    results = few_shot(train_x, train_y, test_x, test_y, NUM_CLASSES, shots=(1, 4), seeds=(0, 1))
    assert sorted(results["shots"]) == [1, 4]
    for entry in results["shots"].values():
        assert [run["seed"] for run in entry["per_seed"]] == [0, 1]
        top1 = [run["top1"] for run in entry["per_seed"]]
        assert entry["top1_mean"] == pytest.approx(np.mean(top1))
        assert entry["top1_std"] == pytest.approx(np.std(top1))
    assert results["shots"][1]["per_seed"][0]["l2"] == linear_probe.ONE_SHOT_L2
    # Well above chance (1/6) from 4 examples per class of a separable problem.
    assert results["shots"][4]["top1_mean"] > 0.4
    again = few_shot(train_x, train_y, test_x, test_y, NUM_CLASSES, shots=(4,), seeds=(0,))
    assert again["shots"][4]["per_seed"][0] == results["shots"][4]["per_seed"][0]


def test_predict_logits_and_input_checks():
    params = {"weights": np.eye(3, dtype=np.float32), "bias": np.array([0.0, 0.0, 1.0], np.float32)}
    np.testing.assert_allclose(predict_logits(params, np.array([[2.0, 0.0, 0.0]])), [[2.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="outside 3 classes"):
        fit_logistic_regression(np.zeros((2, 3)), np.array([0, 3]), 3, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        fit_logistic_regression(np.zeros((2, 3)), np.array([0, 1]), 3, -1.0)
