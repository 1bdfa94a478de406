"""The captioning objectives (loss.name = caption, bag_of_words, coca): their targets on hand-written
rows, and on 8 virtual CPU devices the sharded step's loss and gradients against a plain
single-device computation of the same objective, with both contrastive implementations and with
GradCache accumulation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_step import (
    FAST_COMPILE,
    RELATIVE_TOLERANCE,
    assert_trees_close,
    clamped_scale,
    create_state,
    gradients_from_first_step,
    make_config,
    on_mesh,
    state_on,
)

from clip_jax import create_model, losses
from clip_jax.models import TextConfig
from clip_jax.sharding import make_mesh
from clip_jax.training.config import LossSettings
from clip_jax.training.step import make_train_step

BATCH_SIZE = 32
VOCAB = 1000
SOT, EOT = VOCAB - 2, VOCAB - 1  # the BPE layout: start and end of text are the two largest ids


# ---- targets, from their definitions on rows written out by hand -------------------------------


def test_caption_targets_cover_the_caption_through_its_end_not_the_bpe_start_token():
    bpe = TextConfig(context_length=6, vocab_size=VOCAB, pooling="argmax")
    texts = jnp.array([[SOT, 5, 7, EOT, 0, 0], [SOT, EOT, 0, 0, 0, 0]])
    np.testing.assert_array_equal(losses.caption_targets(texts, bpe), [[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]])
    # SentencePiece rows: [ids..., eos, pad...] with no start token; pad id 0, eos 2.
    sentencepiece = TextConfig(context_length=6, vocab_size=VOCAB, pooling="last", pad_id=0)
    texts = jnp.array([[9, 4, 2, 0, 0, 0], [2, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        losses.caption_targets(texts, sentencepiece), [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    )


def test_bag_of_words_targets_are_the_caption_words_once_each_normalised():
    bpe = TextConfig(context_length=7, vocab_size=12, pooling="argmax")
    texts = jnp.array([[10, 3, 5, 3, 11, 0, 0], [10, 11, 0, 0, 0, 0, 0]])  # SOT=10, EOT=11
    targets = np.asarray(losses.bag_of_words_targets(texts, bpe, 12))
    expected = np.zeros((2, 12))
    expected[0, [3, 5]] = 0.5  # "3" twice counts once; start, end and padding are no words
    np.testing.assert_array_equal(targets, expected)


def test_caption_loss_is_the_mean_negative_log_likelihood_of_the_predicted_tokens():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    texts = jnp.array([[0, 1, 2]])
    weights = jnp.array([[1.0, 1.0, 0.0]])
    expected = -(np.log(0.5) + np.log(0.8)) / 2
    assert float(losses.caption_loss(logits, texts, weights)) == pytest.approx(expected, rel=1e-6)
    bag = jnp.array([[0.5, 0.5, 0.0]])
    expected_bag = -(0.5 * np.log(0.5) + 0.5 * np.log(0.25))
    assert float(losses.bag_of_words_loss(logits[:, 0], bag)) == pytest.approx(expected_bag, rel=1e-6)


def test_settings_refuse_unknown_objectives_and_weights_naming_the_value():
    with pytest.raises(ValueError, match="loss.name.*'captions'"):
        LossSettings(name="captions")
    with pytest.raises(ValueError, match="loss.caption_weight.*-1"):
        LossSettings(name="coca", caption_weight=-1.0)
    assert LossSettings(name="coca").weights == {"contrastive": 1.0, "caption": 2.0}
    assert LossSettings(name="caption").contrastive is None


# ---- the sharded step against a single-device computation ---------------------------------------


def caption_model():
    # One layer per part; both captioning heads on one model, so one set of parameters serves
    # every objective (an objective leaves the other heads' gradients at zero).
    return create_model(
        "tiny-vit",
        vision=dict(layers=1),
        text=dict(layers=1),
        decoder=dict(width=32, heads=2, layers=1),
        bag_of_words=True,
    )


def caption_batch(model, seed=0):
    """Rows laid out as the CLIP BPE lays them out: [SOT, words..., EOT, 0, ...], of varied lengths."""
    rng = np.random.default_rng(seed)
    size, length = model.config.vision.image_size, model.config.text.context_length
    images = rng.normal(size=(BATCH_SIZE, size, size, 3)).astype(np.float32)
    texts = np.zeros((BATCH_SIZE, length), np.int32)
    for row, words in enumerate(rng.integers(1, length - 1, size=BATCH_SIZE)):
        texts[row, 0] = SOT
        texts[row, 1 : 1 + words] = rng.integers(1, SOT, size=words)
        texts[row, 1 + words] = EOT
    return images, texts


def reference_objective(model, name):
    """The objective's value and gradient on one device, from the model's outputs and the
    single-device losses."""

    def objective(params, images, texts):
        outputs = model.apply({"params": params}, images, texts)
        contrastive = losses.softmax_contrastive_loss(
            outputs["image_embeds"], outputs["text_embeds"], clamped_scale(params)
        )
        text_config = model.config.text
        caption = losses.caption_loss(outputs["caption_logits"], texts, losses.caption_targets(texts, text_config))
        bag = losses.bag_of_words_loss(
            outputs["bag_of_words_logits"], losses.bag_of_words_targets(texts, text_config, VOCAB)
        )
        terms = {"contrastive": contrastive, "caption": caption, "bag_of_words": bag}
        weights = LossSettings(name=name).weights
        return sum(weights[term] * terms[term] for term in weights), terms

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


@pytest.fixture(scope="module")
def setup():
    model = caption_model()
    assert model.config.text.vocab_size == VOCAB
    images, texts = caption_batch(model)
    config = make_config(mesh=(8, 1, 1))
    state, _ = create_state(config, model, make_mesh(config.mesh))
    return dict(model=model, images=images, texts=texts, host_state=jax.device_get(state))


# (objective, (data, fsdp, model) mesh, contrastive implementation, micro-batches)
CASES = {
    "caption-data_parallel": ("caption", (8, 1, 1), "all_gather", 1),
    "bag_of_words-fsdp-2_micro_batches": ("bag_of_words", (2, 4, 1), "all_gather", 2),
    "coca-data_parallel-all_gather": ("coca", (8, 1, 1), "all_gather", 1),
    "coca-fsdp-ring-2_micro_batches": ("coca", (2, 4, 1), "ring", 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_equals_the_single_device_objective(setup, case):
    name, mesh_shape, impl, accumulation_steps = CASES[case]
    model, host_state = setup["model"], setup["host_state"]
    config = make_config(name, impl, mesh_shape, accumulation_steps)
    mesh = make_mesh(config.mesh)
    state, shardings = state_on(host_state, config, model, mesh)
    batch = on_mesh(setup["images"], setup["texts"], mesh)
    train_step = make_train_step(model, config.step, mesh, shardings).lower(state, batch).compile(FAST_COMPILE)
    new_state, metrics = train_step(state, batch)

    device = jax.devices()[0]
    inputs = jax.device_put((host_state.params, setup["images"], setup["texts"]), device)
    (expected_loss, expected_terms), expected_gradients = jax.device_get(reference_objective(model, name)(*inputs))
    assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=RELATIVE_TOLERANCE)
    for term in LossSettings(name=name).weights:
        assert float(metrics[f"{term}_loss"]) == pytest.approx(float(expected_terms[term]), rel=RELATIVE_TOLERANCE)
    assert ("accuracy_image_to_text" in metrics) == (name == "coca")
    gradients = gradients_from_first_step(new_state)
    assert_trees_close(gradients, expected_gradients)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(expected_gradients)), rel=1e-5)
    if name == "caption":  # the objective reaches the decoder and the image tower, not the text tower
        assert all(not np.any(leaf) for leaf in jax.tree.leaves(gradients["text"]))
        assert any(np.any(leaf) for leaf in jax.tree.leaves(gradients["visual"]))


def test_an_objective_without_its_head_is_refused_before_tracing():
    model = create_model("tiny-vit", vision=dict(layers=1), text=dict(layers=1))
    config = make_config("caption")
    mesh = make_mesh(config.mesh)
    state, shardings = create_state(config, model, mesh)
    with pytest.raises(ValueError, match="caption decoder"):
        make_train_step(model, config.step, mesh, shardings)


def test_exports_refuse_a_model_whose_decoder_they_would_drop():
    from clip_jax.convert import ConversionError, variables_to_openclip
    from clip_jax.convert.hf import ExportError, check_exportable
    from clip_jax.tokenizer import ClipTokenizer

    config = caption_model().config
    with pytest.raises(ConversionError, match="caption decoder"):
        variables_to_openclip({}, config)
    with pytest.raises(ExportError, match="caption decoder"):
        check_exportable(config, ClipTokenizer())


def test_a_decoder_spec_survives_its_json_record_and_needs_a_vit():
    from clip_jax.models import CLIPConfig

    config = caption_model().config
    assert CLIPConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="needs a ViT"):
        create_model("tiny-resnet", decoder=dict(width=32, heads=2, layers=1))
    with pytest.raises(ValueError, match="decoder heads must be a positive int; got 0"):
        create_model("tiny-vit", decoder=dict(heads=0))


def test_a_scanned_rematerialised_decoder_equals_the_unrolled_one():
    from flax import traverse_util

    from clip_jax.models import CLIP
    from clip_jax.models.layout import stack_layers

    decoder = dict(width=32, heads=2, layers=2)
    unrolled = create_model("tiny-vit", decoder=decoder)
    scanned = create_model("tiny-vit", decoder=decoder, scan_layers=True, remat_policy="full")
    variables = jax.tree.map(np.asarray, nn.unbox(unrolled.init_variables(jax.random.key(0))))
    stacked = traverse_util.unflatten_dict(stack_layers(traverse_util.flatten_dict(variables)))
    images, texts = caption_batch(unrolled)
    images, texts = images[:4], texts[:4]

    def caption_logits(model):
        def logits(variables):
            _, tokens = model.apply(variables, images, method=CLIP.encode_image_tokens)
            return model.apply(variables, tokens, texts[:, :-1], method=CLIP.decode)

        return jax.jit(logits)

    np.testing.assert_allclose(caption_logits(unrolled)(variables), caption_logits(scanned)(stacked), atol=1e-5)


# ---- a trained caption model, end to end ---------------------------------------------------------

CAPTION_CONFIG = """
from configs.default import get_config as default_config

