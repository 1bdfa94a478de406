"""Settings written once (clip_jax.settings_schema): the ConfigDict made from the dataclasses is
the schema the recipes, the command line, resume's rules and saved records know; the reader
coerces as the command line needs and refuses a wrong type in one line naming the field; any
model field can be set from train.py's command line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from clip_jax.data.config import DataSettings, data_settings, default_data_config
from clip_jax.training.config import base_config, paper_config, validate

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The schema as base_config() wrote it by hand before it was made from the dataclasses: every
# path, name and default. Written out here, not computed, so that a change to it is seen.
SCHEMA = {
    "seed": 0,
    "global_batch_size": 256,
    "accumulation_steps": 1,
    "total_steps": 1000,
    "unmasked_tuning_steps": 0,
    "train_batch_norm": False,
    "log_every_steps": 50,
    "eval_every_steps": 1000,
    "model": {
        "name": "tiny-vit",
        "overrides": {
            "dtype": "float32",
            "scan_layers": False,
            "remat_policy": "none",
            "attention_implementation": "auto",
            "vision": {"patch_dropout": 0.0},
        },
    },
    "loss": {
        "name": "softmax",
        "impl": "all_gather",
        "max_logit_scale": 100.0,
        "caption_weight": 2.0,
        "contrastive_weight": 1.0,
    },
    "optimizer": {
        "learning_rate": 0.0005,
        "warmup_steps": 2000,
        "b1": 0.9,
        "b2": 0.98,
        "eps": 1e-06,
        "weight_decay": 0.2,
        "no_decay_regex": "(bias|norm|scale|embedding|logit_scale|logit_bias)",
        "grad_clip_norm": 1.0,
        "freeze_regex": "",
    },
    "nonfinite": {"policy": "skip", "max_consecutive_skips": 10},
    "mesh": {"data": -1, "fsdp": 1, "model": 1, "dcn_data": -1},
    "ema": {"decay": 0.0, "warmup": True},
    "data": {
        "name": "synthetic",
        "seed": 0,
        "prefetch_batches": 2,
        "num_workers": 0,
        "worker_kind": "process",
        "min_image_size": 10,
        "max_image_pixels": 50_000_000,
        "max_aspect_ratio": 10.0,
        "crop_scale": (0.9, 1.0),
        "reduced_jpeg_decoding": True,
        "tfds": {
            "name": "",
            "split": "train",
            "data_dir": "",
            "image_key": "image",
            "text_key": "",
            "reader": "auto",
            "image_decoder": "pipeline",
            "shuffle_buffer": 10_000,
        },
        "webdataset": {
            "shards": "",
            "image_extensions": "jpg,jpeg,png,webp",
            "text_extension": "txt",
            "shards_per_window": 4,
            "max_member_bytes": 67_108_864,
            "max_caption_bytes": 65_536,
            "max_shard_bytes": 4_294_967_296,
        },
        "num_held_out": 16,
    },
    "tokenizer": {
        "kind": "sentencepiece",
        "vocab_size": 256,
        "model_type": "bpe",
        "context_length": 16,
        "training_captions": 20000,
    },
    "eval": {
        "num_examples": 512,
        "tasks": "zero_shot",
        "datasets": "synthetic",
        "prompt_modes": "class_name,single,ensemble",
        "data_dir": "",
    },
    "init": {"checkpoint": "", "regex": "^visual/", "trust_torchscript": False},
    "checkpoint": {"every_steps": 1000, "max_to_keep": 3, "keep_period": 0, "async_save": True},
}


def _key_order(tree):
    return [(key, _key_order(value)) for key, value in tree.items()] if isinstance(tree, dict) else None


def test_the_schema_made_from_the_dataclasses_is_the_one_written_by_hand():
    schema = base_config().to_dict()
    assert schema == SCHEMA
    # The order a saved record and its JSON show (to_dict sorts the keys).
    assert _key_order(json.loads(base_config().to_json_best_effort())) == _key_order(SCHEMA)
    assert default_data_config().to_dict() == SCHEMA["data"]


def test_the_paper_recipe_is_its_difference_from_the_schema():
    expected = copy.deepcopy(SCHEMA)
    expected["model"]["overrides"].update(
        dtype="bfloat16", scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"
    )
    expected["tokenizer"].update(kind="clip", context_length=77)
    expected["optimizer"]["grad_clip_norm"] = 0.0
    expected.update(global_batch_size=32768, total_steps=390_625, log_every_steps=100, eval_every_steps=5000)
    expected["checkpoint"].update(every_steps=2000, keep_period=50_000)
    assert paper_config().to_dict() == expected


def small_config():
    config = base_config()
    config.total_steps, config.optimizer.warmup_steps = 100, 10
    return config


def test_the_reader_coerces_as_the_command_line_needs():
    config = small_config()
    config.optimizer.learning_rate = 1  # --config.optimizer.learning_rate=1 parses as an int
    config.ema.decay = 0
    config.data.crop_scale = [0.5, 1]  # a JSON record holds a list
    config.data.webdataset.image_extensions = " png, jpg ,"
    config.eval.tasks = "zero_shot,retrieval"
    settings = validate(config, process_count=1)
    assert settings.optimizer.learning_rate == 1.0 and isinstance(settings.optimizer.learning_rate, float)
    assert settings.optimizer.total_steps == 100  # the top-level field, given to the optimizer
    assert isinstance(settings.ema.decay, float)
    assert settings.data.crop_scale == (0.5, 1.0) and isinstance(settings.data.crop_scale[1], float)
    assert settings.data.webdataset.image_extensions == ("png", "jpg")
    assert settings.eval.suite.tasks == ("zero_shot", "retrieval")
    assert settings.eval.suite.data_dir is None  # "" = TFDS's default
    assert settings.eval.suite.batch_size == settings.step.global_batch_size == 256
    assert settings.step.optimizer is settings.optimizer
    assert json.loads(json.dumps(settings.record)) == settings.record


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("optimizer.b1", "x", "optimizer.b1 must be a number; got 'x'"),
        ("loss.max_logit_scale", "big", "loss.max_logit_scale must be a number; got 'big'"),
        ("global_batch_size", 2.5, "global_batch_size must be an int; got 2.5"),
        ("ema.warmup", "yes", "ema.warmup must be True or False; got 'yes'"),
        ("data.num_workers", 1.5, "data.num_workers must be an int; got 1.5"),
        ("data.tfds.shuffle_buffer", "big", "data.tfds.shuffle_buffer must be an int; got 'big'"),
        ("data.crop_scale", (0.5,), "data.crop_scale must be 2 values; got (0.5,)"),
        ("data.name", "laion", "unknown data.name 'laion'; expected one of ('synthetic', 'tfds', 'webdataset')"),
        ("init.checkpoint", None, "init.checkpoint must be a string; got None"),
    ],
)
def test_a_wrong_type_is_one_line_naming_the_field(path, value, message):
    config = small_config()
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.ignore_type():
        node[last] = value
    with pytest.raises(ValueError) as error:
        validate(config, process_count=1)
    assert str(error.value) == message


def test_model_overrides_are_checked_against_the_model_config_types():
    config = small_config()
    config.model.overrides.text = {"width": "wide"}
    with pytest.raises(ValueError, match=r"^model.overrides.text.width must be an int; got 'wide'$"):
        validate(config, process_count=1)
    config = small_config()
    config.model.overrides.text = {"widht": 64}
    with pytest.raises(ValueError, match=r"^model.overrides.text.widht is not a field of TextConfig; its fields are"):
        validate(config, process_count=1)
    config = small_config()
    config.model.overrides.txt = {"width": 64}  # the model's own check says it
    with pytest.raises(ValueError, match=r"^unknown model override\(s\) \['txt'\]"):
        validate(config, process_count=1)
    config = small_config()
    config.model.overrides.embed_dim = 32  # an int where CLIPConfig wants one; a float for a float
    config.model.overrides.logit_scale_init = 2
    config.model.overrides.vision.layers = [1, 1, 1, 1]
    config.model.name = "tiny-resnet"
    settings = validate(config, process_count=1)
    assert settings.model.overrides["vision"]["layers"] == (1, 1, 1, 1)
    assert settings.model.model_config().logit_scale_init == 2.0 and settings.model.model_config().embed_dim == 32


def test_the_data_modules_take_data_settings():
    config = default_data_config()
    config.seed = 3
    settings = data_settings(config)
    assert isinstance(settings, DataSettings) and settings.seed == 3
    assert data_settings(settings) is settings
    assert DataSettings() == data_settings(default_data_config())


def _train_flags(*arguments: str) -> subprocess.CompletedProcess:
    """train.py's flags parsed as its command line does (cli.parse_flags), the settings validated
    and their model printed as JSON; no training."""
    script = f"""
