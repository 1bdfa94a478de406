"""SigLIP ViT-B/16 (Zhai et al. 2023): the pairwise sigmoid loss with a learned temperature
(initialised at 10) and bias (initialised at -10), Adam beta2 0.95 for stability, peak learning
rate 1e-3, weight decay 1e-4, global batch 32,768, a SentencePiece vocabulary of 32,000 and
64-token captions, pooled at the last token.

Command:   python train.py --config configs/siglip_b16.py --workdir gs://BUCKET/clip/siglip_b16
           (on every worker of the TPU VM; see docs/tpu.md and scripts/launch_tpu.sh)
Hardware:  sized for a Cloud TPU v4-512 slice (256 chips, 128 pairs per chip). The sigmoid loss
           needs no softmax over the global batch; loss.impl="ring" keeps its memory at
           O(local batch^2) per device for still larger batches.
Data:      data.name="synthetic" stands in until a real corpus is configured (docs/data.md);
           the SentencePiece model is trained at the start on the training captions.
"""

from __future__ import annotations

import math

import ml_collections

from clip_jax.training.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.name = "ViT-B-16"
    config.model.overrides.dtype = "bfloat16"
    config.model.overrides.scan_layers = True
    config.model.overrides.remat_policy = "dots_with_no_batch_dims_saveable"
    config.model.overrides.logit_scale_init = math.log(10.0)
    config.model.overrides.logit_bias_init = -10.0
    config.model.overrides.activation = "gelu"
    config.tokenizer.kind = "sentencepiece"
    config.tokenizer.vocab_size = 32000
    config.tokenizer.context_length = 64
    config.tokenizer.training_captions = 1_000_000
    config.loss.name = "sigmoid"
    config.loss.impl = "all_gather"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 5000
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 1e-4
    config.optimizer.grad_clip_norm = 1.0
    config.global_batch_size = 32768
    config.total_steps = 122_070  # 4B examples seen
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint.every_steps = 2000
    config.checkpoint.max_to_keep = 3
    config.checkpoint.keep_period = 50_000
    return config
