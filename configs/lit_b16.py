"""LiT ViT-B/16 (Zhai et al. 2022, "locked-image tuning"): a pre-trained image tower loaded from a
checkpoint and frozen ("^visual/"), a text tower trained from scratch to match it. Adam beta2 0.98,
peak learning rate 1e-3, weight decay 1e-4, global batch 32,768.

Command:   python train.py --config configs/lit_b16.py --workdir gs://BUCKET/clip/lit_b16 \\
               --config.init.checkpoint=/path/to/ViT-B-16.pt
           (an OpenAI or open_clip checkpoint, or a clip_jax model directory: anything
           clip_jax.load reads; its "visual/..." parameters are copied in at step 0.)
Hardware:  sized for a Cloud TPU v4-128 slice (64 chips, 512 pairs per chip): the frozen
           tower needs no gradients or optimizer state, so a step costs less than half of a
           full ViT-B/16 CLIP step (XLA's count: 5.3e10 against 1.2e11 FLOPs per pair).
Data:      data.name="synthetic" stands in until a real corpus is configured (docs/data.md).
"""

from __future__ import annotations

import ml_collections

from clip_jax.training.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.name = "ViT-B-16"
    config.model.overrides.dtype = "bfloat16"
    config.model.overrides.scan_layers = False  # as OpenAI's checkpoints store the blocks
    config.model.overrides.remat_policy = "dots_with_no_batch_dims_saveable"
    config.init.checkpoint = ""  # required: pass --config.init.checkpoint=...
    config.init.regex = "^visual/"
    config.optimizer.freeze_regex = "^visual/"
    config.tokenizer.kind = "clip"
    config.tokenizer.context_length = 77
    config.loss.name = "softmax"
    config.loss.max_logit_scale = 100.0
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 5000
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 1e-4
    config.optimizer.grad_clip_norm = 1.0
    config.global_batch_size = 32768
    config.total_steps = 60_000
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint.every_steps = 2000
    config.checkpoint.max_to_keep = 3
    return config
