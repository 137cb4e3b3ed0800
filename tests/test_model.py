"""CPU tests of model/: config, position table, encoder, predictor, V-JEPA loss and EMA, features.

Small models and grids throughout; the full-size models are only built on the meta device
(shapes without memory) to pin parameter counts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from model.config import VIT_SIZES, ModelConfig, as_model_config
from model.features import (
    CheckpointError,
    export_encoder,
    extract_features,
    load_encoder,
    load_exported,
    main,
)
from model.pos_embed import axis_dims, sincos_pos_embed_3d
from model.predictor import Predictor
from model.vit import VisionTransformer
from model.vjepa import VJEPA

# Small shapes: 4 frames of 48x48, tubelet 2x16x16 -> grid (2, 3, 3), 18 tokens.
SMALL = dict(img_size=48, num_frames=4, patch_size=16, tubelet_size=2)
GRID = (2, 3, 3)
N = 18


def tiny_vjepa(seed: int = 0, depth_scaled_init: bool = False) -> VJEPA:
    torch.manual_seed(seed)
    encoder = VisionTransformer(**SMALL, embed_dim=64, depth=2, num_heads=4, depth_scaled_init=depth_scaled_init)
    predictor = Predictor(64, GRID, width=32, depth=2, heads=4, num_mask_types=2, depth_scaled_init=depth_scaled_init)
    return VJEPA(encoder, predictor)


def fixed_batch(seed: int = 1, batch: int = 2):
    """Clips [B, 3, 4, 48, 48] and two mask types with disjoint context/target per sample."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(batch, 3, 4, 48, 48, generator=g)
    masks = []
    for n_ctx, n_tgt in ((10, 8), (5, 12)):
        perms = torch.stack([torch.randperm(N, generator=g) for _ in range(batch)])
        masks.append((perms[:, :n_ctx].contiguous(), perms[:, n_ctx:n_ctx + n_tgt].contiguous()))
    return clips, masks


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------- config


def test_config_defaults_and_grid():
    cfg = ModelConfig()
    assert cfg.size == "tiny" and cfg.uniform_power is True
    assert cfg.grid == (8, 14, 14)
    assert cfg.encoder_width == 192


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(size="gigantic"), "model.size"),
        (dict(activation_checkpointing=1), "model.activation_checkpointing"),
        (dict(img_size=225), "model.img_size"),
        (dict(num_frames=15), "model.num_frames"),
        (dict(patch_size=0), "model.patch_size"),
        (dict(predictor_width=100, predictor_heads=12), "model.predictor_width"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        as_model_config(ModelConfig(**kwargs))
    with pytest.raises(ValueError, match=field):
        VisionTransformer.from_config(ModelConfig(**kwargs))


def test_config_omegaconf_structured_roundtrip():
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"size": "large", "num_frames": 8}))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig) and cfg.size == "large" and cfg.grid == (4, 14, 14)
    # A DictConfig or plain dict is accepted where a ModelConfig is expected; unknown keys are errors.
    assert as_model_config(merged) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        as_model_config({"size": "tiny", "widht": 3})
    with pytest.raises(ValueError, match="model.size"):
        as_model_config(OmegaConf.merge(schema, {"size": "gigantic"}))


# ---------------------------------------------------------------- parameter counts

# Trainable parameters at 16x224x224, tubelet 2x16x16, default predictor (384 wide, 12 deep).
# ViT-L: 303,885,312 = the published 303.9M; its predictor 22,082,944 = the published 22.1M.
GOLDEN_PARAMS = {
    "tiny": (5_633_856, 21_443_136),
    "small": (21_884_544, 21_590_784),
    "base": (86_236_416, 21_886_080),
    "large": (303_885_312, 22_082_944),
    "huge": (631_648_000, 22_279_808),
    # ViT-g (V-JEPA 2's "1B"), by hand: 40 blocks of 25,250,176 (qkv + proj 4 x 1408^2 + 4 x 1408, MLP 2 x 1408 x
    # 6144 + 6144 + 1408, two norms 4 x 1408) + tubelet embedding 1536 x 1408 + 1408 + final norm 2 x 1408
    "giant": (1_012_173_952, 22_378_240),
}


