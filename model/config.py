"""Model configuration: the typed schema for the `model` section of the training config.

Only int/float/str/bool fields so that `OmegaConf.structured(ModelConfig)` can merge YAML and
CLI overrides into it. Validated like every schema (`common.config.validate`): by `load_config` as part of the
training config, and by `as_model_config` where a model is built from a config alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError, check, validate

# (width, depth, heads) of the encoder. A plain explicit mapping, not a registry: the published ViT sizes are
# all the project trains. giant is V-JEPA 2's ViT-g (its vit_giant; the xformers variant has 22 heads: heads=22).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "giant": (1408, 40, 16),
}
# MLP hidden width / width of the encoder blocks, where not 4: ViT-g's 48/11 gives 1408 -> 6144
MLP_RATIOS: dict[str, float] = {"giant": 48 / 11}


@dataclass
class ModelConfig:
    """Encoder and predictor shape. Defaults give ViT-tiny/16 on 16x224x224 clips.

    The token grid is (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size),
    i.e. 8 x 14 x 14 = 1568 tokens for the defaults.
    """

    size: str = "tiny"  # tiny | small | base | large | huge | giant (see VIT_SIZES)
    # Encoder shape overrides, 0 = the size's value: for models below the published sizes (CPU runs).
    width: int = 0
    depth: int = 0
    heads: int = 0
    img_size: int = 224
    num_frames: int = 16
    patch_size: int = 16
    tubelet_size: int = 2
    predictor_width: int = 384
    predictor_depth: int = 12
    predictor_heads: int = 0  # 0 = the encoder's head count, as the reference builds its predictor
    num_mask_types: int = 2  # mask tokens of the predictor, one per mask type; 1 = one shared token (I-JEPA)
    loss: str = "l1"  # l1 (V-JEPA) | smooth_l1 (I-JEPA)
    uniform_power: bool = True
    # sincos: fixed 3D sin-cos table added to the tokens (V-JEPA 1); rope: V-JEPA 2's 3D rotary embedding over
    # (frame, height, width) inside every attention layer of the encoder and predictor, no table (model.rope)
    pos_embed: str = "sincos"
    # reference: what the official code trains with (its init_video_model re-initialises every Linear and
    # LayerNorm after building the model, so all Linear weights are N(0, 0.02)); depth_scaled: the residual
    # projections of block l (attention proj, MLP fc2) divided by sqrt(2 l), as its model constructors intend
    init: str = "reference"
    # recompute each block's activations in the backward pass instead of keeping them (encoder and predictor):
    # about a third more compute for a much larger batch per GPU (BENCHMARKS.md, "Largest batch")
    activation_checkpointing: bool = False

    def validate(self) -> None:
        check(self.size in VIT_SIZES, "size", f"unknown size {self.size!r}, expected one of {sorted(VIT_SIZES)}")
        for name in ("width", "depth", "heads"):
            value = getattr(self, name)
            check(_is_int(value) and value >= 0, name,
                  f"expected 0 (the size's value) or a positive integer, got {value!r}")
        width, _, heads = self.encoder_shape
        check(width % heads == 0, "width", f"encoder width {width} is not divisible by heads={heads}")
        for name in ("img_size", "num_frames", "patch_size", "tubelet_size", "predictor_width", "predictor_depth",
                     "num_mask_types"):
            value = getattr(self, name)
            # bool is an int subclass; `predictor_depth: true` in YAML is a typo, not a depth of 1.
            check(_is_int(value) and value >= 1, name, f"expected a positive integer, got {value!r}")
        check(isinstance(self.activation_checkpointing, bool), "activation_checkpointing",
              f"expected a bool, got {self.activation_checkpointing!r}")
        check(isinstance(self.uniform_power, bool), "uniform_power", f"expected a bool, got {self.uniform_power!r}")
        check(self.pos_embed in ("sincos", "rope"), "pos_embed", f"expected sincos or rope, got {self.pos_embed!r}")
        check(self.loss in ("l1", "smooth_l1"), "loss", f"expected l1 or smooth_l1, got {self.loss!r}")
        check(self.img_size % self.patch_size == 0, "img_size",
              f"{self.img_size} is not divisible by patch_size={self.patch_size}")
        check(self.num_frames % self.tubelet_size == 0, "num_frames",
              f"{self.num_frames} is not divisible by tubelet_size={self.tubelet_size}")
        check(_is_int(self.predictor_heads) and self.predictor_heads >= 0, "predictor_heads",
              f"expected 0 (the encoder's) or a positive integer, got {self.predictor_heads!r}")
        check(self.predictor_width % self.predictor_num_heads == 0, "predictor_width",
              f"{self.predictor_width} is not divisible by predictor_heads={self.predictor_num_heads}")
        if self.pos_embed == "rope":
            for name, dim, heads in (("width", self.encoder_width, self.encoder_shape[2]),
                                     ("predictor_width", self.predictor_width, self.predictor_num_heads)):
                check(dim // heads >= 6, name,
                      f"rope needs at least 6 channels per head, {name} {dim} / {heads} heads")
        check(self.init in ("reference", "depth_scaled"), "init", f"must be reference or depth_scaled, got {self.init!r}")
        if not self.uniform_power:
            # The non-uniform sin-cos split gives t D/2 and h, w D/4 channels each; all must be even.
            for name, dim in (("encoder width", self.encoder_width), ("predictor_width", self.predictor_width)):
                check(dim % 8 == 0, "uniform_power", f"false needs widths divisible by 8, {name} is {dim}")

    @property
    def encoder_shape(self) -> tuple[int, int, int]:
        """(width, depth, heads) of the encoder: the size's, with any nonzero override applied."""
        base = VIT_SIZES[self.size]
        return tuple(o or b for o, b in zip((self.width, self.depth, self.heads), base))

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the encoder's MLPs (int(width x ratio), as the reference computes it)."""
        return int(self.encoder_width * MLP_RATIOS.get(self.size, 4.0))

    @property
    def predictor_num_heads(self) -> int:
        """The predictor's attention heads: `predictor_heads`, or the encoder's when 0."""
        return self.predictor_heads or self.encoder_shape[2]

    @property
    def encoder_width(self) -> int:
        return self.encoder_shape[0]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        side = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, side, side)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_model_config(cfg: Any) -> ModelConfig:
    """Accept a ModelConfig, a plain dict or an OmegaConf DictConfig; return a validated ModelConfig.

    Unknown keys are errors (a renamed key must not silently fall back to a default). Errors name the key as
    `model.<field>`, as in the training config.
    """
    if isinstance(cfg, Mapping):
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(str(k) for k in cfg.keys() if k not in known)
        if unknown:
            raise ConfigError(f"unknown keys {unknown}, expected a subset of {sorted(known)}", "model")
        cfg = ModelConfig(**{k: cfg[k] for k in cfg.keys()})
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a ModelConfig, dict or DictConfig, got {type(cfg).__name__}")
    validate(cfg, "model.")
    return cfg
