"""CLIP RN50 (OpenAI's ModifiedResNet-50 with attention pooling) with the paper's recipe
(Radford et al. 2021): AdamW (beta2 0.98, eps 1e-6, weight decay 0.2), 2,000 warmup steps then
cosine, global batch 32,768, temperature clamped at 100, 32 epochs of 400M pairs = 390,625 steps.

Command:   python train.py --config configs/rn50.py --workdir gs://BUCKET/clip/rn50
           (on every worker of the TPU VM; see docs/tpu.md and scripts/launch_tpu.sh)
Hardware:  sized for a Cloud TPU v4-256 slice (128 chips, 256 pairs per chip, pure data
           parallel) or 16 hosts of 8 A100/H100s.
Data:      data.name="synthetic" stands in until a real corpus is configured (docs/data.md).
"""

from __future__ import annotations

import ml_collections

from clip_jax.training.loop import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.name = "RN50"
    config.model.overrides.dtype = "bfloat16"
    config.model.overrides.scan_layers = True  # the text transformer's blocks
    config.model.overrides.remat_policy = "dots_with_no_batch_dims_saveable"
    config.train_batch_norm = True  # trained from scratch: BatchNorm learns its statistics
    config.tokenizer.kind = "clip"
    config.tokenizer.context_length = 77
    config.loss.name = "softmax"
    config.loss.max_logit_scale = 100.0
    config.optimizer.learning_rate = 5e-4
    config.optimizer.warmup_steps = 2000
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.2
    config.optimizer.grad_clip_norm = 0.0
    config.global_batch_size = 32768
    config.total_steps = 390_625
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint.every_steps = 2000
    config.checkpoint.max_to_keep = 3
    config.checkpoint.keep_period = 50_000
    return config
