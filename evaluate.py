"""Evaluate a CLIP: `python evaluate.py --checkpoint PATH [--tasks ...] [--datasets ...] [--output DIR]`.

PATH is a training workdir of train.py, a converted model directory, an OpenAI `.pt` or an
open_clip / Hugging Face file (anything `clip_jax.load` reads). Writes results.json, results.md
and PNG plots into --output. Settings (tasks, dataset names) and --output (a writable directory, or
one that can be created) are checked before the model is loaded; a failure is one line (`error: ...`, exit status 1), the traceback only with --verbose. Only parses flags; the work is `clip_jax.evaluation.suite` and
`clip_jax.evaluation.report`. Examples:

    python evaluate.py --checkpoint ./workdir --tasks zero_shot,retrieval,linear_probe,few_shot
    python evaluate.py --checkpoint ViT-B-32.pt --preset robustness --data_dir ~/tensorflow_datasets
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Training workdir, model directory or checkpoint file.", required=True)
flags.DEFINE_string("model", None, "Model name for a PyTorch file whose architecture should not be read off shapes.")
flags.DEFINE_list("tasks", None, "Comma-separated: zero_shot, retrieval, linear_probe, few_shot (default: zero_shot).")
flags.DEFINE_list(
    "datasets", None,
    "Comma-separated: synthetic, synthetic_seen, coco_captions, or TFDS classification datasets "
    "(imagenet2012, imagenet_v2, imagenet_r, imagenet_a, imagenet_sketch, cifar10, ...). Default: synthetic.",
)  # fmt: skip
flags.DEFINE_enum("preset", None, ["robustness"], "robustness: zero-shot on ImageNet and ImageNet-V2/R/A/Sketch.")
flags.DEFINE_string("output", "results", "Directory for results.json, results.md and the plots.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (datasets must already be prepared there).")
flags.DEFINE_integer("batch_size", 256, "Images (or texts) embedded per step, split over the devices.")
flags.DEFINE_integer("max_examples", None, "Evaluate on at most this many test images per dataset.")
flags.DEFINE_integer("max_train_examples", 10_000, "Training images embedded for the linear / few-shot probes.")
flags.DEFINE_list("shots", ["1", "2", "4", "8", "16"], "Examples per class of the few-shot probes.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Few-shot sampling seeds.")
flags.DEFINE_list("prompt_modes", ["class_name", "single", "ensemble"], "Zero-shot prompt modes to score.")
flags.DEFINE_enum(
    "zero_shot_objective", "auto", ["auto", "contrastive", "caption", "bag_of_words"],
    "How zero-shot scores classes: embedding similarity, the caption decoder's likelihood of the prompts (CapPa) "
    "or the bag-of-words head's. auto: the objective the model was trained with (a training workdir's record), "
    "else the model's heads (a decoder: caption; a bag-of-words head only: bag_of_words).",
)  # fmt: skip
flags.DEFINE_integer(
    "examples", 8,
    "Test images of the first classification dataset pictured in the report with their top-5 zero-shot classes "
    "(and generated captions, for models with a caption decoder); 0: none.",
)  # fmt: skip
flags.DEFINE_enum("caption_method", "greedy", ["greedy", "beam"], "How the example captions are generated.")
flags.DEFINE_enum("tfds_reader", "auto", ["auto", "data_source", "tf_data"], "How TFDS datasets are read.")
flags.DEFINE_enum("tfds_image_decoder", "pipeline", ["pipeline", "tfds"], "Who decodes TFDS images.")
flags.DEFINE_enum(
    "tfds_worker_kind",
    None,
    ["process", "thread"],
    "Who decodes TFDS images (default: the data pipeline's); 'thread' where the data exists only in this process.",
)
flags.DEFINE_bool("plots", True, "Write PNG plots (needs matplotlib).")
flags.DEFINE_bool("verbose", False, "On failure, show the whole traceback, not one line.")
flags.DEFINE_bool(
    "trust_torchscript", False,
    "If --checkpoint is a TorchScript archive that cannot be read safely, load it with torch.jit.load, which "
    "RUNS ITS CODE: only for files you trust (OpenAI's usual .pt files need no such consent).",
)  # fmt: skip
flags.DEFINE_alias("trust-torchscript", "trust_torchscript")  # the spelling of python -m clip_jax.convert
flags.DEFINE_bool(
    "ema", True,
    "For a training workdir whose run kept a moving average of the parameters (config.ema): evaluate the "
    "average; --noema evaluates the trained parameters. Other checkpoints hold one set and ignore it.",
)  # fmt: skip


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from clip_jax.cli import one_line_errors

    with one_line_errors(FLAGS.verbose):
        _evaluate()


def _evaluate() -> None:
    from clip_jax.evaluation import report, suite

    preset = suite.PRESETS.get(FLAGS.preset, {})
    try:
        settings = suite.EvaluationSettings(
            tasks=tuple(FLAGS.tasks or preset.get("tasks", ("zero_shot",))),
            datasets=tuple(FLAGS.datasets or preset.get("datasets", ("synthetic",))),
            prompt_modes=tuple(FLAGS.prompt_modes),
            batch_size=FLAGS.batch_size,
            max_examples=FLAGS.max_examples,
            max_train_examples=FLAGS.max_train_examples,
            shots=tuple(int(k) for k in FLAGS.shots),
            seeds=tuple(int(seed) for seed in FLAGS.seeds),
            data_dir=FLAGS.data_dir,
            tfds_reader=FLAGS.tfds_reader,
            tfds_image_decoder=FLAGS.tfds_image_decoder,
            tfds_worker_kind=FLAGS.tfds_worker_kind,
            zero_shot_objective=FLAGS.zero_shot_objective,
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    if FLAGS.plots:
        report.check_plotting_available()

    import jax

    from clip_jax import paths
    from clip_jax.api import load

    if jax.process_index() == 0:  # the process that writes the report; before the (slow) work
        paths.check_output(FLAGS.output, directory=True, replace=True, setting="--output")
    model, variables, _, tokenizer = load(
        FLAGS.checkpoint, FLAGS.model, trust_torchscript=FLAGS.trust_torchscript, ema=FLAGS.ema,
        announce=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(
        f"Loaded {FLAGS.checkpoint}: {model.config.vision.image_size}px images, {jax.device_count()} devices",
        flush=True,
    )
    synthetic = None
    if any(name in suite.SYNTHETIC_DATASETS for name in settings.datasets):
        synthetic = suite.synthetic_dataset_for(
            _training_data_settings(FLAGS.checkpoint), model.config.vision.image_size
        )
    log = (lambda message: print(message, flush=True)) if jax.process_index() == 0 else (lambda message: None)
    trained = _trained_objectives(FLAGS.checkpoint)
    results = suite.run_evaluation(
        model, variables, tokenizer, settings, synthetic=synthetic, log=log, trained_objectives=trained
    )
    results = {"checkpoint": FLAGS.checkpoint, "settings": _settings_record(settings), **results}
    pictures = None
    if FLAGS.examples > 0:  # every process: the scores and captions run over all devices
        collected = suite.collect_examples(
            model, variables, tokenizer, settings, synthetic=synthetic, count=FLAGS.examples,
            trained_objectives=trained, caption_method=FLAGS.caption_method,
        )  # fmt: skip
        if collected is not None:
            results["examples"], pictures = collected
    if jax.process_index() == 0:
        for path in report.write_report(results, FLAGS.output, plots=FLAGS.plots, example_images=pictures):
            print(f"wrote {path}")


def _training_data_settings(path: str) -> dict | None:
    """The data settings recorded by the train.py run of a training workdir (None for any other
    model): the built-in dataset's seed and held-out combinations are evaluated as it trained."""
    from clip_jax.io import training_workdir

    if not training_workdir.is_training_workdir(path):
        return None
    _, record = training_workdir.read_run_record(path)
    return record.get("training", {}).get("data")


def _trained_objectives(path: str) -> list[str] | None:
    """[the zero-shot objective] that the record of the train.py run's objective (its recorded
    loss.name, clip_jax.losses.OBJECTIVES) names, for a training workdir; None for any other model."""
    from clip_jax import losses
    from clip_jax.io import training_workdir

    if not training_workdir.is_training_workdir(path):
        return None
    _, record = training_workdir.read_run_record(path)
    name = record.get("training", {}).get("loss", {}).get("name", "softmax")
    return [losses.get_objective(name).zero_shot]


def _settings_record(settings) -> dict:
    import dataclasses

    return {
        name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(settings).items()
    }


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    sys.exit(app.run(main))
