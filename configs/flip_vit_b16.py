"""FLIP ViT-B/16 (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"): the CLIP
recipe of configs/vit_b16.py with half of each image's 196 patches dropped in training (the
paper's default masking ratio, 0.5: 98 patches and the class token reach the transformer), then
the last 3,906 steps (0.32 of the 32 epochs of 400M pairs at 32,768 per step, about 1% of the
schedule, as the paper's unmasked tuning) run unmasked. The paper's 0.75 trades more accuracy for a
further speed-up: --config.model.overrides.vision.patch_dropout=0.75.

Command:   python train.py --config configs/flip_vit_b16.py --workdir gs://BUCKET/clip/flip_b16
           (on every worker of the TPU VM; see docs/tpu.md and scripts/launch_tpu.sh)
Hardware:  sized for a Cloud TPU v4-512 slice, as vit_b16.py; at 0.5 the image tower costs about
           half as much per pair (docs/training.md, "Masked-patch training (FLIP)").
Data:      data.name="synthetic" stands in until a real corpus is configured (docs/data.md).
Differs:   the paper tunes unmasked in a run of its own (its own warmup and schedule); here the
           tuning is the tail of the one cosine schedule, at its small learning rates.
"""

from __future__ import annotations

import ml_collections

from clip_jax.training.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    config = paper_config()
    config.model.name = "ViT-B-16"
    config.model.overrides.vision.patch_dropout = 0.5
    config.unmasked_tuning_steps = 3_906
    return config
