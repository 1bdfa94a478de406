"""Captioning (clip_jax.captioning) and zero-shot under the captioning objectives, on tiny random
models: scores against a token-by-token reference, beam search of width 1 against greedy search,
generation's end of text, zero-shot scores of each objective, the suite and the report's pictures.

One SentencePiece model (trained on the built-in dataset's captions) and one BPE-layout model (ids
only, no tokenizer) serve every test, so each jitted program compiles once or twice.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

import clip_jax
from clip_jax import captioning, transforms
from clip_jax.evaluation import report, suite
from clip_jax.evaluation.zero_shot import class_probabilities, zero_shot_scores
from clip_jax.models import CLIP

DECODER = {"width": 32, "heads": 2, "layers": 1}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _random_variables(model: CLIP, seed: int = 0) -> dict:
    """Variables of the model's shapes drawn by numpy (Flax's initialisers, run op by op, would
    cost seconds): LayerNorm scales near 1, other weights large enough that the decoder's
    distributions are far from uniform, so greedy and beam choices are not near ties."""
    shapes = jax.eval_shape(lambda: nn.unbox(model.init_variables(jax.random.key(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        if len(leaf.shape) < 2:  # biases, the temperature
            return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return (rng.standard_normal(leaf.shape) * 1.5 / np.sqrt(leaf.shape[0])).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def synthetic():
    from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig

    return SyntheticShapes(SyntheticShapesConfig(image_size=32))


@pytest.fixture(scope="module")
def tokenizer(synthetic, tmp_path_factory):
    from clip_jax.tokenizer import SentencePieceTokenizer, train_sentencepiece

    path = tmp_path_factory.mktemp("spm") / "spm.model"
    captions = synthetic.all_captions_sample(1000)
    return SentencePieceTokenizer(train_sentencepiece(captions, 256, str(path), hard_vocab_limit=False), 16)


@pytest.fixture(scope="module")
def sp_model(tokenizer):
    """A tiny ViT with a decoder and a bag-of-words head, SentencePiece rows ("last" pooling)."""
    text = {"vocab_size": tokenizer.vocab_size, "pooling": "last", "pad_id": tokenizer.pad_token_id}
    model = clip_jax.create_model("tiny-vit", text=text, decoder=DECODER, bag_of_words=True)
    return model, _random_variables(model)


@pytest.fixture(scope="module")
def bpe_model():
    """The same with CLIP BPE rows ("argmax" pooling: SOT = vocab - 2, EOT = vocab - 1), vocab 64."""
    model = clip_jax.create_model("tiny-vit", text={"vocab_size": 64}, decoder=DECODER)
    return model, _random_variables(model, seed=1)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)


def _reference_log_likelihood(model, variables, images, rows, first_weighted, end_id):
    """Sum of log p(row[i] | image, row[:i]) over i from `first_weighted` to the first `end_id`,
    position by position in numpy from CLIP.decode's logits (jitted: op by op it takes seconds)."""

    @jax.jit
    def logits_of(variables, images, rows):
        tokens = model.apply(variables, images, method=CLIP.encode_image_tokens)[1]
        return model.apply(variables, tokens, rows[:, :-1], method=CLIP.decode)

    all_logits = np.asarray(logits_of(variables, images, rows), np.float64)
    totals = []
    for logits, row in zip(all_logits, rows):
        total = 0.0
        for position in range(first_weighted, len(row)):
            shifted = logits[position] - logits[position].max()
            total += shifted[row[position]] - np.log(np.exp(shifted).sum())
            if row[position] == end_id:
                break
        totals.append(total)
    return np.array(totals)


@pytest.mark.parametrize("layout", ["sentencepiece", "bpe"])
def test_log_likelihood_is_the_sum_of_token_log_probabilities(layout, sp_model, bpe_model, tokenizer, images):
    if layout == "sentencepiece":
        (model, variables), first, end = sp_model, 0, tokenizer.eot_token_id
        rows = tokenizer(["red circle", "a photo of a blue square", "green", "x"])
    else:
        (model, variables), first, end = bpe_model, 1, 63  # position 0 is SOT, never predicted
        rng = np.random.default_rng(2)
        rows = np.zeros((4, 16), np.int32)
        for index, length in enumerate([3, 7, 14, 16]):
            rows[index, :length] = [62, *rng.integers(1, 62, size=length - 2), 63]
    tokens = captioning.encode_image_tokens(model, variables, images)
    scores = np.asarray(captioning.caption_log_likelihood(model, variables, tokens, rows))
    expected = _reference_log_likelihood(model, variables, images, rows, first, end)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    # Every pair: row i of the pairwise matrix's diagonal is the scores above.
    pairwise = np.asarray(captioning.pairwise_caption_log_likelihood(model, variables, tokens, rows))
    assert pairwise.shape == (4, 4)
    np.testing.assert_allclose(np.diag(pairwise), scores, rtol=1e-5, atol=1e-5)


