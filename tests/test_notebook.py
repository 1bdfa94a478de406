"""examples/zero_shot.ipynb executes top to bottom in a fresh kernel, on a small model directory
(the model config and tokenizer train.py would make, random weights: the notebook's API is what is tested)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import linen as nn

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPOSITORY, "examples", "zero_shot.ipynb")


@pytest.fixture(scope="module")
def model_directory(tmp_path_factory):
    from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig
    from clip_jax.io.model_directory import save_model_directory
    from clip_jax.models import CLIP
    from clip_jax.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from clip_jax.training.config import validate
    from configs.default import get_config

    config = get_config()
    directory = tmp_path_factory.mktemp("notebook")
    captions = SyntheticShapes(SyntheticShapesConfig(image_size=32)).all_captions_sample(1000)
    tokenizer_path = train_sentencepiece(
        captions, int(config.tokenizer.vocab_size), str(directory / "spm.model"), hard_vocab_limit=False
    )
    tokenizer = SentencePieceTokenizer(tokenizer_path, int(config.tokenizer.context_length))
    model_config = validate(config).model.model_config(tokenizer)
    # Random values of the right shapes, drawn by numpy: running Flax's initialisers op by op costs
    # tens of seconds here, and any finite weights exercise the notebook's API.
    shapes = jax.eval_shape(lambda: nn.unbox(CLIP(model_config).init_variables(jax.random.key(0))))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), shapes)
    return save_model_directory(str(directory / "model"), model_config, variables, tokenizer)


def test_example_notebook_executes(model_directory, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel is a child process: it inherits these (and the 8 virtual devices of conftest).
    monkeypatch.setenv("CLIP_JAX_CHECKPOINT", model_directory)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPOSITORY])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "held-out classes:" in printed
    assert "->" in printed  # the one-liner's predictions
    for mode in ("class_name", "single", "ensemble"):
        assert f"{mode:>10}: top-1" in printed
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the example images and the similarity matrix
