"""`clip_jax.io.load_any`, the one entry for every model format: a model directory, a training
workdir, an open_clip state-dict file and a transformers directory, each written from one tiny
model in a temporary directory, load through it as the format's own reader loads them, and as
`clip_jax.load` returns them."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import clip_jax
from clip_jax import convert
from clip_jax.io import load_any, model_directory, openclip_layout, torch_checkpoint, training_workdir
from clip_jax.tokenizer import ClipTokenizer
from clip_jax.training import checkpointing


def _tiny_model():
    config = clip_jax.get_model_config(
        "tiny-vit", text={"context_length": 77, "vocab_size": 49408}, activation="quick_gelu"
    )
    variables = jax.tree.map(np.asarray, nn.unbox(clip_jax.CLIP(config).init_variables(jax.random.key(3))))
    return config, variables


def _flat(variables) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(nn.unbox(dict(variables)))))


def _assert_same(expected, actual) -> None:
    """The same config, tokenizer kind and variables, bit for bit."""
    (expected_config, expected_variables, expected_tokenizer), (config, variables, tokenizer) = expected, actual
    assert config == expected_config
    assert type(tokenizer) is type(expected_tokenizer) and tokenizer.context_length == expected_tokenizer.context_length
    expected_flat, flat = _flat(expected_variables), _flat(variables)
    assert sorted(flat) == sorted(expected_flat)
    for path, value in expected_flat.items():
        assert flat[path].dtype == value.dtype and flat[path].shape == value.shape, path
        np.testing.assert_array_equal(flat[path], value, err_msg="/".join(path))


def _training_workdir(directory, config, variables, tokenizer) -> str:
    """A workdir as train.py leaves it: one checkpoint (state, progress, run record) and the
    tokenizer's files."""
    workdir = str(directory)
    checkpointer = checkpointing.TrainingCheckpointer(workdir, async_save=False)
    record = {"model": config.to_dict(), "tokenizer": tokenizer.to_config(), "training": {}}
    checkpointer.save(4, {"params": variables["params"], "step": np.int32(4)}, {"step": 4}, record, force=True)
    checkpointer.close()
    for asset in tokenizer.asset_files():
        shutil.copy(asset, directory)
    return workdir


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


def test_load_any_reads_a_model_directory_as_its_reader_does(tmp_path, tiny):
    config, variables = tiny
    path = model_directory.save_model_directory(str(tmp_path / "model"), config, variables, ClipTokenizer())
    expected = (*model_directory.load_model_directory(path), model_directory.load_tokenizer(path))
    _assert_same(expected, load_any(path))
    _assert_same((config, variables, ClipTokenizer()), load_any(path))


def test_load_any_reads_a_training_workdir_as_its_reader_does(tmp_path, tiny):
    config, variables = tiny
    workdir = _training_workdir(tmp_path / "workdir", config, variables, ClipTokenizer())
    expected = training_workdir.load_training_workdir(workdir)
    _assert_same(expected, load_any(workdir))
    _assert_same((config, variables, ClipTokenizer()), load_any(workdir))


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_load_any_reads_an_open_clip_file_as_its_reader_does(tmp_path, tiny, name):
    config, variables = tiny
    path = str(tmp_path / name)
    convert.save_state_dict(openclip_layout.variables_to_openclip(variables, config), path)
    expected_config, expected_variables = torch_checkpoint.load_checkpoint(path, activation="quick_gelu")
    expected = (expected_config, expected_variables, torch_checkpoint.checkpoint_tokenizer(path, 77))
    _assert_same(expected, load_any(path, activation="quick_gelu"))
    # The model config read off the shapes counts heads its own way: given the model's, the same model comes back.
    _assert_same((config, variables, ClipTokenizer()), load_any(path, config))


def test_load_any_reads_a_transformers_directory_as_its_reader_does(tmp_path, tiny):
    config, variables = tiny
    path = convert.export_to_hf(str(tmp_path / "hf"), config, variables, ClipTokenizer())
    expected_config, expected_variables = torch_checkpoint.load_checkpoint(path)
    expected = (expected_config, expected_variables, torch_checkpoint.checkpoint_tokenizer(path, 77))
    loaded = load_any(path)
    _assert_same(expected, loaded)
    np.testing.assert_array_equal(_flat(loaded[1])[("params", "logit_scale")], variables["params"]["logit_scale"])


def test_clip_jax_load_is_load_any_with_the_model_around_it(tmp_path, tiny):
    config, variables = tiny
    path = model_directory.save_model_directory(str(tmp_path / "model"), config, variables, ClipTokenizer())
    model, loaded, preprocess, tokenizer = clip_jax.load(path)
    assert isinstance(model, clip_jax.CLIP) and callable(preprocess)
    _assert_same(load_any(path), (model.config, loaded, tokenizer))


def test_load_any_names_a_path_that_holds_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory or checkpoint file at .*missing"):
        load_any(str(tmp_path / "missing"))


def test_lit_initialisation_reads_through_load_any(tmp_path, tiny):
    """config.init.checkpoint (LiT): the matched parameters of a new run's state come from the
    checkpoint as load_any reads it (here a model directory), the others stay as initialised."""
    import optax

    from clip_jax import sharding
    from clip_jax.training.setup import load_pretrained_params
    from clip_jax.training.state import create_train_state

    config, variables = tiny
    path = model_directory.save_model_directory(str(tmp_path / "pretrained"), config, variables, ClipTokenizer())
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    state, shardings = create_train_state(clip_jax.CLIP(config), optax.sgd(0.1), 11, mesh)
    fresh = _flat({"params": state.params})
    loaded = _flat({"params": load_pretrained_params(state, shardings, path, "^visual/").params})
    _, pretrained, _ = load_any(path)
    pretrained = _flat(pretrained)
    assert any(path[1] == "visual" for path in loaded) and any(path[1] == "text" for path in loaded)
    patch = ("params", "visual", "patch_embedding")
    assert not np.array_equal(fresh[patch], pretrained[patch])  # the two inits differ: the test can fail
    for path, value in loaded.items():
        np.testing.assert_array_equal(value, pretrained[path] if path[1] == "visual" else fresh[path])