@pytest.mark.parametrize("size", list(VIT_SIZES))
def test_parameter_counts(size):
    cfg = ModelConfig(size=size)
    with torch.device("meta"):  # shapes only: ViT-H would take 2.5 GB on CPU
        model = VJEPA.from_config(cfg)
    enc_params, pred_params = GOLDEN_PARAMS[size]
    assert trainable(model.encoder) == enc_params
    assert trainable(model.predictor) == pred_params
    assert trainable(model.target_encoder) == 0
    assert sum(p.numel() for p in model.target_encoder.parameters()) == enc_params
    # The position table is a fixed buffer, not a parameter, and is not stored in state_dicts.
    width = VIT_SIZES[size][0]
    assert model.encoder.blocks[0].mlp.fc1.out_features == (6144 if size == "giant" else 4 * width)
    assert model.encoder.pos_embed.shape == (1568, width)
    assert "pos_embed" not in model.encoder.state_dict()
    assert all("pos_embed" not in name for name, _ in model.named_parameters())


# I-JEPA's models as images (one frame, tubelet 1, one mask token): the trainable parameters of the official
# code's vit_* encoders and vit_predictor (384 wide, 12 deep, the encoder's heads) at 224 px, counted from
# facebookresearch/ijepa src/models/vision_transformer.py (it also counts its frozen position table as a
# parameter: 327,680 more for ViT-H/14's encoder, 98,304 for its predictor).
IJEPA_PARAMS = {
    ("huge", 14): (630_434_560, 22_279_424),
    ("huge", 16): (630_664_960, 22_279_424),
    ("large", 16): (303_098_880, 22_082_560),
    ("base", 16): (85_646_592, 21_885_696),
}


