"""Model specifications: frozen dataclasses describing a CLIP's towers, serialisable to JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu")
TEXT_POOLINGS = ("argmax", "last")
REMAT_POLICIES = (
    "none",  # no rematerialisation: store every activation
    "full",  # recompute the whole block in the backward pass
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
)
DTYPES = ("float32", "bfloat16", "float16")
# "auto": cuDNN's fused (flash) attention on GPU with a 16-bit compute dtype, XLA's otherwise.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """An image tower: a ViT when `patch_size` is set, OpenAI's ModifiedResNet otherwise."""

    image_size: int = 224
    width: int = 768
    # ViT: number of residual blocks. ResNet: blocks per stage, e.g. (3, 4, 6, 3).
    layers: int | tuple[int, ...] = 12
    heads: int | None = None  # default: width // 64 (ViT), width * 32 // 64 (ResNet)
    patch_size: int | None = 32
    mlp_ratio: float = 4.0
    # FLIP (Li et al. 2023): the fraction of patch tokens a ViT drops per image while training
    # (clip_jax.models.vit); evaluation and saved models always see every patch.
    patch_dropout: float = 0.0

    @property
    def is_vit(self) -> bool:
        return self.patch_size is not None

    @property
    def num_heads(self) -> int:
        if self.heads is not None:
            return self.heads
        return self.width // 64 if self.is_vit else self.width * 32 // 64

    def validate(self) -> None:
        p = self.patch_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"vision patch_dropout must be a number in [0, 1); got {p!r}")
        if p and not self.is_vit:
            raise ValueError(f"vision patch_dropout {p!r} needs a ViT; a ResNet image tower has no patch tokens")
        if self.is_vit:
            if not isinstance(self.layers, int):
                raise ValueError(f"ViT layers must be an int, got {self.layers!r}")
            if self.image_size % self.patch_size:
                raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
            if self.width % self.num_heads:
                raise ValueError(f"vision width {self.width} not divisible by heads {self.num_heads}")
        else:
            if isinstance(self.layers, int) or len(self.layers) != 4:
                raise ValueError(f"ResNet layers must be 4 stage depths, got {self.layers!r}")
            if self.image_size % 32:
                raise ValueError(f"ResNet image_size {self.image_size} is not a multiple of 32")
            if (self.width * 32) % self.num_heads:
                raise ValueError(
                    f"ResNet attention-pool width {self.width * 32} not divisible by heads {self.num_heads}"
                )


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A causal text transformer pooled at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    # "argmax": pool where the id is largest (the EOT of the CLIP BPE, id 49407).
    # "last": pool at the last token that is not `pad_id` (SentencePiece vocabularies).
    pooling: str = "argmax"
    pad_id: int = 0

    def validate(self) -> None:
        if self.pooling not in TEXT_POOLINGS:
            raise ValueError(f"unknown text pooling {self.pooling!r}; expected one of {TEXT_POOLINGS}")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} not divisible by heads {self.heads}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A caption decoder (clip_jax.models.decoder): causal self-attention over the caption and
    cross-attention to the image tower's tokens, predicting the text tower's vocabulary (CoCa's
    multimodal decoder, CapPa's decoder). Its vocabulary and length are the text config's."""

    width: int = 512
    heads: int = 8
    layers: int = 6
    mlp_ratio: float = 4.0

    def validate(self) -> None:
        for field in ("width", "heads", "layers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"decoder {field} must be a positive int; got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"decoder width {self.width} not divisible by heads {self.heads}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP: both towers, the shared embedding size and the numerics."""

    embed_dim: int = 512
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    activation: str = "quick_gelu"
    logit_scale_init: float = 2.6592600345611572  # ln(1 / 0.07)
    logit_bias_init: float | None = None  # set (e.g. -10) for SigLIP's learned bias
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_implementation: str = "auto"
    # Captioning objectives (clip_jax.losses): a decoder predicting the caption from the image's
    # tokens (None: none), and a linear head predicting the caption's bag of words from the pooled
    # image embedding over the text vocabulary.
    decoder: DecoderConfig | None = None
    bag_of_words: bool = False

    def validate(self) -> CLIPConfig:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention_implementation {self.attention_implementation!r}; "
                f"expected one of {ATTENTION_IMPLEMENTATIONS}"
            )
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}; expected one of {DTYPES}")
        self.vision.validate()
        self.text.validate()
        if not isinstance(self.bag_of_words, bool):
            raise ValueError(f"bag_of_words must be True or False; got {self.bag_of_words!r}")
        if self.decoder is not None:
            if not isinstance(self.decoder, DecoderConfig):
                raise ValueError(f"decoder must be a DecoderConfig or None; got {self.decoder!r}")
            self.decoder.validate()
            if not self.vision.is_vit:
                raise ValueError("a caption decoder needs a ViT image tower (it attends to the patch tokens)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        data = dict(data)
        vision = dict(data.pop("vision", {}))
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        text = dict(data.pop("text", {}))
        if data.get("decoder") is not None:
            data["decoder"] = DecoderConfig(**data["decoder"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields {sorted(unknown)}")
        return cls(vision=VisionConfig(**vision), text=TextConfig(**text), **data).validate()

    def replace(self, **overrides: Any) -> CLIPConfig:
        """A copy with top-level fields replaced; `vision`/`text` may be dicts of partial overrides."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown model override(s) {sorted(unknown)}; known fields: {sorted(known)}")
        for tower in ("vision", "text"):
            if isinstance(overrides.get(tower), dict):
                overrides[tower] = dataclasses.replace(getattr(self, tower), **overrides[tower])
        if isinstance(overrides.get("decoder"), dict):  # partial over the current decoder, or the defaults
            overrides["decoder"] = dataclasses.replace(self.decoder or DecoderConfig(), **overrides["decoder"])
        return dataclasses.replace(self, **overrides).validate()