def test_beam_search_of_width_one_is_greedy_search(bpe_model, images):
    model, variables = bpe_model
    greedy = captioning.generate(model, variables, images, method="greedy")
    beam = captioning.generate(model, variables, images, method="beam", beam_width=1)
    np.testing.assert_array_equal(beam, greedy)
    assert greedy.shape == (4, 16) and (greedy[:, 0] == 62).all()  # BPE rows start with SOT
    assert not (greedy[:, 1:] == 62).any()  # and never generate it again
    # A wider beam finds rows at least as likely as greedy's (no length penalty: raw likelihood).
    wide = captioning.generate(model, variables, images, method="beam", beam_width=4, length_penalty=0.0)
    tokens = captioning.encode_image_tokens(model, variables, images)
    wide_scores = np.asarray(captioning.caption_log_likelihood(model, variables, tokens, wide))
    greedy_scores = np.asarray(captioning.caption_log_likelihood(model, variables, tokens, greedy))
    assert (wide_scores >= greedy_scores - 1e-4).all(), (wide_scores, greedy_scores)


def test_generation_stops_at_the_end_token_and_pads(bpe_model, images):
    model, variables = bpe_model
    greedy = captioning.generate(model, variables, images, method="greedy")
    # Call the first token greedy search chose for image 0 after position 2 that it had not chosen
    # before the end of text: the search is the same up to there (the decoder is causal), then
    # that row ends and is padded.
    row = greedy[0].tolist()
    position = next(p for p in range(3, 16) if row[p] not in row[:p])
    end = row[position]
    for method in ("greedy", "beam"):
        rows = captioning.generate(
            model, variables, images, method=method, beam_width=1, start_ids=[62], eot_id=end, pad_id=0
        )
        np.testing.assert_array_equal(rows[0, : position + 1], greedy[0, : position + 1])
        assert (rows[0, position + 1 :] == 0).all(), rows[0]
        for row in rows:  # every row: nothing but padding after its first end token
            ends = np.flatnonzero(row == end)
            if len(ends):
                assert (row[ends[0] + 1 :] == 0).all(), row
    with pytest.raises(ValueError, match="max_length"):
        captioning.generate(model, variables, images, max_length=17)
    with pytest.raises(ValueError, match="no caption decoder"):
        captioning.generate(clip_jax.create_model("tiny-vit"), variables, images)


def test_generate_captions_from_raw_images(sp_model, tokenizer, synthetic, tmp_path):
    model, variables = sp_model
    batch = synthetic.get_batch("validation", np.arange(3))["images"]  # uint8 (3, 32, 32, 3)
    # Two batches of two, the second padded: one compiled search.
    captions = clip_jax.generate_captions(model, variables, batch, tokenizer, batch_size=2)
    assert len(captions) == 3 and all(isinstance(caption, str) for caption in captions)
    rows = captioning.generate(model, variables, transforms.preprocess_images(batch[:2], 32), eot_id=2)
    assert captions[:2] == [tokenizer.decode(row) for row in rows]
    with pytest.raises(ValueError, match="batch_size"):
        clip_jax.generate_captions(model, variables, batch, tokenizer, batch_size=0)
    # Saved and loaded back (decoder config, weights, tokenizer): the same captions.
    from clip_jax.io.model_directory import save_model_directory

    directory = save_model_directory(str(tmp_path / "model"), model.config, variables, tokenizer)
    assert clip_jax.api.captions_from_checkpoint(directory, batch, batch_size=2) == captions


def test_zero_shot_scores_under_each_objective(sp_model, tokenizer, images):
    model, variables = sp_model
    class_names, templates = ["red circle", "blue square", "green triangle"], ["a photo of a {}.", "{}"]
    prompts = [template.format(name) for name in class_names for template in templates]
    rows = tokenizer(prompts)
    tokens = captioning.encode_image_tokens(model, variables, images)

    caption = zero_shot_scores(
        model, variables, tokenizer, images, class_names, templates, "caption", pair_batch_size=5
    )
    pairwise = np.asarray(captioning.pairwise_caption_log_likelihood(model, variables, tokens, rows))
    np.testing.assert_allclose(caption, pairwise.reshape(4, 3, 2).mean(axis=2), rtol=1e-5, atol=1e-4)

    bag = zero_shot_scores(model, variables, tokenizer, images, class_names, templates, "bag_of_words", batch_size=2)
    word_logits = jax.jit(
        lambda variables, images: model.apply(
            variables, model.apply(variables, images, method=CLIP.encode_image), method=CLIP.bag_of_words_logits
        )
    )
    log_probs = np.asarray(jax.nn.log_softmax(word_logits(variables, images)))
    expected = np.zeros((4, 6))
    for column, row in enumerate(rows):
        words = sorted({int(t) for t in row if t not in (tokenizer.pad_token_id, tokenizer.eot_token_id)})
        expected[:, column] = log_probs[:, words].mean(axis=1)
    np.testing.assert_allclose(bag, expected.reshape(4, 3, 2).mean(axis=2), rtol=1e-5, atol=1e-4)

    contrastive = zero_shot_scores(model, variables, tokenizer, images, class_names, templates, "contrastive")
    assert contrastive.shape == (4, 3) and np.abs(contrastive).max() <= 1.0 + 1e-5  # cosine similarities
    for scores, objective in ((caption, "caption"), (bag, "bag_of_words"), (contrastive, "contrastive")):
        probabilities = class_probabilities(variables, scores, objective)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(probabilities.argmax(axis=1), scores.argmax(axis=1))
    with pytest.raises(ValueError, match="bag_of_words"):
        zero_shot_scores(
            clip_jax.create_model("tiny-vit"), variables, tokenizer, images, class_names, templates, "bag_of_words"
        )


