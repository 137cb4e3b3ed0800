"""Released V-JEPA 1, V-JEPA 2 and I-JEPA models: the architecture of each, as ModelConfig fields, so an official
checkpoint (which holds weights only) can be built and imported (`tubelet-import FILE release=NAME`).

V-JEPA 2, from facebookresearch/vjepa2: src/hub/backbones.py (`_make_vjepa2_model`: 64 frames, tubelet 2, patch 16,
rotary positions, a predictor of width 384, depth 12, 12 heads and 10 mask tokens; ARCH_NAME_MAP for the file
names) and src/models/vision_transformer.py (vit_large 1024/24/16, vit_huge 1280/32/16, vit_giant_xformers
1408/40/22 with mlp_ratio 48/11). The Hugging Face configs (facebook/vjepa2-vit*-fpc64-*) give the same numbers.

V-JEPA 1, from facebookresearch/jepa: configs/pretrain/{vitl16,vith16,vith16_384}.yaml (16 frames, tubelet 2,
patch 16, uniform_power: true, pred_depth 12, pred_embed_dim 384, two mask configs = num_mask_tokens 2) and
app/vjepa/utils.py (`init_video_model`: the predictor has the encoder's heads, 16; sin-cos positions).

I-JEPA, from facebookresearch/ijepa: configs/{in1k_vith14_ep300,in1k_vith16-448_ep300,in22k_vith14_ep66,
in22k_vitg16_ep44}.yaml (pred_emb_dim 384; pred_depth 12, 16 for ViT-g) and src/helper.py (`init_model`: the
predictor has the encoder's heads, 16; one mask token; 2D sin-cos positions). Its vit_giant is 1408/40/16 with
mlp_ratio 48/11: tubelet's "giant". An image is a clip of one frame with tubelet size 1 (configs/train/ijepa_*.yaml).
"""

from __future__ import annotations

from model.config import ModelConfig, as_model_config

_VJEPA2 = dict(num_frames=64, tubelet_size=2, patch_size=16, pos_embed="rope", predictor_width=384,
               predictor_depth=12, predictor_heads=12, num_mask_types=10)
_VJEPA1 = dict(num_frames=16, tubelet_size=2, patch_size=16, pos_embed="sincos", uniform_power=True,
               predictor_width=384, predictor_depth=12, predictor_heads=16, num_mask_types=2)
_IJEPA = dict(size="huge", num_frames=1, tubelet_size=1, img_size=224, pos_embed="sincos", predictor_width=384,
              predictor_depth=12, predictor_heads=16, num_mask_types=1, loss="smooth_l1")

# name -> (file under https://dl.fbaipublicfiles.com/, ModelConfig fields)
RELEASES: dict[str, tuple[str, dict]] = {
    "vjepa2-vitl": ("vjepa2/vitl.pt", dict(_VJEPA2, size="large", img_size=256)),
    "vjepa2-vith": ("vjepa2/vith.pt", dict(_VJEPA2, size="huge", img_size=256)),
    # vit_giant_xformers: 22 heads, not the 16 of tubelet's "giant" default
    "vjepa2-vitg": ("vjepa2/vitg.pt", dict(_VJEPA2, size="giant", heads=22, img_size=256)),
    "vjepa2-vitg-384": ("vjepa2/vitg-384.pt", dict(_VJEPA2, size="giant", heads=22, img_size=384)),
    "vjepa1-vitl": ("jepa/vitl16/vitl16.pth.tar", dict(_VJEPA1, size="large", img_size=224)),
    "vjepa1-vith": ("jepa/vith16/vith16.pth.tar", dict(_VJEPA1, size="huge", img_size=224)),
    "vjepa1-vith-384": ("jepa/vith16-384/vith16-384.pth.tar", dict(_VJEPA1, size="huge", img_size=384)),
    "ijepa-vith14-in1k": ("ijepa/IN1K-vit.h.14-300e.pth.tar", dict(_IJEPA, patch_size=14)),
    "ijepa-vith16-448-in1k": ("ijepa/IN1K-vit.h.16-448px-300e.pth.tar", dict(_IJEPA, patch_size=16, img_size=448)),
    "ijepa-vith14-in22k": ("ijepa/IN22K-vit.h.14-900e.pth.tar", dict(_IJEPA, patch_size=14)),
    "ijepa-vitg16-in22k": ("ijepa/IN22K-vit.g.16-600e.pth.tar", dict(_IJEPA, size="giant", patch_size=16,
                                                                      predictor_depth=16)),
}


def release_config(name: str) -> ModelConfig:
    """The ModelConfig of a named release; an unknown name is a ValueError listing the known ones."""
    if name not in RELEASES:
        raise ValueError(f"unknown release {name!r}, expected one of {sorted(RELEASES)}")
    return as_model_config(RELEASES[name][1])

