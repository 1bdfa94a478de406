"""The one rule of a resume with changed settings (clip_jax.training.resume): each setting a
checkpoint depends on is compared with the checkpoint's record before its state is read, and a
change is refused in one line naming the setting and both values, or honoured and said in one
line; settings the checkpoint does not depend on change freely. (`train.py` end to end:
tests/test_damaged_checkpoints.py, test_a_changed_setting_is_refused_in_one_line_and_never_called_damage.)"""

from __future__ import annotations

import pytest
from run_helpers import default_config

from clip_jax.training import resume
from clip_jax.training.config import validate
from clip_jax.training.run_tokenizer import tokenizer_files_digest

STEP, WORKDIR = 6, "/runs/w"
SIGMOID = {"loss.name": "sigmoid", "model.overrides.logit_bias_init": -10.0}


def _settings(changes: dict):
    config = default_config()
    config.update_from_flattened_dict(changes)
    return validate(config, process_count=1)


def _check(before: dict, after: dict) -> list[str]:
    """check_resume of a checkpoint written with `before` (changes of the default config) by a run
    with `after`."""
    old, new = _settings(before), _settings(after)
    record = {"model": old.model.model_config().to_dict(), "tokenizer": {}, "training": old.record}
    return resume.check_resume(record, new.record, new.model.model_config().to_dict(), WORKDIR, STEP)


@pytest.mark.parametrize(
    "base, field, value",
    [
        ({}, "tokenizer.context_length", 24),
        ({}, "tokenizer.kind", "clip"),
        ({}, "tokenizer.vocab_size", 512),
        ({}, "tokenizer.model_type", "unigram"),
        ({}, "optimizer.freeze_regex", "^visual/"),
        ({}, "optimizer.grad_clip_norm", 0.0),  # clipping off: another optimizer state
        ({}, "loss.name", "caption"),
        (SIGMOID, "model.overrides.logit_bias_init", -5.0),  # SigLIP's bias: an initial value
        ({}, "init.checkpoint", "/pretrained"),
    ],
)
def test_a_change_the_checkpoint_cannot_follow_is_refused_in_one_line(base, field, value):
    old = _settings(base).record
    for key in field.split("."):
        old = old[key]
    after = {**base, field: value}
    if field == "loss.name":
        after["model.overrides.decoder"] = {"width": 32, "heads": 2, "layers": 1}
    with pytest.raises(resume.ResumeRefused) as refused:
        _check(base, after)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{field} is {old!r} in the checkpoint of step {STEP} and {value!r} now" in message, message
    assert "repair" not in message and "cannot be restored" not in message


@pytest.mark.parametrize(
    "base, field, value",
    [
        ({}, "optimizer.learning_rate", 0.001),
        ({}, "optimizer.grad_clip_norm", 2.0),  # still on: the same optimizer state
        ({}, "loss.max_logit_scale", 50.0),
        ({}, "loss.impl", "ring"),
        ({"ema.decay": 0.5}, "ema.decay", 0.9),
        ({}, "global_batch_size", 64),
        ({}, "mesh.data", 2),
        ({}, "model.overrides.dtype", "bfloat16"),
    ],
)
def test_a_change_the_checkpoint_can_follow_is_honoured_and_said_in_one_line(base, field, value):
    old = _settings(base).record
    for key in field.split("."):
        old = old[key]
    lines = _check(base, {**base, field: value})
    assert len(lines) == 1, lines
    assert f"{field} is {old!r} in the checkpoint of step {STEP} and {value!r} now" in lines[0], lines[0]


def test_another_model_is_refused_naming_what_differs():
    with pytest.raises(ValueError, match="another model .*vision.patch_size: 8 in the checkpoint, None now"):
        _check({}, {"model.name": "tiny-resnet"})


def test_settings_the_checkpoint_does_not_depend_on_change_freely():
    assert _check({}, {"log_every_steps": 7, "checkpoint.every_steps": 5, "eval.num_examples": 0}) == []
    # EMA on or off is honoured by setup, which says how it starts or drops the average
    # (tests/test_ema.py): no second line here.
    assert _check({}, {"ema.decay": 0.5}) == []


def test_a_replaced_sentencepiece_model_is_refused(tmp_path):
    workdir = str(tmp_path)
    model_file = tmp_path / "tokenizer.model"
    model_file.write_bytes(b"the pieces the run was trained with")
    settings = _settings({})
    tokenizer = {"type": "sentencepiece", "model_file": "tokenizer.model", "context_length": 16}
    record = {
        "model": settings.model.model_config().to_dict(),
        "tokenizer": tokenizer,
        "tokenizer_files": tokenizer_files_digest(tokenizer, workdir),
        "training": settings.record,
    }
    model_config = settings.model.model_config().to_dict()
    assert resume.check_resume(record, settings.record, model_config, workdir, STEP) == []
    model_file.write_bytes(b"other pieces of the same vocabulary size")
    with pytest.raises(resume.ResumeRefused, match=f"tokenizer file tokenizer.model .* step {STEP}"):
        resume.check_resume(record, settings.record, model_config, workdir, STEP)
