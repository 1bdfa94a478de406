"""CLIP models for the experiments, trained in-process by the project's own training entry point
(`clip_jax.training.loop.train_and_evaluate`) from the recipe of configs/default.py, each in a
workdir under the output directory. A workdir whose run finished with the same config is reused
(so `all` trains each model once); one with a different config is refused, never overwritten.

With clip_jax/aot/compile.py, the one module of the package outside clip_jax/training/ that
imports it (tests/test_import_layers.py): the experiments drive training runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from clip_jax.io import training_workdir
from clip_jax.models import CLIP
from clip_jax.training.loop import train_and_evaluate

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs", "default.py")
DONE_FILE = "experiment_done.json"  # written once the run reached total_steps: its config


def default_recipe() -> ml_collections.ConfigDict:
    """configs/default.py's get_config(): the tiny CLIP that `python train.py` trains."""
    if not os.path.isfile(DEFAULT_RECIPE):
        raise FileNotFoundError(f"the default recipe {DEFAULT_RECIPE} is missing: run from a clip_jax checkout")
    spec = importlib.util.spec_from_file_location("clip_jax_default_recipe", DEFAULT_RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def experiment_config(quick: bool, seed: int = 0, **fields: Any) -> ml_collections.ConfigDict:
    """The default recipe without evaluation during training (the experiments evaluate), one
    checkpoint at the end, and `fields` ("loss.name" = "caption", ...) set; `quick`: a 16-step run
    of batch 32, a smoke test only."""
    config = default_recipe()
    config.seed = seed
    config.eval.num_examples = 0
    if quick:
        config.total_steps = 16
        config.global_batch_size = 32
        config.tokenizer.training_captions = 1000
        config.log_every_steps = 8
    config.checkpoint.every_steps = config.total_steps
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def trained_workdir(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> str:
    """`workdir` holding the finished run of `config`: reused when it is there, trained (or resumed)
    otherwise."""
    wanted = json.loads(config.to_json_best_effort())
    done_path = os.path.join(workdir, DONE_FILE)
    if os.path.isfile(done_path):
        with open(done_path, encoding="utf-8") as file:
            finished = json.load(file)
        if finished != wanted:
            raise ValueError(f"{workdir} holds a finished run of another config; delete it or choose another --output")
        log(f"reusing the finished run in {workdir}")
        return workdir
    log(f"training CLIP ({config.total_steps} steps of {config.global_batch_size}) into {workdir}")
    train_and_evaluate(config, workdir)
    with open(done_path, "w", encoding="utf-8") as file:
        json.dump(wanted, file, indent=1, sort_keys=True)
    return workdir


def load_clip(workdir: str, step: int | None = None) -> tuple[CLIP, dict[str, Any], Any]:
    """(model, variables, tokenizer) of a training workdir's newest checkpoint, or of `step`."""
    config, variables, tokenizer = training_workdir.load_training_workdir(workdir, step=step, announce=lambda _: None)
    return CLIP(config), variables, tokenizer
