"""CoCa ViT-B/32 (Yu et al. 2022), as open_clip's coca_ViT-B-32: CLIP's towers and recipe plus a
caption decoder (width 512, 8 heads, 12 blocks, each with cross-attention to the ViT's tokens);
loss = 1 x the softmax contrastive loss + 2 x the caption loss (open_clip's weights).

Command:   python train.py --config configs/coca_vit_b32.py --workdir gs://BUCKET/clip/coca_b32
           (on every worker of the TPU VM; see docs/tpu.md and scripts/launch_tpu.sh)
Hardware:  as configs/vit_b32.py, with the decoder's cost on top: its (batch, 77, 49,408) float32
           logits are the largest activation, so raise accumulation_steps before the batch drops
           (GradCache keeps the contrastive loss exact; the caption loss needs no other example).
Data:      data.name="synthetic" stands in until a real corpus is configured (docs/data.md).
Not here:  CoCa's attentional poolers (the decoder attends to every ViT token) and its unimodal /
           multimodal split of one text transformer (the text tower and the decoder are separate).
"""

from __future__ import annotations

import ml_collections

from clip_jax.training.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    config = paper_config()
    config.model.name = "ViT-B-32"
    config.model.overrides.decoder = {"width": 512, "heads": 8, "layers": 12}
    config.loss.name = "coca"
    config.loss.caption_weight = 2.0
    config.loss.contrastive_weight = 1.0
    return config