def get_config():
    config = default_config()
    config.loss.name = "caption"
    config.model.overrides.decoder = {"width": 32, "heads": 2, "layers": 1}
    return config
"""

FRESH_PROCESS = """
import json, sys
import numpy as np
from clip_jax.api import captions_from_checkpoint
print(json.dumps(captions_from_checkpoint(sys.argv[1], np.load(sys.argv[2]), method=sys.argv[3])))
"""


def test_a_caption_model_trained_by_train_py_captions_the_same_in_a_fresh_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from clip_jax.api import captions_from_checkpoint
    from clip_jax.metrics import read_jsonl

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config, workdir = tmp_path / "caption.py", tmp_path / "workdir"
    config.write_text(CAPTION_CONFIG)
    steps = 6
    subprocess.run(
        [sys.executable, os.path.join(repo, "train.py"), f"--config={config}", f"--workdir={workdir}",
         f"--config.total_steps={steps}", "--config.global_batch_size=16", "--config.log_every_steps=1",
         "--config.eval.num_examples=0", "--config.tokenizer.training_captions=2000",
         f"--config.checkpoint.every_steps={steps}"],
        check=True, cwd=repo, env={**os.environ, "PYTHONPATH": repo},
    )  # fmt: skip
    records = [r for r in read_jsonl(str(workdir / "metrics.jsonl")) if "caption_loss" in r]
    assert len(records) == steps and records[-1]["caption_loss"] < records[0]["caption_loss"]
    assert all(r["loss"] == r["caption_loss"] and "accuracy_image_to_text" not in r for r in records)

    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    for method in ("greedy", "beam"):
        here = captions_from_checkpoint(str(workdir), images, method=method)
        fresh = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS, str(workdir), str(tmp_path / "images.npy"), method],
            check=True, cwd=repo, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo},
        )  # fmt: skip
        assert json.loads(fresh.stdout.strip().splitlines()[-1]) == here
        assert len(here) == 4 and all(isinstance(caption, str) and caption for caption in here)