def test_caption_zero_shot_prefers_the_generated_caption(sp_model, tokenizer, images):
    """A constructed case: class 0's prompt is image 0's greedy caption, the other classes' are
    other rows of its length; a "tokenizer" that maps class names to those rows stands in for the
    real one. The greedy caption is the likeliest of them given image 0."""
    model, variables = sp_model
    greedy = captioning.generate(model, variables, images[:1], eot_id=tokenizer.eot_token_id)[0]
    length = int(np.flatnonzero(greedy == tokenizer.eot_token_id)[0]) if tokenizer.eot_token_id in greedy else 16
    rng = np.random.default_rng(3)
    table = {"class 0": greedy}
    for index in range(1, 6):
        row = np.full(16, tokenizer.pad_token_id, np.int32)
        row[:length] = rng.integers(3, tokenizer.vocab_size, size=length)
        if length < 16:
            row[length] = tokenizer.eot_token_id
        table[f"class {index}"] = row
    lookup = lambda texts: np.stack([table[text] for text in texts])  # noqa: E731
    scores = zero_shot_scores(model, variables, lookup, images[:1], list(table), ["{}"], "caption")
    assert scores.argmax() == 0, scores


def test_objective_resolution(sp_model, bpe_model):
    caption_and_bag, caption_only = sp_model[0], bpe_model[0]
    contrastive_only = clip_jax.create_model("tiny-vit")
    assert suite.resolve_zero_shot_objective(contrastive_only) == "contrastive"
    assert suite.resolve_zero_shot_objective(caption_only) == "caption"
    assert suite.resolve_zero_shot_objective(clip_jax.create_model("tiny-vit", bag_of_words=True)) == "bag_of_words"
    # The training record decides when there is one: CoCa scores contrastively.
    assert suite.resolve_zero_shot_objective(caption_only, "auto", ["contrastive", "caption"]) == "contrastive"
    assert suite.resolve_zero_shot_objective(caption_and_bag, "auto", ["bag_of_words"]) == "bag_of_words"
    assert suite.resolve_zero_shot_objective(caption_and_bag, "caption") == "caption"
    with pytest.raises(ValueError, match="decoder"):
        suite.resolve_zero_shot_objective(contrastive_only, "caption")
    with pytest.raises(ValueError, match="zero_shot_objective"):
        suite.EvaluationSettings(zero_shot_objective="lm")


def test_suite_and_report_of_a_caption_model(sp_model, tokenizer, synthetic, tmp_path):
    model, variables = sp_model
    settings = suite.EvaluationSettings(
        tasks=("zero_shot",), datasets=("synthetic",), prompt_modes=("single",), max_examples=6, batch_size=8
    )
    results = suite.run_evaluation(model, variables, tokenizer, settings, synthetic=synthetic, log=lambda line: None)
    entry = results["zero_shot"]["synthetic"]
    assert entry["objective"] == "caption" and entry["single"]["num_examples"] == 6
    assert 0.0 <= entry["single"]["top1"] <= 1.0 and 0.0 <= entry["top1_among_all_classes"] <= 1.0

    examples, pictures = suite.collect_examples(model, variables, tokenizer, settings, synthetic=synthetic, count=3)
    assert pictures.dtype == np.uint8 and pictures.shape == (3, 32, 32, 3)
    assert len(examples["captions"]) == 3 and examples["objective"] == "caption"
    assert all(len(top) == 5 and top[0][1] >= top[-1][1] for top in examples["top5"])
    results["examples"] = examples
    paths = report.write_report(results, tmp_path, example_images=pictures)
    for name in report.EXAMPLE_FILES.values():
        assert str(tmp_path / name) in paths
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
    markdown = (tmp_path / "results.md").read_text()
    assert "## Generated captions" in markdown and "scored by caption" in markdown
