"""Tiny CLIP on the built-in synthetic coloured-shapes dataset: the run `python train.py` does.

Command:   python train.py                      (same as --config configs/default.py --workdir ./workdir)
Hardware:  sized for a laptop CPU: about 5 minutes on 2 cores (4 min 45 s to 6 min 19 s measured on a
           2-core machine shared with other jobs), where it reaches a zero-shot top-1 of 10 to 12x
           chance (0.63 to 0.74 over three runs, against 1/16) on the 16 colour x shape combinations
           it never saw in training.
Shorter:   python train.py --workdir /tmp/clip_smoke --config.total_steps=20
"""

from __future__ import annotations

import ml_collections

from clip_jax.training.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.name = "tiny-vit"  # 32 px images, 8 px patches, two-layer towers of width 64
    config.global_batch_size = 128
    config.total_steps = 1500
    config.optimizer.learning_rate = 2e-3
    # A fraction of the run, so a shortened run (--config.total_steps=20) still has a valid schedule.
    config.optimizer.warmup_steps = config.get_ref("total_steps") // 15
    config.optimizer.weight_decay = 0.1
    config.tokenizer.vocab_size = 256
    config.tokenizer.context_length = 16
    config.log_every_steps = 25
    config.eval_every_steps = 250
    config.checkpoint.every_steps = 250
    return config