import dataclasses, json, sys
sys.path.insert(0, {REPOSITORY!r})
sys.argv = ["train.py", *{list(arguments)!r}]
import train
from clip_jax import cli
from clip_jax.training.config import validate
cli.parse_flags(sys.argv)
with cli.one_line_errors(False):  # as train.py's main reports a failure
    settings = validate(train.FLAGS.config, process_count=1)
model_config = settings.model.model_config()
print(json.dumps({{"overrides": settings.record["model"]["overrides"], "decoder": model_config.decoder and dataclasses.asdict(model_config.decoder), "text_layers": model_config.text.layers}}))
"""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPOSITORY}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPOSITORY, env=environment
    )


def test_any_model_field_is_set_from_train_py_flags():
    completed = _train_flags(
        "--config.loss.name=caption",
        "--config.model.overrides.decoder.layers=2",
        "--config.model.overrides.decoder.width=64",
        "--config.model.overrides.decoder.heads=2",
        "--config.model.overrides.text.layers=1",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    model = json.loads(completed.stdout.strip().splitlines()[-1])
    assert model["decoder"] == {"width": 64, "heads": 2, "layers": 2, "mlp_ratio": 4.0}  # the rest: the defaults
    assert model["text_layers"] == 1
    # The record holds only what was set: an unset field is the registry model's value.
    assert model["overrides"]["decoder"] == {"layers": 2, "width": 64, "heads": 2}
    assert model["overrides"]["text"] == {"layers": 1}


def test_a_recipe_that_sets_the_decoder_is_changed_field_by_field_from_flags():
    completed = _train_flags(
        f"--config={os.path.join(REPOSITORY, 'configs', 'coca_vit_b32.py')}",
        "--config.model.overrides.decoder.layers=2",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    model = json.loads(completed.stdout.strip().splitlines()[-1])
    assert model["decoder"]["layers"] == 2 and model["decoder"]["width"] == 512


@pytest.mark.parametrize(
    "argument, message",
    [
        (
            "--config.model.overrides.decoder.layerz=2",
            "error: --config.model.overrides.decoder.layerz: model.overrides.decoder has no field 'layerz'; "
            "its fields are width, heads, layers, mlp_ratio",
        ),
        ("--config.model.overrides.decoder.layers=0", "error: decoder layers must be a positive int; got 0"),
    ],
)
def test_a_wrong_model_flag_is_one_line_naming_it(argument, message):
    completed = _train_flags("--config.loss.name=caption", argument)
    assert completed.returncode == 1
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
