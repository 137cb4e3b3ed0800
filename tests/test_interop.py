"""Interop with V-JEPA 2: rotary positions (pos_embed=rope) against golden values of the official code.

The golden numbers were computed by running the official facebookresearch/vjepa2 VisionTransformer and
VisionTransformerPredictor (use_rope=True, src/models) on exactly the weights and inputs built here (tiny_rope_models,
rope_inputs): the official code is not needed to run these tests.
"""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.predictor import Predictor
from model.rope import RotaryTables, axis_part, grid_positions
from model.vit import VisionTransformer

# Encoder head dim 48 (3 x 16 rotated, nothing left), predictor head dim 32 (3 x 10 rotated, 2 passed through).
ROPE_TINY = dict(img_size=32, patch_size=8, num_frames=4, tubelet_size=2, width=96, depth=2, heads=2,
                 predictor_width=64, predictor_depth=2, predictor_heads=2, num_mask_types=2)


def fill_deterministic(module: torch.nn.Module, seed: int) -> None:
    """Every parameter from one seeded generator, in name order: N(0, 0.2), LayerNorm weights around 1 (so the
    test does not depend on tubelet's init, and mask tokens are not zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            parts = name.split(".")
            is_norm_weight = len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight"
            p.copy_(1 + 0.1 * noise if is_norm_weight else 0.2 * noise)


def tiny_rope_models() -> tuple[VisionTransformer, Predictor]:
    cfg = ModelConfig(size="tiny", pos_embed="rope", **{k: v for k, v in ROPE_TINY.items()})
    enc, pred = VisionTransformer.from_config(cfg).eval(), Predictor.from_config(cfg).eval()
    fill_deterministic(enc, 0)
    fill_deterministic(pred, 1)
    return enc, pred


def rope_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clips [2, 3, 4, 32, 32] and per-sample context (12, unsorted) / target (20) ids of the 2x4x4 grid."""
    gen = torch.Generator().manual_seed(2)
    clips = torch.randn(2, 3, 4, 32, 32, generator=gen)
    perms = torch.stack([torch.randperm(32, generator=gen) for _ in range(2)])
    return clips, perms[:, :12].contiguous(), perms[:, 12:].contiguous()


# Official outputs for tiny_rope_models / rope_inputs: (shape, sum, abs-sum, out[1, 3, :4], out[0, -1, -3:]).
GOLDEN = {
    "full": ((2, 32, 96), -50.58199429348679, 4958.561287173707,
             [-1.269877, -0.411754, 0.143571, 0.138124], [1.380033, 1.250905, 0.787121]),
    "ctx": ((2, 12, 96), -17.249607521807775, 1838.3778981023934,
            [0.04444, 1.004523, 0.980887, -1.366349], [-0.102822, 0.280388, 1.784098]),
    "pred": ((2, 20, 96), -1077.3139460417442, 5472.294786765706,
             [3.135482, 0.159693, -2.651278, -0.857905], [2.906604, -3.200068, -1.140376]),
}


def test_axis_parts_and_positions_follow_the_official_split():
    assert [axis_part(d) for d in (48, 32, 64, 6, 5)] == [16, 10, 20, 2, 0]  # ViT-g (1408 / 22 = 64): 60 + 4
    t, h, w = grid_positions(torch.tensor([0, 5, 17, 31]), (2, 4, 4))
    assert t.tolist() == [0, 0, 1, 1] and h.tolist() == [0, 1, 0, 3] and w.tolist() == [0, 1, 1, 3]
    with pytest.raises(ValueError, match="head dim"):
        RotaryTables(torch.arange(4), (1, 2, 2), 5, torch.float32)


def test_rotation_keeps_norms_of_rotated_pairs_only_where_the_official_angles_pair_up():
    """Position 0 is the identity; the leftover channels are passed through untouched."""
    x = torch.randn(1, 2, 3, 32)
    tables = RotaryTables(torch.tensor([0, 0, 0]), (1, 4, 4), 32, torch.float32)
    assert torch.equal(tables.apply(x), x)
    moved = RotaryTables(torch.tensor([5, 6, 7]), (1, 4, 4), 32, torch.float32).apply(x)
    assert torch.equal(moved[..., 30:], x[..., 30:]) and not torch.allclose(moved[..., :30], x[..., :30])


def test_rope_models_have_no_position_table_and_sincos_models_still_do():
    enc, pred = tiny_rope_models()
    assert enc.pos_embed is None and pred.pos_embed is None
    sincos = VisionTransformer.from_config(ModelConfig(size="tiny", **ROPE_TINY))
    assert sincos.pos_embed.shape == (32, 96)
    assert sorted(enc.state_dict()) == sorted(sincos.state_dict())  # same weights, only positions differ


def test_rope_config_is_validated():
    from common.config import ConfigError
    with pytest.raises(ConfigError, match="pos_embed"):
        ModelConfig(pos_embed="learned").validate()
    with pytest.raises(ConfigError, match="6 channels per head"):
        ModelConfig(size="tiny", width=8, heads=2, pos_embed="rope").validate()


def test_rope_encoder_and_predictor_match_the_official_code():
    enc, pred = tiny_rope_models()
    clips, keep, tgt = rope_inputs()
    with torch.no_grad():
        full = enc(clips)
        ctx = enc(clips, keep=keep)
        out = pred(ctx, keep, tgt, mask_type=1)
    for name, t in (("full", full), ("ctx", ctx), ("pred", out)):
        shape, total, abs_total, row, tail = GOLDEN[name]
        assert tuple(t.shape) == shape, name
        assert t.double().sum().item() == pytest.approx(total, abs=2e-2), name
        assert t.double().abs().sum().item() == pytest.approx(abs_total, rel=1e-5), name
        torch.testing.assert_close(t[1, 3, :4], torch.tensor(row), atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(t[0, -1, -3:], torch.tensor(tail), atol=1e-4, rtol=0, msg=name)


def test_rope_context_tokens_keep_their_positions_in_any_order():
    """With rope a kept token keeps its id's position: encoding the context alone is not the same as the full pass
    (attention sees fewer tokens), but permuting the kept ids permutes the outputs exactly."""
    enc, _ = tiny_rope_models()
    clips, keep, _ = rope_inputs()
    perm = torch.randperm(12)
    with torch.no_grad():
        a = enc(clips, keep=keep)
        b = enc(clips, keep=keep[:, perm])
    torch.testing.assert_close(b, a[:, perm], atol=1e-5, rtol=1e-5)
