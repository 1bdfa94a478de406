"""CLIP ViT-B/32 with the paper's recipe (Radford et al. 2021): AdamW (beta2 0.98, eps 1e-6,
weight decay 0.2), 2,000 warmup steps then cosine, global batch 32,768, temperature clamped at 100,
32 epochs of 400M pairs = 390,625 steps.

Command:   python train.py --config configs/vit_b32.py --workdir gs://BUCKET/clip/vit_b32
           (on every worker of the TPU VM; see docs/tpu.md and scripts/launch_tpu.sh)
Hardware:  sized for a Cloud TPU v4-256 slice (128 chips, 256 pairs per chip, pure data
           parallel) or 16 hosts of 8 H100s (256 pairs per GPU). Smaller slices: lower
           global_batch_size or raise accumulation_steps (exact for the contrastive loss).
Data:      data.name="synthetic" stands in until a real corpus is configured (docs/data.md).
"""

from __future__ import annotations

import ml_collections

from clip_jax.training.loop import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.name = "ViT-B-32"
    config.model.overrides.dtype = "bfloat16"  # compute; parameters stay float32
    config.model.overrides.scan_layers = True  # one compiled block per tower: fast compiles
    config.model.overrides.remat_policy = "dots_with_no_batch_dims_saveable"
    config.tokenizer.kind = "clip"  # OpenAI's byte-level BPE, 49,408 tokens
    config.tokenizer.context_length = 77
    config.loss.name = "softmax"
    config.loss.max_logit_scale = 100.0
    config.optimizer.learning_rate = 5e-4
    config.optimizer.warmup_steps = 2000
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.2
    config.optimizer.grad_clip_norm = 0.0  # the paper does not clip
    config.global_batch_size = 32768
    config.total_steps = 390_625
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint.every_steps = 2000
    config.checkpoint.max_to_keep = 3
    config.checkpoint.keep_period = 50_000
    return config
