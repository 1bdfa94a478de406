"""Zero-shot evaluation: open_clip's zero-shot classifier reproduced on the same random weights, the
metrics against hand-worked examples, the encoder's sharding, and the shipped templates."""

from __future__ import annotations

import jax
import numpy as np
import PIL.Image
import pytest

import clip_jax
from clip_jax.data import templates as templates_module
from clip_jax.evaluation.features import Encoder, default_mesh, extract_image_features, preprocess_images
from clip_jax.evaluation.zero_shot import (
    class_embeddings,
    classification_metrics,
    zero_shot_classifier,
    zero_shot_evaluate,
    zero_shot_predict,
)
from clip_jax.models import CLIPConfig, TextConfig, VisionConfig
from clip_jax.tokenizer import ClipTokenizer

CLASS_NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray"]


# ------------------------------------------------------------------------------------------------
# Parity with open_clip
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip_pair():
    """A random tiny open_clip ViT (noise on every tensor, so no zero-initialised tensor hides a
    mismatch) and the same weights converted to clip_jax, with an explicit model config: head counts of
    these widths cannot be read off the shapes."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP as OpenClipModel
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from clip_jax.io.openclip_layout import convert_state_dict

    torch.manual_seed(0)
    reference = OpenClipModel(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
    ).eval()
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn_like(tensor))
    model_config = CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, width=64, layers=2, heads=2, patch_size=8),
        text=TextConfig(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        activation="quick_gelu",
    )
    state_dict = {name: tensor.detach().numpy() for name, tensor in reference.state_dict().items()}
    config, variables = convert_state_dict(state_dict, model_config)
    return reference, open_clip.get_tokenizer("ViT-B-32"), clip_jax.CLIP(config), variables


def _random_images(count: int, seed: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (48, 40), (32, 32), (57, 33)]
    return [PIL.Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(count)]


def test_classifier_and_predictions_match_open_clip(open_clip_pair):
    import torch
    from open_clip.transform import image_transform
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    reference, reference_tokenizer, model, variables = open_clip_pair
    templates = templates_module.IMAGENET_TEMPLATES[:6]
    expected = build_zero_shot_classifier(
        reference, reference_tokenizer, CLASS_NAMES, templates, num_classes_per_batch=3
    )
    expected = expected.numpy().T  # open_clip: (embed_dim, classes)

    classifier = zero_shot_classifier(model, variables, ClipTokenizer(context_length=77), CLASS_NAMES, templates)
    assert classifier.shape == (len(CLASS_NAMES), 32)
    np.testing.assert_allclose(classifier, expected, atol=2e-6, rtol=0)

    images = _random_images(24, seed=1)
    reference_preprocess = image_transform(32, is_train=False)
    with torch.no_grad():
        reference_features = reference.encode_image(
            torch.stack([reference_preprocess(i) for i in images]), normalize=True
        )
    reference_logits = reference_features.numpy() @ expected.T

    encoder = Encoder(model, variables, batch_size=8)
    features, _ = extract_image_features(encoder, [{"images": images[:10]}, {"images": images[10:]}], label_key=None)
    logits = zero_shot_predict(features, classifier)
    np.testing.assert_allclose(logits, reference_logits, atol=5e-6, rtol=0)
    assert np.array_equal(np.argmax(logits, axis=1), np.argmax(reference_logits, axis=1))
    # The ranking the top-5 metric reads is the reference's too.
    assert np.array_equal(np.argsort(-logits, axis=1)[:, :5], np.argsort(-reference_logits, axis=1)[:, :5])


def test_callable_templates_give_the_same_classifier_as_format_strings(open_clip_pair):
    _, _, model, variables = open_clip_pair
    tokenizer = ClipTokenizer(context_length=77)
    strings = ["a photo of a {}.", "a drawing of the {}."]
    callables = [lambda name: f"a photo of a {name}.", lambda name: f"a drawing of the {name}."]
    encoder = Encoder(model, variables)
    np.testing.assert_array_equal(
        class_embeddings(encoder, tokenizer, CLASS_NAMES[:3], strings),
        class_embeddings(encoder, tokenizer, CLASS_NAMES[:3], callables),
    )


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_classification_metrics_on_a_hand_worked_example():
    logits = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],  # label 0: top-1 hit
            [0.5, 0.4, 0.3, 0.0],  # label 1: rank 2
            [0.1, 0.2, 0.3, 0.4],  # label 0: rank 4
            [0.0, 0.0, 0.1, 0.2],  # label 3: top-1 hit
            [0.3, 0.3, 0.3, 0.3],  # label 2: all tied; ties rank by label id, so rank 3
        ]
    )
    labels = np.array([0, 1, 0, 3, 2])
    results = classification_metrics(logits, labels, top_k=(1, 2, 3))
    assert results["top1"] == pytest.approx(2 / 5)
    assert results["top2"] == pytest.approx(3 / 5)
    assert results["top3"] == pytest.approx(4 / 5)
    assert "top5" not in classification_metrics(logits, labels)  # k larger than the class count
    # Recall per present class: 0 -> 1/2, 1 -> 0, 2 -> 0, 3 -> 1.
    assert results["mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0 + 1) / 4)
    assert results["num_examples"] == 5 and results["num_classes"] == 4


def test_class_subset_restricts_the_prediction():
    logits = np.array([[5.0, 1.0, 2.0, 0.0], [0.0, 1.0, 9.0, 3.0]])
    labels = np.array([2, 3])
    # Among all classes both are wrong; among {1, 2, 3} the first is right (2 > 1 > 0)...
    assert classification_metrics(logits, labels, top_k=(1,))["top1"] == 0.0
    # ...and among {1, 3} the second is too: its top class 2 is excluded.
    results = classification_metrics(logits, np.array([1, 3]), class_subset=[1, 3], top_k=(1,))
    assert results["top1"] == 1.0 and results["num_classes"] == 2
    with pytest.raises(ValueError, match="not in class_subset"):
        classification_metrics(logits, labels, class_subset=[0, 1])


def test_metrics_refuse_labels_outside_the_classes():
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 3]))


# ------------------------------------------------------------------------------------------------
# Encoder, prompt modes, end to end
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from flax import linen as nn

    # The CLIP BPE's vocabulary, so that ClipTokenizer's ids are in range.
    model = clip_jax.create_model("tiny-vit", text=dict(vocab_size=49408))

    variables = nn.unbox(model.init_variables(jax.random.key(0)))
    return model, variables


def test_encoder_over_eight_devices_equals_one_device_and_direct_apply(open_clip_pair):
    _, _, model, variables = open_clip_pair
    assert jax.device_count() == 8
    images = np.random.default_rng(0).normal(size=(13, 32, 32, 3)).astype(np.float32)
    sharded = Encoder(model, variables, batch_size=8)  # two batches, the second padded
    single = Encoder(model, variables, mesh=default_mesh(jax.devices()[:1]), batch_size=5)
    direct = np.asarray(model.apply(variables, images, normalize=True, method=model.encode_image))
    np.testing.assert_allclose(sharded.encode_images(images), direct, atol=1e-6)
    np.testing.assert_allclose(single.encode_images(images), direct, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="expected preprocessed images"):
        sharded.encode_images(images[:, :16])


def test_uint8_batches_are_normalised_as_the_eval_transform_does():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    transform = clip_jax.transforms.make_eval_transform(32)
    np.testing.assert_array_equal(preprocess_images(images, 32), np.stack([transform(i) for i in images]))


def test_prompt_modes_and_ensemble_average(open_clip_pair):
    _, _, model, variables = open_clip_pair
    tokenizer = ClipTokenizer(context_length=77)
    prompts = templates_module.DatasetPrompts(("red circle", "blue star"), ("a photo of the {}.", "the {}."), "the {}.")
    assert prompts.templates_for("class_name") == ("{}",)
    assert prompts.templates_for("single") == ("the {}.",)
    assert prompts.templates_for("ensemble") == ("a photo of the {}.", "the {}.")
    with pytest.raises(ValueError, match="unknown prompt mode"):
        prompts.templates_for("all")
    encoder = Encoder(model, variables)
    ensemble = class_embeddings(encoder, tokenizer, prompts.class_names, prompts.templates)
    singles = [class_embeddings(encoder, tokenizer, prompts.class_names, [t]) for t in prompts.templates]
    # Each single-template embedding is already unit-norm, so the ensemble is their normalised mean.
    mean = (singles[0] + singles[1]) / 2
    np.testing.assert_allclose(ensemble, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)


def test_zero_shot_evaluate_on_the_synthetic_dataset(open_clip_pair):
    from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig

    _, _, model, variables = open_clip_pair
    dataset = SyntheticShapes(SyntheticShapesConfig(image_size=32))
    tokenizer = ClipTokenizer(context_length=77)
    batches = [dataset.get_batch("held_out", np.arange(start, start + 10)) for start in (0, 10, 20)]
    results = zero_shot_evaluate(
        model,
        variables,
        tokenizer,
        batches,
        dataset.all_class_names,
        dataset.zero_shot_templates,
        class_subset=dataset.held_out_labels,
        batch_size=16,
    )
    # The same numbers by hand: embed, score, rank among the held-out classes.
    encoder = Encoder(model, variables)
    classifier = class_embeddings(encoder, tokenizer, dataset.all_class_names, dataset.zero_shot_templates)
    images = np.concatenate([b["images"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    scores = encoder.encode_images(preprocess_images(images, 32)) @ classifier.T
    held_out = np.asarray(dataset.held_out_labels)
    predicted = held_out[np.argmax(scores[:, held_out], axis=1)]
    assert results["num_examples"] == 30 and results["num_classes"] == len(held_out)
    assert results["top1"] == pytest.approx(np.mean(predicted == labels))


# ------------------------------------------------------------------------------------------------
# Shipped templates and class names
# ------------------------------------------------------------------------------------------------


def test_imagenet_templates_and_names_are_open_clips():
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    assert templates_module.IMAGENET_TEMPLATES == tuple(t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES)
    assert templates_module.IMAGENET_CLASS_NAMES == tuple(metadata.IMAGENET_CLASSNAMES)
    assert len(templates_module.IMAGENET_TEMPLATES) == 80 and len(templates_module.IMAGENET_CLASS_NAMES) == 1000


@pytest.mark.parametrize("name", sorted(templates_module.DATASET_PROMPTS))
def test_every_dataset_has_distinct_names_and_valid_templates(name):
    prompts = templates_module.get_prompts(name)
    repeated = sorted({n for n in prompts.class_names if prompts.class_names.count(n) > 1})
    # OpenAI's curated ImageNet names repeat two (two WordNet senses each); nothing else may.
    assert repeated == (
        ["missile", "sunglasses"] if prompts.class_names == templates_module.IMAGENET_CLASS_NAMES else []
    )
    for template in prompts.templates:
        assert template.count("{}") == 1
    assert templates_module.get_prompts(f"{name}:1.0.0") is prompts


def test_class_counts_of_the_label_spaces():
    expected = {"cifar10": 10, "cifar100": 100, "food101": 101, "oxford_iiit_pet": 37, "oxford_flowers102": 102,
                "dtd": 47, "eurosat": 10, "stl10": 10, "caltech101": 102, "imagenet_r": 1000}  # fmt: skip
    for name, count in expected.items():
        assert len(templates_module.get_prompts(name).class_names) == count, name
    with pytest.raises(ValueError, match="no class names"):
        templates_module.get_prompts("not_a_dataset")
    with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
        templates_module.check_template("a photo")


def test_encoder_uses_fsdp_sharded_training_parameters_where_they_lie(open_clip_pair):
    from clip_jax import sharding

    _, _, model, variables = open_clip_pair
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1})
    abstract = jax.eval_shape(model.init_variables, jax.random.key(0))
    shardings = sharding.param_shardings(abstract, mesh)
    placed = jax.device_put(variables, shardings)
    weight = placed["params"]["text"]["token_embedding"]
    assert len(weight.sharding.device_set) == 8 and not weight.sharding.is_fully_replicated
    encoder = Encoder(model, placed, mesh=mesh, batch_size=8)
    assert encoder.variables["params"]["text"]["token_embedding"] is weight  # not copied
    images = np.random.default_rng(1).normal(size=(10, 32, 32, 3)).astype(np.float32)
    reference = Encoder(model, variables, mesh=default_mesh(jax.devices()[:1]), batch_size=8)
    np.testing.assert_allclose(encoder.encode_images(images), reference.encode_images(images), atol=1e-5)
