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

from clip_jax.training.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    config = paper_config()
    config.model.name = "ViT-B-32"
    return config
