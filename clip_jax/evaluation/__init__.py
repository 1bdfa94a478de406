"""Evaluation of CLIPs: zero-shot classification, retrieval, linear and few-shot probes, and the
suite `evaluate.py` runs over datasets (see docs/evaluation.md).

The linear probe is `clip_jax.evaluation.linear_probe.linear_probe`: it is not re-exported here,
where its name would hide the module of the same name.
"""

from clip_jax.data.templates import DatasetPrompts, get_prompts
from clip_jax.evaluation.features import Encoder, extract_image_features, preprocess_images
from clip_jax.evaluation.linear_probe import few_shot, fit_logistic_regression, sample_few_shot
from clip_jax.evaluation.retrieval import retrieval_evaluate, retrieval_evaluate_model
from clip_jax.evaluation.zero_shot import (
    class_embeddings,
    class_probabilities,
    classification_metrics,
    zero_shot_classifier,
    zero_shot_evaluate,
    zero_shot_predict,
    zero_shot_scores,
)

__all__ = [
    "DatasetPrompts",
    "Encoder",
    "class_embeddings",
    "class_probabilities",
    "classification_metrics",
    "extract_image_features",
    "few_shot",
    "fit_logistic_regression",
    "get_prompts",
    "preprocess_images",
    "retrieval_evaluate",
    "retrieval_evaluate_model",
    "sample_few_shot",
    "zero_shot_classifier",
    "zero_shot_evaluate",
    "zero_shot_predict",
    "zero_shot_scores",
]
