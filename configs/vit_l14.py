"""CLIP ViT-L/14 with the paper's recipe (Radford et al. 2021): AdamW (beta2 0.98, eps 1e-6,
weight decay 0.2), 2,000 warmup steps then cosine at a peak learning rate of 4e-4, global batch
32,768, temperature clamped at 100, 32 epochs of 400M pairs = 390,625 steps.

Command:   python train.py --config configs/vit_l14.py --workdir gs://BUCKET/clip/vit_l14
           (on every worker of the TPU VM; see docs/tpu.md and scripts/launch_tpu.sh)
Hardware:  sized for a Cloud TPU v5p-1024 slice (512 chips, 64 pairs per chip, pure data
           parallel): no rematerialisation is needed there (python -m clip_jax.aot --recipes: 60 GB
           of a v5p chip's 95 GiB; docs/tpu.md). On chips with less memory, shard the parameters and
           optimizer state and recompute whole blocks: --config.mesh.fsdp=8
           --config.model.overrides.remat_policy=full (4.2 GB per chip on the same slice).
Data:      data.name="synthetic" stands in until a real corpus is configured (docs/data.md).
"""

from __future__ import annotations

import ml_collections

from clip_jax.training.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    config = paper_config()
    config.model.name = "ViT-L-14"
    # 257 tokens x 24 layers of width 1024 at 64 pairs per chip fit a v5p chip with every activation
    # kept: no recomputation (python -m clip_jax.aot --fit found it the cheapest that fits).
    config.model.overrides.remat_policy = "none"
    config.optimizer.learning_rate = 4e-4
    config.checkpoint.every_steps = 1000
    return config
