"""CLIP ViT-L/14 with the paper's recipe (Radford et al. 2021): AdamW (beta2 0.98, eps 1e-6,
weight decay 0.2), 2,000 warmup steps then cosine at a peak learning rate of 4e-4, global batch
32,768, temperature clamped at 100, 32 epochs of 400M pairs = 390,625 steps.

Command:   python train.py --config configs/vit_l14.py --workdir gs://BUCKET/clip/vit_l14
           (on every worker of the TPU VM; see docs/tpu.md and scripts/launch_tpu.sh)
Hardware:  sized for a Cloud TPU v5p-1024 slice (512 chips, 64 pairs per chip) with parameters
           and optimizer state sharded 8 ways (FSDP) and whole blocks rematerialised.
Data:      data.name="synthetic" stands in until a real corpus is configured (docs/data.md).
"""

from __future__ import annotations

import ml_collections

from clip_jax.training.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    config = paper_config()
    config.model.name = "ViT-L-14"
    config.model.overrides.remat_policy = "full"  # 257 tokens x 24 layers of width 1024
    config.mesh.fsdp = 8  # parameters and optimizer state sharded over 8 devices
    config.optimizer.learning_rate = 4e-4
    config.checkpoint.every_steps = 1000
    return config
