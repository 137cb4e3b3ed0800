"""Released V-JEPA 2 models: the architecture of each, as ModelConfig fields, so an official checkpoint (which
holds weights only) can be built and imported (`tubelet-import FILE release=NAME`).

Read from the official code (facebookresearch/vjepa2): src/hub/backbones.py (`_make_vjepa2_model`: 64 frames,
tubelet 2, patch 16, rotary positions, a predictor of width 384, depth 12, 12 heads and 10 mask tokens;
ARCH_NAME_MAP for the file names) and src/models/vision_transformer.py (vit_large 1024/24/16, vit_huge 1280/32/16,
vit_giant_xformers 1408/40/22 with mlp_ratio 48/11). The Hugging Face configs (facebook/vjepa2-vit*-fpc64-*) give
the same numbers.
"""

from __future__ import annotations

from model.config import ModelConfig, as_model_config

_VJEPA2 = dict(num_frames=64, tubelet_size=2, patch_size=16, pos_embed="rope", predictor_width=384,
               predictor_depth=12, predictor_heads=12, num_mask_types=10)

# name -> (file on dl.fbaipublicfiles.com/vjepa2/, ModelConfig fields)
RELEASES: dict[str, tuple[str, dict]] = {
    "vjepa2-vitl": ("vitl.pt", dict(_VJEPA2, size="large", img_size=256)),
    "vjepa2-vith": ("vith.pt", dict(_VJEPA2, size="huge", img_size=256)),
    # vit_giant_xformers: 22 heads, not the 16 of tubelet's "giant" default
    "vjepa2-vitg": ("vitg.pt", dict(_VJEPA2, size="giant", heads=22, img_size=256)),
    "vjepa2-vitg-384": ("vitg-384.pt", dict(_VJEPA2, size="giant", heads=22, img_size=384)),
}


def release_config(name: str) -> ModelConfig:
    """The ModelConfig of a named release; an unknown name is a ValueError listing the known ones."""
    if name not in RELEASES:
        raise ValueError(f"unknown release {name!r}, expected one of {sorted(RELEASES)}")
    return as_model_config(RELEASES[name][1])
