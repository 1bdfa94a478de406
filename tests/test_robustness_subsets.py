"""ImageNet-R and -A in the evaluation suite: their official 200-class subsets, a classifier built from
those classes only, and labels mapped into them (checked on tfds.testing.mock_data)."""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest

from clip_jax.data import templates as templates_module
from clip_jax.evaluation import datasets, suite
from clip_jax.models import CLIP, get_model_config


def _imagenet_label_names() -> list[str]:
    """ImageNet's 1,000 WordNet ids in label order, from TFDS's own file."""
    pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    with open(imagenet_common.label_names_file()) as file:
        return file.read().split()


@pytest.mark.parametrize("name", ["imagenet_r", "imagenet_a"])
def test_subsets_are_200_imagenet_classes_in_label_order(name):
    wnids = templates_module.IMAGENET_CLASS_SUBSETS[name]
    label_names = _imagenet_label_names()
    assert len(wnids) == len(set(wnids)) == 200
    assert set(wnids) <= set(label_names)
    labels = datasets.class_subset_labels(name, label_names)
    assert labels == sorted(labels) and [label_names[label] for label in labels] == list(wnids)
    assert datasets.class_subset_labels("imagenet_v2", label_names) is None
    with pytest.raises(ValueError, match="200 classes are not among the dataset's label names"):
        datasets.class_subset_labels(name, [f"class_{index}" for index in range(1000)])


@pytest.mark.parametrize("name", ["imagenet_r", "imagenet_a"])
def test_subsets_equal_timms_copies_of_the_official_lists(name):
    pytest.importorskip("timm")
    from importlib import resources

    text = resources.files("timm.data").joinpath("_info", f"{name}_synsets.txt").read_text()
    assert templates_module.IMAGENET_CLASS_SUBSETS[name] == tuple(text.split())


def test_labels_are_mapped_into_the_subset_and_others_masked_out():
    subset = [3, 7, 9]
    stream = lambda batch_size: iter([  # noqa: E731
        {"images": np.zeros((4, 2)), "labels": np.array([9, 3, 5, 0]), "mask": np.array([True, True, True, False])},
        {"images": np.zeros((2, 2)), "labels": np.array([7, 7])},
    ])  # fmt: skip
    outside = [0]
    batches = list(datasets._labels_mapped_into(stream, subset, 10, outside)(4))
    np.testing.assert_array_equal(batches[0]["labels"][:2], [2, 0])
    np.testing.assert_array_equal(batches[0]["mask"], [True, True, False, False])  # label 5: outside
    np.testing.assert_array_equal(batches[1]["labels"], [1, 1])
    np.testing.assert_array_equal(batches[1]["mask"], [True, True])
    assert outside == [1]  # the padding row (mask False) is not counted


def _hash_tokenizer(texts, truncate=False):
    """Token ids (n, 16) from a hash of each word: enough for a random text tower."""
    rows = np.zeros((len(texts), 16), np.int32)
    for row, text in enumerate(texts):
        ids = [1 + zlib.crc32(word.encode()) % 998 for word in text.split()][:15] + [999]
        rows[row, : len(ids)] = ids
    return rows


def test_imagenet_r_and_a_are_scored_with_a_classifier_of_their_200_classes(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    model = CLIP(get_model_config("tiny-vit"))
    variables = model.init_variables(jax.random.key(0))
    built = []
    real_class_embeddings = suite.class_embeddings

    def recording_class_embeddings(encoder, tokenizer, class_names, templates):
        built.append(tuple(class_names))
        return real_class_embeddings(encoder, tokenizer, class_names, templates)

    monkeypatch.setattr(suite, "class_embeddings", recording_class_embeddings)
    settings = suite.EvaluationSettings(
        tasks=("zero_shot",), datasets=("imagenet_r", "imagenet_a"), prompt_modes=("single",), batch_size=16,
        tfds_reader="data_source", tfds_image_decoder="tfds", tfds_worker_kind="thread",
    )  # fmt: skip
    with tfds.testing.mock_data(num_examples=200):
        mock_labels = {
            name: [int(example["label"]) for example in tfds.data_source(name, split="test")]
            for name in settings.datasets
        }
        results = suite.run_evaluation(model, variables, _hash_tokenizer, settings, log=lambda message: None)

    label_names = _imagenet_label_names()
    for index, name in enumerate(settings.datasets):
        subset_labels = datasets.class_subset_labels(name, label_names)
        # The classifier holds the subset's 200 classes, in ImageNet's label order, and nothing else.
        assert built[index] == tuple(templates_module.IMAGENET_CLASS_NAMES[label] for label in subset_labels)
        entry = results["zero_shot"][name]["single"]
        assert entry["num_classes"] == 200
        # Mock labels range over all 1,000 classes: only the images of the 200 are scored.
        inside = [label for label in mock_labels[name] if label in set(subset_labels)]
        assert 0 < entry["num_examples"] == len(inside) < len(mock_labels[name])
        assert "top1_among_all_classes" not in results["zero_shot"][name]
