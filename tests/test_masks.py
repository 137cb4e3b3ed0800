"""Tests for pipeline.masks: the V-JEPA multi-block 3D mask generator."""

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.masks import (
    DEFAULT_MASKS,
    MaskBlockConfig,
    MaskSampler,
    block_size,
    cut_to_indices,
    default_masks,
    draw_blocks,
    mask_fractions,
    sample_masks,
)

GRID = (8, 14, 14)
N = 8 * 14 * 14
SHORT, LONG = DEFAULT_MASKS


def _naive_paint(starts, size, grid):
    """Loop-based union of boxes, t-major flattening, as an independent reference for the vectorised one."""
    T, H, W = grid
    t, h, w = size
    out = np.zeros((starts.shape[0], T, H, W), dtype=bool)
    for b in range(starts.shape[0]):
        for t0, top, left in starts[b]:
            out[b, t0:t0 + t, top:top + h, left:left + w] = True
    return out.reshape(starts.shape[0], -1)


# -- config ------------------------------------------------------------------------------------------


def test_defaults():
    assert [(m.num_blocks, m.spatial_scale, m.temporal_scale, list(m.aspect_ratio)) for m in DEFAULT_MASKS] == [
        (8, 0.15, 1.0, [0.75, 1.5]),
        (2, 0.70, 1.0, [0.75, 1.5]),
    ]
    fresh = default_masks()
    fresh[0].aspect_ratio.append(9.0)
    assert list(DEFAULT_MASKS[0].aspect_ratio) == [0.75, 1.5]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_blocks=0, spatial_scale=0.5), "num_blocks"),
        (dict(num_blocks=1, spatial_scale=0.0), "spatial_scale"),
        (dict(num_blocks=1, spatial_scale=1.5), "spatial_scale"),
        (dict(num_blocks=1, spatial_scale=0.5, temporal_scale=0.0), "temporal_scale"),
        (dict(num_blocks=1, spatial_scale=0.5, temporal_scale=1.01), "temporal_scale"),
        (dict(num_blocks=1, spatial_scale=0.5, aspect_ratio=[1.5, 0.75]), "aspect_ratio"),
        (dict(num_blocks=1, spatial_scale=0.5, aspect_ratio=[0.0, 1.0]), "aspect_ratio"),
        (dict(num_blocks=1, spatial_scale=0.5, aspect_ratio=[1.0]), "aspect_ratio"),
    ],
)
def test_validate_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MaskBlockConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=field):
        sample_masks(np.random.default_rng(0), 2, GRID, [MaskBlockConfig(**kwargs)])


def test_omegaconf_structured():
    schema = OmegaConf.structured(MaskBlockConfig(num_blocks=2, spatial_scale=0.7))
    cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(["aspect_ratio=[0.5,2.0]", "num_blocks=3"]))
    assert cfg.num_blocks == 3 and list(cfg.aspect_ratio) == [0.5, 2.0]
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, MaskBlockConfig)
    obj.validate()
    # Nodes work directly too, and draw exactly what the dataclass draws.
    a = sample_masks(np.random.default_rng(3), 4, GRID, [cfg])
    b = sample_masks(np.random.default_rng(3), 4, GRID, [obj])
    np.testing.assert_array_equal(a[0][0], b[0][0])
    np.testing.assert_array_equal(a[0][1], b[0][1])
    with pytest.raises(Exception):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["not_a_key=1"]))


# -- determinism, shapes, invariants -------------------------------------------------------------------


def test_deterministic_given_generator_state():
    a = sample_masks(np.random.default_rng(123), 16, GRID, DEFAULT_MASKS)
    b = MaskSampler(DEFAULT_MASKS, GRID)(np.random.default_rng(123), 16)
    c = sample_masks(np.random.default_rng(124), 16, GRID, DEFAULT_MASKS)
    for (ca, ta), (cb, tb) in zip(a, b):
        np.testing.assert_array_equal(ca, cb)
        np.testing.assert_array_equal(ta, tb)
    assert any(ca.shape != cc.shape or not np.array_equal(ca, cc) for (ca, _), (cc, _) in zip(a, c))


def test_successive_batches_differ():
    rng = np.random.default_rng(0)
    first = sample_masks(rng, 8, GRID, DEFAULT_MASKS)
    second = sample_masks(rng, 8, GRID, DEFAULT_MASKS)
    assert any(a[1].shape != b[1].shape or not np.array_equal(a[1], b[1]) for a, b in zip(first, second))


@pytest.mark.parametrize("batch_size", [1, 24, 64])
def test_shapes_dtypes_and_invariants(batch_size):
    rng = np.random.default_rng(batch_size)
    for _ in range(5):
        out = sample_masks(rng, batch_size, GRID, DEFAULT_MASKS)
        assert len(out) == 2
        for ctx, tgt in out:
            assert ctx.dtype == np.int64 and tgt.dtype == np.int64
            assert ctx.ndim == 2 and tgt.ndim == 2
            assert ctx.shape[0] == tgt.shape[0] == batch_size
            assert ctx.shape[1] >= 1 and tgt.shape[1] >= 1
            assert ctx.shape[1] + tgt.shape[1] <= N
            for c, t in zip(ctx, tgt):
                assert c.min() >= 0 and c.max() < N and t.min() >= 0 and t.max() < N
                assert np.all(np.diff(c) > 0) and np.all(np.diff(t) > 0)
                assert np.intersect1d(c, t).size == 0


