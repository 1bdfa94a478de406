"""Retrieval recall@k against a brute-force ranking on known embeddings: ties, several captions per
image in shuffled order, row chunks split over 8 devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from clip_jax.evaluation.features import default_mesh
from clip_jax.evaluation.retrieval import retrieval_evaluate, retrieval_ranks


def _brute_force_rank(scores: list[float], correct: set[int]) -> int:
    """Position of the first correct item when sorting by score, highest first, with every wrong
    item placed before the correct ones it ties with (ties count against the query)."""
    order = sorted(range(len(scores)), key=lambda item: (-scores[item], item in correct))
    return next(position for position, item in enumerate(order) if item in correct)


def _brute_force(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, ks=(1, 5, 10)):
    image_ranks, text_ranks = [], []
    for i in range(len(images)):
        scores = [float(sum(a * b for a, b in zip(images[i], text))) for text in texts]
        image_ranks.append(_brute_force_rank(scores, {j for j in range(len(texts)) if text_to_image[j] == i}))
    for j in range(len(texts)):
        scores = [float(sum(a * b for a, b in zip(image, texts[j]))) for image in images]
        text_ranks.append(_brute_force_rank(scores, {int(text_to_image[j])}))
    recalls = {}
    for k in ks:
        recalls[f"image_to_text_R@{k}"] = np.mean(np.asarray(image_ranks) < k)
        recalls[f"text_to_image_R@{k}"] = np.mean(np.asarray(text_ranks) < k)
    return np.asarray(image_ranks), np.asarray(text_ranks), recalls


@pytest.fixture(scope="module")
def tied_problem():
    """Small-integer embeddings (dot products exact in float32, so ties are exact ties), 14 images
    with 1 to 5 captions each, captions in shuffled order."""
    rng = np.random.default_rng(0)
    num_images = 14
    images = rng.integers(-1, 2, (num_images, 4)).astype(np.float32)
    images[3] = images[7]  # two identical images: every caption of either ties between them
    captions_per_image = rng.integers(1, 6, num_images)
    text_to_image = np.repeat(np.arange(num_images), captions_per_image)
    # Captions: their image's vector plus small-integer noise, some exactly a copy of another's.
    texts = images[text_to_image] + rng.integers(-1, 2, (len(text_to_image), 4))
    texts[5] = texts[6]
    order = rng.permutation(len(texts))
    return images, texts[order].astype(np.float32), text_to_image[order]


def test_ranks_and_recalls_equal_brute_force_with_ties(tied_problem):
    images, texts, text_to_image = tied_problem
    expected_image_ranks, expected_text_ranks, expected = _brute_force(images, texts, text_to_image)
    # The problem really has ties at the decision points, else this test would not test them.
    scores = images @ texts.T
    assert any(len(set(row)) < len(row) for row in scores)
    assert jax.device_count() == 8
    for mesh, chunk_size in ((None, 5), (default_mesh(jax.devices()[:1]), 1024)):
        image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image, mesh=mesh, chunk_size=chunk_size)
        np.testing.assert_array_equal(image_ranks, expected_image_ranks)
        np.testing.assert_array_equal(text_ranks, expected_text_ranks)
        results = retrieval_evaluate(images, texts, text_to_image, mesh=mesh, chunk_size=chunk_size)
        for name, value in expected.items():
            assert results[name] == pytest.approx(value), name
    assert results["num_images"] == len(images) and results["num_texts"] == len(texts)


def test_collapsed_embeddings_score_no_better_than_last_place():
    # Every score ties: each query's right answer ranks behind every wrong one.
    num_images, captions_each = 12, 3
    images = np.ones((num_images, 8), np.float32)
    texts = np.ones((num_images * captions_each, 8), np.float32)
    text_to_image = np.repeat(np.arange(num_images), captions_each)
    image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image)
    assert np.all(image_ranks == (num_images - 1) * captions_each)  # all other images' captions first
    assert np.all(text_ranks == num_images - 1)
    results = retrieval_evaluate(images, texts, text_to_image)
    assert results["image_to_text_R@10"] == 0.0 and results["text_to_image_R@10"] == 0.0


def test_perfect_embeddings_and_one_hit_among_several_captions():
    images = np.eye(6, dtype=np.float32)
    text_to_image = np.array([0, 0, 1, 2, 3, 4, 5, 5])
    texts = images[text_to_image].copy()
    # Image 0's first caption leans towards image 1 (scores: image 1 -> 2, image 0 -> 1): that caption
    # ranks its own image second, and image 1 meets it (score 2) before its own caption (score 1);
    # image 0 still finds one of its captions first.
    texts[0] = images[1] * 2 + images[0]
    results = retrieval_evaluate(images, texts, text_to_image, recall_at=(1, 2))
    assert results["image_to_text_R@1"] == pytest.approx(5 / 6)
    assert results["text_to_image_R@1"] == pytest.approx(7 / 8)
    assert results["text_to_image_R@2"] == 1.0 and results["image_to_text_R@2"] == 1.0


def test_bad_inputs_are_refused_early():
    images = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"images \[2\] have no caption"):
        retrieval_evaluate(images, images[:2], np.array([0, 1]))
    with pytest.raises(ValueError, match="ranges over"):
        retrieval_evaluate(images, images, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="integer image ids"):
        retrieval_evaluate(images, images, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="k >= 1"):
        retrieval_evaluate(images, images, np.arange(3), recall_at=(0,))
