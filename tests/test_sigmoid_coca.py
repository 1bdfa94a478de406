"""sigmoid_coca: an objective added as one record in clip_jax/losses.py and nothing else (SigLIP's
sigmoid contrastive loss plus CoCa's caption loss, weighted by the same settings as CoCa's). Config
validation accepts it and refuses, in one line naming the setting, a model without what it needs; a
tiny model trains under it through the real sharded step on 8 virtual CPU devices; the evaluation
suite's zero-shot runs under it."""

import jax
import numpy as np
import pytest
from run_helpers import default_config
from test_caption_objectives import caption_batch
from test_train_step import FAST_COMPILE, create_state, make_config, on_mesh

from clip_jax import create_model, losses
from clip_jax.evaluation import suite
from clip_jax.sharding import make_mesh
from clip_jax.training.config import LossSettings, validate
from clip_jax.training.step import make_train_step

NAME = "sigmoid_coca"
DECODER = {"width": 32, "heads": 2, "layers": 1}
STEPS = 6


def test_its_record_says_what_it_sums_needs_and_scores_zero_shot_with():
    objective = losses.OBJECTIVES[NAME]
    assert objective.contrastive == "sigmoid"
    assert objective.needs == (losses.LOGIT_BIAS, losses.CAPTION_DECODER)
    assert objective.zero_shot == "contrastive"
    assert LossSettings(name=NAME).weights == {"contrastive": 1.0, "caption": 2.0}
    assert LossSettings(name=NAME, caption_weight=0.5).weights == {"contrastive": 1.0, "caption": 0.5}


def _validated(**changes):
    config = default_config()
    config.update_from_flattened_dict({"loss.name": NAME, **changes})
    return validate(config, process_count=1)


def test_config_validation_accepts_it_and_refuses_a_model_without_what_it_needs():
    settings = _validated(**{"model.overrides.logit_bias_init": -10.0, "model.overrides.decoder": DECODER})
    assert settings.step.loss.objective is losses.OBJECTIVES[NAME]
    assert settings.model.model_config().decoder is not None
    missing = {
        "model.overrides.decoder": {"model.overrides.logit_bias_init": -10.0},
        "model.overrides.logit_bias_init": {"model.overrides.decoder": DECODER},
    }
    for setting, changes in missing.items():
        with pytest.raises(ValueError, match=f"loss.name='{NAME}': .* needs a model with .*; set {setting}") as error:
            _validated(**changes)
        assert "\n" not in str(error.value)


def _model():
    return create_model("tiny-vit", logit_bias_init=-10.0, vision=dict(layers=1), text=dict(layers=1), decoder=DECODER)


def test_it_trains_through_the_sharded_step_and_zero_shot_runs_under_it():
    model = _model()
    config = make_config(NAME, learning_rate=3e-3, warmup_steps=1)
    mesh = make_mesh(config.mesh)
    state, shardings = create_state(config, model, mesh)
    # The step refuses, before tracing, a model without the decoder the record asks for.
    with pytest.raises(ValueError, match="needs a model with a caption decoder; set model.overrides.decoder"):
        make_train_step(create_model("tiny-vit", logit_bias_init=-10.0), config.step, mesh, shardings)
    batch = on_mesh(*caption_batch(model), mesh)
    train_step = make_train_step(model, config.step, mesh, shardings).lower(state, batch).compile(FAST_COMPILE)
    history = []
    for _ in range(STEPS):
        state, metrics = train_step(state, batch)
        history.append({name: float(value) for name, value in jax.device_get(metrics).items()})
    first, last = history[0], history[-1]
    assert all(np.isfinite(entry["loss"]) and not entry["nonfinite"] for entry in history)
    # Both terms are trained and logged; the total is their weighted sum (caption_weight 2).
    assert {"contrastive_loss", "caption_loss", "logit_bias", "accuracy_image_to_text"} <= set(first)
    for entry in history:
        assert entry["loss"] == pytest.approx(entry["contrastive_loss"] + 2.0 * entry["caption_loss"], rel=1e-5)
    assert last["loss"] < first["loss"], [entry["loss"] for entry in history]
    assert last["caption_loss"] < first["caption_loss"] and last["contrastive_loss"] < first["contrastive_loss"]

    # Zero-shot under it: its record scores contrastively, and the suite runs.
    variables = {"params": jax.device_get(state.params)}
    trained = [losses.OBJECTIVES[NAME].zero_shot]
    assert suite.resolve_zero_shot_objective(model, "auto", trained) == "contrastive"
    settings = suite.EvaluationSettings(
        tasks=("zero_shot",), datasets=("synthetic",), prompt_modes=("single",), batch_size=16, max_examples=32
    )
    results = suite.run_evaluation(
        model, variables, _tokenizer, settings, log=lambda line: None, trained_objectives=trained
    )
    entry = results["zero_shot"]["synthetic"]
    assert entry["objective"] == "contrastive"
    assert entry["single"]["num_examples"] == 32 and 0.0 <= entry["single"]["top1"] <= 1.0


def _tokenizer(texts, truncate=False):
    """BPE-laid-out rows [SOT, word ids..., EOT, 0, ...] (16 long) from a hash of each word."""
    rows = np.zeros((len(texts), 16), np.int32)
    for row, text in enumerate(texts):
        ids = [1 + sum(map(ord, word)) % 990 for word in text.split()][:14]
        rows[row, : len(ids) + 2] = [998, *ids, 999]
    return rows