def test_cut_keeps_lowest_indices():
    rng = np.random.default_rng(7)
    for spec in DEFAULT_MASKS:
        d = draw_blocks(rng, 24, GRID, spec)
        ctx, tgt = cut_to_indices(d.masked)
        full_t = [np.flatnonzero(m) for m in d.masked]
        full_c = [np.flatnonzero(~m) for m in d.masked]
        assert tgt.shape[1] == min(len(x) for x in full_t)
        assert ctx.shape[1] == min(len(x) for x in full_c)
        for i in range(24):
            np.testing.assert_array_equal(tgt[i], full_t[i][: tgt.shape[1]])
            np.testing.assert_array_equal(ctx[i], full_c[i][: ctx.shape[1]])


def test_single_batch_row_is_uncut_and_t_major():
    """With B = 1 nothing is cut: target is exactly the box, indexed t*H*W + h*W + w."""
    grid = (4, 6, 10)
    spec = MaskBlockConfig(num_blocks=1, spatial_scale=0.3, temporal_scale=0.5, aspect_ratio=[0.5, 2.0])
    rng = np.random.default_rng(11)
    for _ in range(20):
        state = rng.bit_generator.state
        d = draw_blocks(rng, 1, grid, spec)
        rng.bit_generator.state = state
        (ctx, tgt), = sample_masks(rng, 1, grid, [spec])
        (t, h, w), (t0, top, left) = d.size, d.starts[0, 0]
        tt, hh, ww = np.meshgrid(
            np.arange(t0, t0 + t), np.arange(top, top + h), np.arange(left, left + w), indexing="ij"
        )
        expected = np.sort((tt * 60 + hh * 10 + ww).ravel())
        np.testing.assert_array_equal(tgt[0], expected)
        assert ctx.shape[1] + tgt.shape[1] == 4 * 6 * 10


# -- block geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", DEFAULT_MASKS, ids=["short", "long"])
def test_block_geometry(spec):
    T, H, W = GRID
    cells = int(spec.spatial_scale * H * W)
    assert cells == {0.15: 29, 0.70: 137}[spec.spatial_scale]
    lo, hi = spec.aspect_ratio
    rng = np.random.default_rng(5)
    sizes = set()
    for _ in range(100):
        d = draw_blocks(rng, 8, GRID, spec)
        t, h, w = d.size
        sizes.add(d.size)
        assert lo <= d.aspect <= hi
        assert d.size == block_size(spec, GRID, d.aspect)
        assert t == T  # temporal scale 1.0 spans every token slot
        assert 1 <= h <= H and 1 <= w <= W
        # h and w are sqrt(cells * aspect) and sqrt(cells / aspect) rounded, then clipped to the grid.
        assert min(H, round(math.sqrt(cells * lo))) <= h <= min(H, round(math.sqrt(cells * hi)))
        assert min(W, round(math.sqrt(cells / hi))) <= w <= min(W, round(math.sqrt(cells / lo)))
        slack = 0.5 * (math.sqrt(cells * hi) + math.sqrt(cells / lo)) + 0.25
        assert h * w <= cells + slack
        # Every block fits inside the grid, and the mask is exactly the union of the blocks.
        assert np.all(d.starts >= 0)
        assert np.all(d.starts + np.array(d.size) <= np.array(GRID))
        np.testing.assert_array_equal(d.masked, _naive_paint(d.starts, d.size, GRID))
        assert not d.masked.all(axis=1).any()
    assert len(sizes) > 1  # the size does vary from batch to batch


def test_block_size_clipped_to_grid():
    tiny = MaskBlockConfig(num_blocks=1, spatial_scale=0.001, temporal_scale=0.01)
    assert block_size(tiny, GRID, 1.0) == (1, 1, 1)
    tall = MaskBlockConfig(num_blocks=1, spatial_scale=0.9, aspect_ratio=[4.0, 4.0])
    t, h, w = block_size(tall, GRID, 4.0)
    assert h == 14 and 1 <= w <= 14


def test_impossible_spec_raises_after_max_redraws():
    full = MaskBlockConfig(num_blocks=1, spatial_scale=1.0, aspect_ratio=[1.0, 1.0])
    with pytest.raises(RuntimeError, match="no context"):
        sample_masks(np.random.default_rng(0), 2, GRID, [full], max_redraws=3)


# -- statistics against the reference ------------------------------------------------------------------

# (masked fraction per sample, fraction hidden from the context encoder after the cut to the batch minimum at
# batch 24) over the 8x14x14 = 1568-token grid, measured by running the public reference's mask generator
# (facebookresearch/jepa, src/masks/multiblock3d.py) with the V-JEPA settings; the long-range type redraws about
# 1.8% of its draws there.
REFERENCE = {"short": (0.627, 0.76), "long": (0.812, 0.93)}