@pytest.mark.parametrize("size,patch", list(IJEPA_PARAMS))
def test_image_models_have_ijepas_parameter_counts(size, patch):
    cfg = ModelConfig(size=size, patch_size=patch, num_frames=1, tubelet_size=1, num_mask_types=1)
    with torch.device("meta"):
        model = VJEPA.from_config(cfg)
    assert (trainable(model.encoder), trainable(model.predictor)) == IJEPA_PARAMS[(size, patch)]
    assert model.encoder.grid == (1, 224 // patch, 224 // patch)


def test_one_frame_grids_use_ijepas_2d_position_table():
    """A grid of one temporal slot gets I-JEPA's 2D table (values of the official get_2d_sincos_pos_embed,
    equal to float32 rounding): [sin-cos of the column | sin-cos of the row], half the width each."""
    from model.pos_embed import sincos_pos_embed_3d

    table = sincos_pos_embed_3d(1280, 1, 16, 16)
    assert table.shape == (256, 1280)
    # token 37 = row 2, column 5
    np.testing.assert_allclose(table[37, [0, 5, 640, 647, 1279]],
                               [-0.9589242935, -0.9277092814, 0.9092974066, 0.9979366660, 1.0], atol=1e-7)
    assert np.array_equal(table[37, :640], table[5, :640]) and np.array_equal(table[37, 640:], table[32, 640:])


def test_ijepa_objective_encodes_the_context_once_and_is_smooth_l1_over_the_target_blocks():
    """I-JEPA's forward (src/train.py): the target encoder's layer-normed features at each target block; the
    context encoded once; the predictor run per target block with the one mask token; smooth L1 over all blocks
    (equal sizes, so the mean of the per-block means)."""
    import torch.nn.functional as F

    from pipeline.image_masks import ImageMaskConfig, sample_image_masks

    torch.manual_seed(0)
    cfg = ModelConfig(img_size=64, num_frames=1, tubelet_size=1, patch_size=8, predictor_width=96,
                      predictor_depth=2, predictor_heads=4, num_mask_types=1, loss="smooth_l1")
    model = VJEPA.from_config(cfg)
    context, targets = sample_image_masks(np.random.default_rng(0), 3, cfg.grid, ImageMaskConfig())
    ctx = torch.from_numpy(context)
    masks = [(ctx, torch.from_numpy(t)) for t in targets]
    images = torch.randn(3, 3, 1, 64, 64)
    calls = []
    hook = model.encoder.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    loss = model(images, masks)
    hook.remove()
    assert calls == [(3, context.shape[1], cfg.encoder_shape[0])]  # one context pass, 4 target blocks
    with torch.no_grad():
        h = F.layer_norm(model.target_encoder(images), (cfg.encoder_shape[0],))
        z = model.encoder(images, keep=ctx)
        preds = torch.cat([model.predictor(z, ctx, torch.from_numpy(t), 0) for t in targets])
        tgts = torch.cat([torch.gather(h, 1, torch.from_numpy(t)[..., None].expand(-1, -1, h.size(-1)))
                          for t in targets])
        assert torch.allclose(loss, F.smooth_l1_loss(preds, tgts), rtol=1e-5, atol=1e-7)
    assert model.predictor.mask_tokens.shape[0] == 1


# ---------------------------------------------------------------- position table


def test_pos_embed_shape_and_first_row():
    table = sincos_pos_embed_3d(1024, 8, 14, 14)
    assert table.shape == (1568, 1024) and table.dtype == np.float32
    # Position (0, 0, 0): sin(0) = 0 on each axis's first half, cos(0) = 1 on its second half.
    d = axis_dims(1024)[0]
    assert d == 342  # 2 * ceil(1024 / 6); 3 * 342 = 1026, cut to 1024
    expected = np.concatenate([np.zeros(171), np.ones(171)] * 3)[:1024]
    np.testing.assert_array_equal(table[0], expected.astype(np.float32))


def test_pos_embed_golden_entries():
    table = sincos_pos_embed_3d(1024, 8, 14, 14)
    last = 1567  # (t, h, w) = (7, 13, 13)
    assert table[last, 0] == pytest.approx(math.sin(7.0), abs=1e-7)
    assert table[last, 171] == pytest.approx(math.cos(7.0), abs=1e-7)
    assert table[last, 342] == pytest.approx(math.sin(13.0), abs=1e-7)
    assert table[last, 684] == pytest.approx(math.sin(13.0), abs=1e-7)
    # Last kept channel: w's cos block, frequency index 339 - 171 = 168 of 171.
    assert table[last, 1023] == pytest.approx(math.cos(13.0 / 10000 ** (168 / 171)), abs=1e-7)
    assert table[last, 1023] == pytest.approx(0.9999988, abs=1e-7)
    # Token order is t-major: index 1 * 196 + 2 * 14 + 3 is (t, h, w) = (1, 2, 3).
    row = table[1 * 196 + 2 * 14 + 3]
    assert row[0] == pytest.approx(math.sin(1.0), abs=1e-7)
    assert row[342] == pytest.approx(math.sin(2.0), abs=1e-7)
    assert row[684] == pytest.approx(math.sin(3.0), abs=1e-7)


def test_pos_embed_small_exact():
    # dim 12: each axis gets 4 channels, omega = (1, 1/100).
    table = sincos_pos_embed_3d(12, 2, 3, 4)
    row = table[1 * 12 + 2 * 4 + 3]  # (t, h, w) = (1, 2, 3)
    expected = []
    for p in (1.0, 2.0, 3.0):
        expected += [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
    np.testing.assert_allclose(row, expected, atol=1e-7)


def test_pos_embed_non_uniform_split():
    # The reference's older split: t gets D/2, h and w D/4 each.
    assert axis_dims(16, uniform_power=False) == (8, 4, 4)
    table = sincos_pos_embed_3d(16, 2, 3, 4, uniform_power=False)
    row = table[1 * 12 + 2 * 4 + 3]
    omega_t = [1 / 10000 ** (i / 4) for i in range(4)]
    expected = [math.sin(w) for w in omega_t] + [math.cos(w) for w in omega_t]
    for p in (2.0, 3.0):
        expected += [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
    np.testing.assert_allclose(row, expected, atol=1e-7)
    with pytest.raises(ValueError):
        sincos_pos_embed_3d(12, 2, 3, 4, uniform_power=False)


@pytest.mark.parametrize("uniform_power", [True, False])
def test_pos_embed_rows_distinct(uniform_power):
    table = sincos_pos_embed_3d(192, 8, 14, 14, uniform_power=uniform_power)
    dists = torch.cdist(torch.from_numpy(table), torch.from_numpy(table))
    dists.fill_diagonal_(float("inf"))
    assert dists.min().item() > 0.1


# ---------------------------------------------------------------- encoder


def test_encoder_shapes_and_grid():
    torch.manual_seed(0)
    enc = VisionTransformer(**SMALL, embed_dim=64, depth=2, num_heads=4)
    assert enc.grid == GRID and enc.num_tokens == N
    x = torch.randn(2, 3, 4, 48, 48)
    assert enc(x).shape == (2, N, 64)
    keep = torch.tensor([[0, 5, 7], [17, 3, 1]])
    assert enc(x, keep=keep).shape == (2, 3, 64)


def test_encoder_from_config_and_bad_input():
    cfg = ModelConfig(size="tiny", img_size=32, num_frames=4)
    enc = VisionTransformer.from_config(cfg)
    assert enc.embed_dim == 192 and len(enc.blocks) == 12 and enc.grid == (2, 2, 2)
    assert enc.config == cfg
    with pytest.raises(ValueError, match=r"\[B, 3, 4, 32, 32\]"):
        enc(torch.randn(1, 3, 4, 48, 48))


def test_keep_all_tokens_equals_no_keep():
    torch.manual_seed(0)
    enc = VisionTransformer(**SMALL, embed_dim=64, depth=2, num_heads=4)
    x = torch.randn(2, 3, 4, 48, 48)
    keep = torch.arange(N).expand(2, N)
    torch.testing.assert_close(enc(x, keep=keep), enc(x), rtol=0, atol=0)


def test_keep_gathers_embedded_tokens():
    # Attention has no position bias, so the encoder is permutation-equivariant over the tokens it
    # is given: running on a permuted subset equals gathering the embeddings at those indices and
    # running the blocks on them directly.
    torch.manual_seed(0)
    enc = VisionTransformer(**SMALL, embed_dim=64, depth=2, num_heads=4)
    x = torch.randn(2, 3, 4, 48, 48)
    keep = torch.tensor([[17, 0, 9, 4], [2, 11, 3, 16]])
    tokens = enc.embed(x)
    manual = torch.stack([tokens[b, keep[b]] for b in range(2)])
    for block in enc.blocks:
        manual = block(manual)
    torch.testing.assert_close(enc(x, keep=keep), enc.norm(manual), rtol=0, atol=0)
    # Keeping every token in a shuffled order permutes the output rows.
    perm = torch.stack([torch.randperm(N) for _ in range(2)])
    full = enc(x)
    permuted = torch.stack([full[b, perm[b]] for b in range(2)])
    torch.testing.assert_close(enc(x, keep=perm), permuted, atol=1e-5, rtol=1e-5)


def test_init_scheme():
    """Default: the official code's effective init, every Linear N(0, 0.02) (its init_video_model re-initialises
    them after building); init=depth_scaled: block l's residual projections divided by sqrt(2 l)."""
    ref = VisionTransformer.from_config(ModelConfig(width=384, depth=8, heads=6))
    qkv_std = torch.cat([b.attn.qkv.weight.flatten() for b in ref.blocks]).std().item()
    assert qkv_std == pytest.approx(0.02, rel=0.02)
    assert ref.blocks[7].mlp.fc2.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert ref.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert torch.all(ref.blocks[0].attn.qkv.bias == 0) and torch.all(ref.norm.weight == 1)
    scaled = VisionTransformer.from_config(ModelConfig(width=384, depth=8, heads=6, init="depth_scaled"))
    assert scaled.blocks[7].mlp.fc2.weight.std().item() == pytest.approx(0.005, rel=0.03)  # 0.02 / sqrt(16)
    assert scaled.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.03)
    pred = Predictor.from_config(ModelConfig(init="depth_scaled", predictor_depth=4))
    assert pred.blocks[3].mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.03)


def test_predictor_heads_default_to_the_encoders():
    assert [Predictor.from_config(ModelConfig(size=s)).blocks[0].attn.num_heads for s in ("tiny", "large")] == [3, 16]
    assert Predictor.from_config(ModelConfig(predictor_heads=6)).blocks[0].attn.num_heads == 6


# ---------------------------------------------------------------- predictor


def test_predictor_shapes():
    torch.manual_seed(0)
    pred = Predictor(64, GRID, width=32, depth=2, heads=4, num_mask_types=2)
    assert pred.mask_tokens.shape == (2, 1, 1, 32) and torch.all(pred.mask_tokens == 0)
    ctx = torch.randn(2, 5, 64)
    ctx_idx = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    tgt_idx = torch.tensor([[10, 11, 12], [13, 14, 15]])
    assert pred(ctx, ctx_idx, tgt_idx, mask_type=1).shape == (2, 3, 64)
    with pytest.raises(ValueError, match="mask_type"):
        pred(ctx, ctx_idx, tgt_idx, mask_type=2)
    with pytest.raises(ValueError, match="ctx_idx"):
        pred(ctx, ctx_idx[:, :4], tgt_idx, mask_type=0)


# ---------------------------------------------------------------- V-JEPA

# Loss of tiny_vjepa(0) on fixed_batch(1), torch 2.x CPU float32, with the reference's effective init and with
# the depth-scaled one (pinned when that was tubelet's only init: the option reproduces it exactly). A change
# means the init order, the architecture or the loss changed.
GOLDEN_LOSS = 0.81373155
GOLDEN_LOSS_DEPTH_SCALED = 0.81403089


def test_golden_loss():
    clips, masks = fixed_batch(1)
    loss = tiny_vjepa(0)(clips, masks)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(GOLDEN_LOSS, abs=1e-5)
    assert tiny_vjepa(0, depth_scaled_init=True)(clips, masks).item() == pytest.approx(GOLDEN_LOSS_DEPTH_SCALED,
                                                                                     abs=1e-5)


def test_forward_parts():
    model = tiny_vjepa(0)
    clips, masks = fixed_batch(1)
    targets = model.forward_target(clips, masks)
    preds = model.forward_context(clips, masks)
    assert [t.shape for t in targets] == [(2, 8, 64), (2, 12, 64)]
    assert [p.shape for p in preds] == [(2, 8, 64), (2, 12, 64)]
    assert not targets[0].requires_grad
    # Targets are layer-normed per token without affine: zero mean, unit variance over D.
    torch.testing.assert_close(targets[0].mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets[0].var(-1, unbiased=False), torch.ones(2, 8), atol=1e-3, rtol=0)
    expected = torch.stack([(p - t).abs().mean() for p, t in zip(preds, targets)]).mean()
    torch.testing.assert_close(model(clips, masks), expected)


def test_gradients_reach_encoder_and_predictor_only():
    model = tiny_vjepa(0)
    clips, masks = fixed_batch(1)
    model(clips, masks).backward()
    for name, p in list(model.encoder.named_parameters()) + list(model.predictor.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in model.target_encoder.parameters():
        assert not p.requires_grad and p.grad is None


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing the blocks in the backward pass changes memory, not the result."""
    clips, masks = fixed_batch(1)
    grads = []
    for recompute in (False, True):
        model = tiny_vjepa(0)
        model.encoder.activation_checkpointing = model.predictor.activation_checkpointing = recompute
        loss = model(clips, masks)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    cfg = ModelConfig(size="tiny", activation_checkpointing=True)
    assert VisionTransformer.from_config(cfg).activation_checkpointing and Predictor.from_config(cfg).activation_checkpointing


def test_target_encoder_stays_in_eval():
    model = tiny_vjepa(0)
    model.train()
    assert model.encoder.training and model.predictor.training
    assert not model.target_encoder.training


def test_ema_update():
    model = tiny_vjepa(0)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    enc = list(model.encoder.parameters())

    model.ema_update(1.0)  # m = 1 keeps the target
    for b, t in zip(before, model.target_encoder.parameters()):
        assert torch.equal(b, t)

    model.ema_update(0.75)
    for b, e, t in zip(before, enc, model.target_encoder.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * e)

    model.ema_update(0.0)  # m = 0 copies the encoder
    for e, t in zip(enc, model.target_encoder.parameters()):
        assert torch.equal(e, t)
    with pytest.raises(ValueError):
        model.ema_update(1.5)
    # a skipped step (flag decided on the device) leaves the target bitwise as it was
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    kept = [t.clone() for t in model.target_encoder.parameters()]
    model.ema_update(0.5, skip=torch.tensor(1.0))
    assert all(torch.equal(k, t) for k, t in zip(kept, model.target_encoder.parameters()))
    model.ema_update(0.5, skip=torch.tensor(0.0))
    for k, e, t in zip(kept, enc, model.target_encoder.parameters()):
        torch.testing.assert_close(t, 0.5 * k + 0.5 * e)


def test_the_ema_update_never_reads_the_skip_flag_on_the_host():
    """The skip flag and the momentum stay on the device: no op below Python reads a value on the host (a 0-d
    weight handed to torch._foreach_lerp_ would be, once per step)."""
    from host_sync import NoHostSync

    model = tiny_vjepa(0)
    go, skip = torch.tensor(0.0), torch.tensor(1.0)
    with NoHostSync():
        model.ema_update(0.99, skip=go)
        model.ema_update(0.99, skip=skip)


def test_param_groups():
    model = tiny_vjepa(0)
    groups = model.param_groups(weight_decay=0.04)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    expected = {id(p) for p in list(model.encoder.parameters()) + list(model.predictor.parameters())}
    assert set(ids) == expected  # every trainable parameter once, none of the target encoder
    for g in groups:
        assert g["weight_decay"] == (0.04 if g["apply_wd"] else 0.0)
        if not g["apply_wd"]:
            assert all(p.ndim == 1 for p in g["params"])
        else:
            assert all(p.ndim > 1 for p in g["params"])
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


def test_overfits_fixed_batch():
    model = tiny_vjepa(0)
    clips, masks = fixed_batch(1)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(clips, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.ema_update(0.99)
        losses.append(loss.item())
    # Measured: 0.814 -> 0.617 (0.76x); the targets move with the EMA, so the fall is steady, not fast.
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# ---------------------------------------------------------------- features

FEAT_CFG = ModelConfig(
    size="tiny", img_size=32, num_frames=4, predictor_depth=1, predictor_width=32, predictor_heads=4
)


@pytest.fixture
def checkpoint(tmp_path):
    """A trainer-style checkpoint of a tiny model whose target encoder differs from its encoder."""
    torch.manual_seed(0)
    model = VJEPA.from_config(FEAT_CFG)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.01)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "encoder": model.encoder.state_dict(),
            "predictor": model.predictor.state_dict(),
            "target_encoder": model.target_encoder.state_dict(),
            "step": 7,
            "config": {"model": dataclasses.asdict(FEAT_CFG), "train": {"lr": 1e-3}},
        },
        path,
    )
    return path, model


def test_load_encoder_and_extract(checkpoint):
    path, model = checkpoint
    enc = load_encoder(path)
    assert not enc.training and enc.config == FEAT_CFG
    for (k, a), b in zip(model.target_encoder.state_dict().items(), enc.state_dict().values()):
        assert torch.equal(a, b), k
    clips = torch.randn(2, 3, 4, 32, 32)
    feats = extract_features(enc, clips)
    assert feats.shape == (2, 8, 192) and not feats.requires_grad
    torch.testing.assert_close(feats, model.target_encoder(clips), rtol=0, atol=0)


def test_export_roundtrip(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "enc.safetensors"
    export_encoder(path, out)
    enc = load_exported(out)
    assert enc.config == FEAT_CFG
    clips = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(extract_features(enc, clips), model.target_encoder(clips), rtol=0, atol=0)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # the temp file was renamed


@pytest.mark.slow
def test_cli_export(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "cli.safetensors"
    assert main([f"checkpoint={path}", f"out={out}"]) == 0 and out.exists()
    # The module entry point itself, as a user would run it.
    out2 = tmp_path / "cli2.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "model.features", f"checkpoint={path}", f"out={out2}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert out2.read_bytes() == out.read_bytes()


def test_missing_key_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"config": {"model": dataclasses.asdict(FEAT_CFG)}, "encoder": {}}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*missing key 'target_encoder'"):
        load_encoder(path)
    torch.save({"target_encoder": {}, "config": {"train": {}}}, path)
    with pytest.raises(CheckpointError, match=r"config\.model"):
        load_encoder(path)
    assert main([f"checkpoint={path}", f"out={tmp_path / 'x.safetensors'}"]) == 2


def test_shape_mismatch_is_a_clear_error(checkpoint, tmp_path):
    path, model = checkpoint
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["size"] = "small"  # 384 wide, weights are 192 wide
    bad = tmp_path / "mismatch.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"mismatch\.pt.*shape mismatches: .*patch_embed\.proj\.weight"):
        load_encoder(bad)
    # A dropped key is reported, not skipped.
    ckpt = torch.load(path, weights_only=True)
    del ckpt["target_encoder"]["norm.bias"]
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"missing keys: norm\.bias"):
        load_encoder(bad)


def test_wrapper_prefixes_are_stripped(checkpoint, tmp_path):
    path, model = checkpoint
    ckpt = torch.load(path, weights_only=True)
    ckpt["target_encoder"] = {"module._orig_mod." + k: v for k, v in ckpt["target_encoder"].items()}
    wrapped = tmp_path / "wrapped.pt"
    torch.save(ckpt, wrapped)
    enc = load_encoder(wrapped)
    assert torch.equal(enc.norm.bias, model.target_encoder.norm.bias)