@pytest.mark.parametrize("name, spec", [("short", SHORT), ("long", LONG)])
def test_statistics_match_reference(name, spec):
    stats = mask_fractions(np.random.default_rng(0), 24, GRID, spec, batches=200)
    before, after = REFERENCE[name]
    assert abs(stats["before"] - before) < 0.02, stats
    assert abs(stats["after"] - after) < 0.03, stats
    if name == "short":
        assert stats["redraw_rate"] < 0.001  # 8 blocks of about 29 cells very rarely cover all 196
    else:
        assert 0.005 < stats["redraw_rate"] < 0.05, stats  # reference: about 1.8%


# ----------------------------------------------------------------------------------------------------
# I-JEPA masks (pipeline/image_masks.py)

# Statistics of the official collator (facebookresearch/ijepa src/masks/multiblock.py, MaskCollator with the
# IN-1k ViT-H/14 recipe: enc 0.85-1.0, pred 0.15-0.2, aspect 0.75-1.5, 4 targets, min_keep 10, no overlap),
# measured over 3000 batches of 16 with torch.manual_seed(0): per grid side, the mean and std over batches of
# the context length and of the target length after the batch cut, the share of target blocks covering the
# central 4x4 cells and the corner cell, and the last row (never a target: the reference's exclusive bound).
IJEPA_REFERENCE = {
    16: {"ctx_mean": 81.19, "ctx_std": 11.17, "tgt_mean": 44.23, "tgt_std": 4.39, "center": 0.4751, "corner": 0.01145},
    14: {"ctx_mean": 59.64, "ctx_std": 8.09, "tgt_mean": 33.40, "tgt_std": 2.85, "center": 0.4549, "corner": 0.01551},
}


@pytest.mark.parametrize("side", [16, 14])  # 224 px at patch 14 and 16
def test_ijepa_masks_match_the_official_collators_statistics(side):
    from pipeline.image_masks import ImageMaskConfig, sample_image_masks

    cfg, batches, batch = ImageMaskConfig(), 1500, 16
    rng = np.random.default_rng(0)
    ctx_len, tgt_len, cover = [], [], np.zeros(side * side)
    for _ in range(batches):
        context, targets = sample_image_masks(rng, batch, (side, side), cfg)
        assert len(targets) == 4 and all(t.shape == targets[0].shape for t in targets)
        ctx_len.append(context.shape[1])
        tgt_len.append(targets[0].shape[1])
        for b in range(batch):
            for t in targets:
                assert not set(t[b].tolist()) & set(context[b].tolist())  # the context never sees a target
                cover[t[b]] += 1
        assert context.shape[1] > cfg.min_keep and np.all(np.diff(context, axis=1) > 0)  # sorted, unique
    cover = (cover / (batches * batch * 4)).reshape(side, side)
    ref = IJEPA_REFERENCE[side]
    # standard errors of the means: std / sqrt(batches) ~ 0.29 (context) and 0.11 (targets); 4 of them allowed
    assert abs(np.mean(ctx_len) - ref["ctx_mean"]) < 4 * ref["ctx_std"] / np.sqrt(batches) + 0.3
    assert abs(np.mean(tgt_len) - ref["tgt_mean"]) < 4 * ref["tgt_std"] / np.sqrt(batches) + 0.1
    assert abs(np.std(ctx_len) - ref["ctx_std"]) < 0.1 * ref["ctx_std"]
    assert abs(np.std(tgt_len) - ref["tgt_std"]) < 0.1 * ref["tgt_std"]
    c = side // 2
    assert abs(cover[c - 2:c + 2, c - 2:c + 2].mean() - ref["center"]) < 0.02
    assert abs(cover[0, 0] - ref["corner"]) < 0.006
    assert cover[-1].sum() == 0 and cover[:, -1].sum() == 0


def test_ijepa_block_size_reuses_one_draw_for_scale_and_aspect():
    """The reference draws one number for both the scale and the aspect ratio of a block: the smallest blocks
    are the widest, the largest the tallest. Values are the official `_sample_block_size`'s for the same draw."""
    from pipeline.image_masks import block_size

    assert block_size(0.0, (16, 16), (0.15, 0.2), (0.75, 1.5)) == (5, 7)  # 38 cells, aspect h/w 0.75
    assert block_size(1.0, (16, 16), (0.15, 0.2), (0.75, 1.5)) == (9, 6)  # 51 cells, aspect 1.5
    assert block_size(1.0, (16, 16), (0.85, 1.0), (1.0, 1.0)) == (15, 15)  # 256 cells, clipped below the side


def test_ijepa_blocks_that_can_never_keep_enough_cells_are_an_error_not_a_hang():
    from pipeline.image_masks import ImageMaskConfig, sample_image_masks

    with pytest.raises(ValueError, match="min_keep=10"):
        sample_image_masks(np.random.default_rng(0), 2, (1, 4, 4), ImageMaskConfig())  # 2-cell target blocks
    context, targets = sample_image_masks(np.random.default_rng(0), 2, (1, 8, 8), ImageMaskConfig(min_keep=4))
    assert context.shape[0] == 2 and len(targets) == 4
