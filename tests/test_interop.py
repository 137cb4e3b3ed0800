"""Interop with V-JEPA 2: rotary positions (pos_embed=rope) against golden values of the official code.

The golden numbers were computed by running the official facebookresearch/vjepa2 VisionTransformer and
VisionTransformerPredictor (use_rope=True, src/models) on exactly the weights and inputs built here (tiny_rope_models,
rope_inputs): the official code is not needed to run these tests.
"""

from __future__ import annotations

import dataclasses

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


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face transformers' VJEPA2Model: import, export, and the same outputs

try:
    import transformers
except ImportError:  # the test extra installs it; the rope tests above run without it
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed (pip install .[test])")

HF_TINY = dict(patch_size=8, crop_size=32, frames_per_clip=4, tubelet_size=2, hidden_size=64, num_attention_heads=2,
               num_hidden_layers=2, pred_hidden_size=48, pred_num_attention_heads=2, pred_num_hidden_layers=2,
               pred_num_mask_tokens=3, num_pooler_layers=1)
ATOL = 1e-5  # float32, same operations in a different order (fused vs separate qkv, sorted vs unsorted tokens)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.VJEPA2Model(transformers.VJEPA2Config(**HF_TINY)).eval()
    fill_deterministic(model, 3)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(folder)
    return folder, model


def hf_outputs(model, clips, keep, tgt):
    with torch.no_grad():
        out = model(pixel_values_videos=clips.permute(0, 2, 1, 3, 4), context_mask=[keep], target_mask=[tgt])
    return out.last_hidden_state, out.predictor_output.last_hidden_state


def tubelet_outputs(enc, pred, clips, keep, tgt):
    from model.vit import gather_tokens
    with torch.no_grad():
        full = enc(clips)
        # HF's predictor takes the full encoder output at the context ids (V-JEPA 2's released pipeline)
        return full, pred(gather_tokens(full, keep), keep, tgt, mask_type=1)  # HF uses mask token 1


def load_checkpoint_models(path):
    from model.exports import read_checkpoint
    cfg, enc, pred = read_checkpoint(path, "target_encoder")
    return cfg, enc, pred


@needs_hf
def test_hf_import_gives_hf_outputs_and_export_loads_back_into_transformers(hf_folder, tmp_path):
    from model.exports import main as export_main
    from model.features import load_encoder
    from model.imports import main as import_main
    folder, hf_model = hf_folder
    clips, keep, tgt = rope_inputs()
    ckpt = tmp_path / "imported.pt"
    assert import_main([str(folder), f"out={ckpt}"]) == 0
    cfg, enc, pred = load_checkpoint_models(ckpt)
    assert (cfg.pos_embed, cfg.encoder_shape, cfg.num_mask_types) == ("rope", (64, 2, 2), 3)
    ref_full, ref_pred = hf_outputs(hf_model, clips, keep, tgt)
    full, pred_out = tubelet_outputs(enc, pred, clips, keep, tgt)
    torch.testing.assert_close(full, ref_full, atol=ATOL, rtol=0)
    torch.testing.assert_close(pred_out, ref_pred, atol=ATOL, rtol=0)
    # the feature extractor (and tubelet-probe, same reader) take the imported checkpoint
    torch.testing.assert_close(load_encoder(ckpt)(clips), full, atol=0, rtol=0)

    out = tmp_path / "exported"
    assert export_main([f"checkpoint={ckpt}", "format=hf", f"out={out}"]) == 0
    back, info = transformers.VJEPA2Model.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing / unexpected / mismatched keys
    again_full, again_pred = hf_outputs(back.eval(), clips, keep, tgt)
    torch.testing.assert_close(again_full, ref_full, atol=ATOL, rtol=0)
    torch.testing.assert_close(again_pred, ref_pred, atol=ATOL, rtol=0)
    # the default format is still tubelet's encoder file
    assert export_main([f"checkpoint={ckpt}", f"out={tmp_path / 'enc.safetensors'}"]) == 0
    assert (tmp_path / "enc.safetensors").is_file()


def _bad_import(tmp_path, source, capsys, match):
    from model.imports import main as import_main
    out = tmp_path / "never.pt"
    assert import_main([str(source), f"out={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and str(source) in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


@needs_hf
def test_bad_hf_inputs_are_one_error_line_each_and_write_nothing(hf_folder, tmp_path, capsys):
    import json
    import shutil
    folder, _ = hf_folder
    no_config = tmp_path / "no_config"
    shutil.copytree(folder, no_config)
    (no_config / "config.json").unlink()
    _bad_import(tmp_path, no_config, capsys, "no config.json")

    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    _bad_import(tmp_path, truncated, capsys, "cannot be read as safetensors")

    unknown = tmp_path / "weights.bin"
    unknown.write_bytes(b"\0" * 64)
    _bad_import(tmp_path, unknown, capsys, "unknown layout")

    misfit = tmp_path / "misfit"
    shutil.copytree(folder, misfit)
    raw = json.loads((misfit / "config.json").read_text())
    raw["pred_hidden_size"] = 96  # the weights are 48 wide
    (misfit / "config.json").write_text(json.dumps(raw))
    _bad_import(tmp_path, misfit, capsys, "shape")

    deeper = tmp_path / "deeper"
    shutil.copytree(folder, deeper)
    raw = json.loads((deeper / "config.json").read_text())
    raw["num_hidden_layers"] = 1  # the file has 2: layer 1's tensors have no place
    (deeper / "config.json").write_text(json.dumps(raw))
    _bad_import(tmp_path, deeper, capsys, "no place")


def test_hf_export_refuses_sincos_models_and_existing_folders(tmp_path, capsys):
    from model.exports import main as export_main
    from model.imports import checkpoint_from_models
    from common.torch_file import write_torch_file
    cfg = ModelConfig(size="tiny", **ROPE_TINY)  # sincos
    enc, pred = VisionTransformer.from_config(cfg), Predictor.from_config(cfg)
    ckpt = write_torch_file(tmp_path / "sincos.pt", checkpoint_from_models(cfg, enc, enc, pred, "test"))
    assert export_main([f"checkpoint={ckpt}", "format=hf", f"out={tmp_path / 'hf'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rotary positions only" in err[0], err
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sincos.pt"]
    (tmp_path / "taken").mkdir()
    assert export_main([f"checkpoint={ckpt}", "format=hf", f"out={tmp_path / 'taken'}"]) == 2
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# official V-JEPA checkpoints ({'encoder', 'target_encoder', 'predictor'} under module.backbone.) and the releases


def _write_tubelet_checkpoint(path, cfg, enc, target, pred):
    from common.torch_file import write_torch_file
    from model.imports import checkpoint_from_models
    return write_torch_file(path, checkpoint_from_models(cfg, enc, target, pred, "test"))


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_official_layout_round_trip(tmp_path, pos_embed):
    """tubelet -> official file -> tubelet gives the same outputs; the key names are the official modules' (the
    mapping was checked by loading these state_dicts strictly into the official VisionTransformer and
    VisionTransformerPredictor, as for GOLDEN)."""
    from model.exports import main as export_main
    from model.imports import import_official
    cfg = ModelConfig(size="tiny", pos_embed=pos_embed, **ROPE_TINY)
    enc, pred = tiny_rope_models() if pos_embed == "rope" else (VisionTransformer.from_config(cfg).eval(),
                                                                 Predictor.from_config(cfg).eval())
    fill_deterministic(pred, 5)
    online = VisionTransformer.from_config(cfg).eval()
    fill_deterministic(online, 6)  # encoder and target_encoder differ, so weights= is seen
    ckpt = _write_tubelet_checkpoint(tmp_path / "t.pt", cfg, online, enc, pred)
    official = tmp_path / "official.pth.tar"
    assert export_main([f"checkpoint={ckpt}", "format=official", f"out={official}"]) == 0
    raw = torch.load(official, weights_only=True)
    assert "module.backbone.blocks.0.attn.qkv.weight" in raw["encoder"]
    assert "module.backbone.predictor_blocks.1.mlp.fc2.bias" in raw["predictor"]
    assert raw["predictor"]["module.backbone.mask_tokens.1"].shape == (1, 1, 64)
    assert ("module.backbone.pos_embed" in raw["target_encoder"]) == (pos_embed == "sincos")
    clips, keep, tgt = rope_inputs()
    for weights, source in (("target_encoder", enc), ("encoder", online)):
        state = import_official(official, cfg, weights)
        back = VisionTransformer.from_config(cfg).eval()
        back.load_state_dict(state["target_encoder"])
        back_pred = Predictor.from_config(cfg).eval()
        back_pred.load_state_dict(state["predictor"])
        with torch.no_grad():
            torch.testing.assert_close(back(clips, keep=keep), source(clips, keep=keep), atol=0, rtol=0)
            ctx = source(clips, keep=keep)
            torch.testing.assert_close(back_pred(ctx, keep, tgt, 1), pred(ctx, keep, tgt, 1), atol=0, rtol=0)


def test_official_import_errors(tmp_path, capsys):
    from model.imports import import_official, main as import_main
    from model.layouts import LayoutError
    cfg = ModelConfig(size="tiny", **ROPE_TINY)  # sincos
    enc, pred = VisionTransformer.from_config(cfg), Predictor.from_config(cfg)
    ckpt = _write_tubelet_checkpoint(tmp_path / "t.pt", cfg, enc, enc, pred)
    from model.exports import export_official
    official = export_official(ckpt, tmp_path / "official.pt")
    shallow = ModelConfig(size="tiny", **{**ROPE_TINY, "predictor_depth": 1})
    with pytest.raises(LayoutError, match="the predictor has 2 blocks, the config's predictor_depth is 1"):
        import_official(official, shallow)
    with pytest.raises(LayoutError, match="rotary positions"):
        import_official(official, ModelConfig(size="tiny", pos_embed="rope", **ROPE_TINY))
    with pytest.raises(LayoutError, match="not the sin-cos table"):
        import_official(official, ModelConfig(size="tiny", uniform_power=False, **ROPE_TINY))
    out = tmp_path / "never.pt"
    assert import_main([str(official), f"out={out}"]) == 2  # no release=
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "release=NAME" in err[0] and str(official) in err[0]
    assert import_main([str(official), f"out={out}", "release=vjepa2-vitl"]) == 2  # a tiny file, not ViT-L
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(official) in err[0], err
    assert not out.exists()


def test_releases_name_the_official_architectures():
    from model.releases import RELEASES, release_config
    g = release_config("vjepa2-vitg")
    assert (g.encoder_shape, g.mlp_hidden, g.pos_embed, g.img_size, g.num_frames) == ((1408, 40, 22), 6144, "rope",
                                                                                        256, 64)
    assert release_config("vjepa2-vitl").encoder_shape == (1024, 24, 16)
    assert release_config("vjepa2-vith").encoder_shape == (1280, 32, 16)
    assert release_config("vjepa2-vitg-384").img_size == 384
    assert all((c := release_config(n)).predictor_width == 384 and c.predictor_depth == 12
               and c.predictor_num_heads == 12 and c.num_mask_types == 10 for n in RELEASES if n.startswith("vjepa2"))
    with pytest.raises(ValueError, match="unknown release"):
        release_config("vjepa3")


# ----------------------------------------------------------------------------------------------------------------
# V-JEPA 1 and I-JEPA official checkpoints: a file with exactly the keys the official training code saves
# (tests/official_layouts.json, recorded from the official modules), imported, against the official modules' outputs

OFFICIAL_TINY = {
    "vjepa1": dict(img_size=32, patch_size=8, num_frames=4, tubelet_size=2, width=96, depth=2, heads=2,
                   predictor_width=64, predictor_depth=2, predictor_heads=2, num_mask_types=2),
    "ijepa": dict(img_size=32, patch_size=8, num_frames=1, tubelet_size=1, width=64, depth=2, heads=2,
                  predictor_width=32, predictor_depth=2, predictor_heads=2, num_mask_types=1, loss="smooth_l1"),
}
# Outputs of the official modules (jepa: MultiMaskWrapper(VisionTransformer), vit_predictor with 2 mask tokens;
# ijepa: VisionTransformer, vit_predictor) with the weights official_file writes, on official_inputs; the target
# encoder's. As GOLDEN: (shape, sum, abs-sum, out[1, 3, :4], out[0, -1, -3:]).
OFFICIAL_GOLDEN = {
    "vjepa1": {
        "full": ((2, 32, 96), -183.3669623353053, 5149.8940389715135, [0.593428, -0.007477, 0.933436, -1.65152],
                 [1.435874, -0.0108, 2.629726]),
        "ctx": ((2, 12, 96), -60.14965012378525, 1955.5606942771701, [-0.684555, 1.87686, -0.943535, -0.490258],
                [0.117411, -0.931293, 0.825542]),
        "pred": ((2, 20, 96), -267.31054814346135, 5006.875518398359, [-1.766778, 1.321398, 1.816335, -0.68543],
                 [1.849369, 1.593621, 0.842094])},
    "ijepa": {
        "full": ((2, 16, 64), -17.3705953998724, 1640.2333933607442, [0.535189, 0.839945, -1.608196, 0.779898],
                 [-1.650318, -1.698663, 0.711832]),
        "ctx": ((2, 6, 64), -7.329164393100655, 608.9303827444382, [0.347342, -1.785733, 1.424986, 1.225346],
                [-1.556612, -0.905941, 0.207338]),
        "pred": ((2, 10, 64), -159.5501295896247, 1209.9594004703686, [1.228486, -0.1433, 0.613037, 0.227046],
                 [-2.277756, 1.520343, 0.822291])},
}


def _official_layouts() -> dict:
    import json
    from pathlib import Path
    return json.loads((Path(__file__).parent / "official_layouts.json").read_text())


def official_file(path, kind: str, drop: str = ""):
    """A checkpoint as the official train.py saves one ({'encoder', 'predictor', 'opt', 'scaler', 'target_encoder',
    'epoch', ...}), every tensor of the recorded layout filled from one seeded generator per part in sorted key
    order (N(0, 0.2); norm weights 1 + 0.1 N); the sin-cos tables are the official ones (tubelet's, equal to 1e-7)."""
    from model.imports import sincos_tables
    layout = _official_layouts()[kind]["state"]
    cfg = ModelConfig(size="tiny", **OFFICIAL_TINY[kind])
    enc_table, pred_table = sincos_tables(cfg)
    out = {"opt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": []}]}, "scaler": None, "epoch": 3,
           "loss": 0.5, "batch_size": 2, "world_size": 1, "lr": 1e-3}
    for part, seed in (("encoder", 10), ("target_encoder", 11), ("predictor", 12)):
        gen, state = torch.Generator().manual_seed(seed), {}
        for key, shape in sorted(layout[part].items()):
            if key.endswith("pos_embed"):
                state[key] = (pred_table if "predictor" in key else enc_table).reshape(shape)
                continue
            noise = torch.randn(shape, generator=gen, dtype=torch.float64).float()
            parts = key.split(".")
            state[key] = 1 + 0.1 * noise if "norm" in parts[-2] and parts[-1] == "weight" else 0.2 * noise
        out[part] = {k: v for k, v in state.items() if k != drop}
    torch.save(out, path)
    return path, cfg


def official_inputs(kind: str):
    layout = _official_layouts()[kind]
    gen = torch.Generator().manual_seed(2)
    frames = OFFICIAL_TINY[kind]["num_frames"]
    clips = (torch.randn(2, 3, 4, 32, 32, generator=gen) if frames > 1
             else torch.randn(2, 3, 32, 32, generator=gen).unsqueeze(2))  # an image: a clip of one frame
    return clips, torch.tensor(layout["keep"]), torch.tensor(layout["tgt"])


@pytest.mark.parametrize("kind", ["vjepa1", "ijepa"])
def test_official_vjepa1_and_ijepa_checkpoints_import_with_the_official_outputs(tmp_path, kind):
    from model.imports import import_official
    path, cfg = official_file(tmp_path / f"{kind}.pth.tar", kind)
    state = import_official(path, cfg)
    assert state["config"]["model"]["num_frames"] == cfg.num_frames and state["step"] == 0
    enc, pred = VisionTransformer.from_config(cfg).eval(), Predictor.from_config(cfg).eval()
    enc.load_state_dict(state["target_encoder"])
    pred.load_state_dict(state["predictor"])
    clips, keep, tgt = official_inputs(kind)
    with torch.no_grad():
        outs = {"full": enc(clips), "ctx": enc(clips, keep=keep)}
        outs["pred"] = pred(outs["ctx"], keep, tgt, mask_type=cfg.num_mask_types - 1)  # jepa's mask_index=1
    for name, t in outs.items():
        shape, total, abs_total, row, tail = OFFICIAL_GOLDEN[kind][name]
        assert tuple(t.shape) == shape, name
        assert t.double().sum().item() == pytest.approx(total, abs=1e-3), name
        assert t.double().abs().sum().item() == pytest.approx(abs_total, rel=1e-6), name
        torch.testing.assert_close(t[1, 3, :4], torch.tensor(row), atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(t[0, -1, -3:], torch.tensor(tail), atol=1e-5, rtol=0, msg=name)
    online = import_official(path, cfg, "encoder")["target_encoder"]  # weights=encoder: the other one
    assert not torch.equal(online["blocks.0.attn.qkv.weight"], state["target_encoder"]["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("kind", ["vjepa1", "ijepa"])
def test_official_export_writes_the_official_keys_back(tmp_path, kind):
    """tubelet-export format=official of the imported checkpoint: exactly the recorded official keys and shapes
    (V-JEPA's `module.backbone.`, I-JEPA's `module.` with a Conv2d patch embedding and one mask_token)."""
    from model.exports import main as export_main
    from model.imports import import_official
    from common.torch_file import write_torch_file
    path, cfg = official_file(tmp_path / f"{kind}.pth.tar", kind)
    ckpt = write_torch_file(tmp_path / "imported.pt", import_official(path, cfg))
    assert export_main([f"checkpoint={ckpt}", "format=official", f"out={tmp_path / 'back.pth.tar'}"]) == 0
    back = torch.load(tmp_path / "back.pth.tar", weights_only=True)
    original = torch.load(path, weights_only=True)
    for part in ("target_encoder", "predictor"):
        assert {k: list(v.shape) for k, v in back[part].items()} == _official_layouts()[kind]["state"][part], part
        for key, value in original[part].items():
            torch.testing.assert_close(back[part][key], value, atol=1e-6, rtol=0, msg=key)


def test_official_vjepa1_and_ijepa_errors_name_the_file_and_write_nothing(tmp_path, capsys):
    from model.imports import import_official, main as import_main
    from model.layouts import LayoutError
    path, cfg = official_file(tmp_path / "vjepa1.pth.tar", "vjepa1")
    with pytest.raises(LayoutError, match="the predictor has 2 blocks, the config's predictor_depth is 3"):
        import_official(path, dataclasses.replace(cfg, predictor_depth=3))
    ipath, icfg = official_file(tmp_path / "ijepa.pth.tar", "ijepa")
    with pytest.raises(LayoutError, match="the predictor has 2 blocks, the config's predictor_depth is 1"):
        import_official(ipath, dataclasses.replace(icfg, predictor_depth=1))
    with pytest.raises(LayoutError, match="is not the sin-cos table of the config"):
        import_official(ipath, dataclasses.replace(icfg, patch_size=16))  # another patch: another grid
    nopos, _ = official_file(tmp_path / "nopos.pth.tar", "ijepa", drop="module.pos_embed")
    with pytest.raises(LayoutError, match="no 'pos_embed'"):
        import_official(nopos, icfg)
    out = tmp_path / "never.pt"
    for source, release in ((path, "vjepa1-vitl"), (ipath, "ijepa-vith14-in1k"), (ipath, "vjepa1-vith")):
        assert import_main([str(source), f"out={out}", f"release={release}"]) == 2  # tiny files, not the releases
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(source) in err[0] and f"not the weights of release={release}" in err[0], err
    other = tmp_path / "other.pth.tar"  # a torch file of another layout (a bare state_dict)
    torch.save(torch.load(path, weights_only=True)["encoder"], other)
    assert import_main([str(other), f"out={out}", "release=vjepa1-vitl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an official V-JEPA / I-JEPA checkpoint" in err[0] and str(other) in err[0], err
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[:5000])
    assert import_main([str(truncated), f"out={out}", "release=vjepa1-vitl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be read as a torch file" in err[0] and str(truncated) in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


# Each release's official encoder and predictor as their code builds them (jepa: vit_large / vit_huge and
# vit_predictor as app/vjepa/utils.py's init_video_model; ijepa: vit_huge / vit_giant and vit_predictor as
# src/helper.py's init_model, with the configs' values): (tensors, numbers, sha256 of the sorted "key:shape" lines,
# first 16 hex digits) of their state_dicts, pos_embed tables included, wrapper prefixes not.
OFFICIAL_RELEASE_SHAPES = {
    "vjepa1-vitl": [(293, 305490944, 'bc062a5080fbba85'), (153, 22685056, '821e1117602b256d')],
    "vjepa1-vith": [(389, 633655040, 'b9cff584caa29160'), (153, 22881920, '073dc540577a205e')],
    "vjepa1-vith-384": [(389, 637546240, '3278d46ce8879ad7'), (153, 24049280, '43f40a3ca5efd093')],
    "ijepa-vith14-in1k": [(389, 630762240, 'dff70e431848ed84'), (152, 22377728, 'ccb183b55a3c8e8a')],
    "ijepa-vith16-448-in1k": [(389, 631668480, '912cb538049f036a'), (152, 22580480, '90e1420923866ef4')],
    "ijepa-vith14-in22k": [(389, 630762240, 'dff70e431848ed84'), (152, 22377728, 'ccb183b55a3c8e8a')],
    "ijepa-vitg16-in22k": [(485, 1011368576, 'c21844e2d20dfef2'), (200, 29550976, '93d2717e11042311')],
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_RELEASE_SHAPES))
def test_each_release_builds_exactly_the_official_models_tensors(name):
    """The release's config, built (on the meta device: shapes only) and laid out officially, has exactly the keys
    and shapes of the official models: width, depth, heads' qkv, MLP, predictor depth / width, mask tokens, grid."""
    import hashlib
    import math
    from model.layouts import is_image_model, strip_prefixes, tubelet_to_official
    from model.releases import release_config
    cfg = release_config(name)
    with torch.device("meta"):
        enc, pred = VisionTransformer.from_config(cfg), Predictor.from_config(cfg)
    parts = tubelet_to_official(enc.pos_embed, pred.pos_embed, enc.state_dict(), pred.state_dict(),
                                is_image_model(cfg))
    for part, state, (count, numbers, digest) in zip(("encoder", "predictor"), parts, OFFICIAL_RELEASE_SHAPES[name]):
        shapes = {k: tuple(v.shape) for k, v in strip_prefixes(state).items()}
        lines = "\n".join(f"{k}:{v}" for k, v in sorted(shapes.items()))
        assert (len(shapes), sum(math.prod(v) for v in shapes.values())) == (count, numbers), (name, part)
        assert hashlib.sha256(lines.encode()).hexdigest()[:16] == digest, (name, part)


def test_vjepa1_and_ijepa_releases_follow_their_configs():
    from model.releases import release_config
    for name, size, shape, img in (("vjepa1-vitl", "large", (1024, 24, 16), 224),
                                   ("vjepa1-vith", "huge", (1280, 32, 16), 224),
                                   ("vjepa1-vith-384", "huge", (1280, 32, 16), 384)):
        c = release_config(name)
        assert (c.size, c.encoder_shape, c.img_size, c.num_frames, c.tubelet_size, c.patch_size) == (
            size, shape, img, 16, 2, 16), name
        assert (c.pos_embed, c.uniform_power, c.predictor_width, c.predictor_depth, c.predictor_num_heads,
                c.num_mask_types) == ("sincos", True, 384, 12, 16, 2), name
    for name, patch, img, depth in (("ijepa-vith14-in1k", 14, 224, 12), ("ijepa-vith16-448-in1k", 16, 448, 12),
                                    ("ijepa-vith14-in22k", 14, 224, 12)):
        c = release_config(name)
        assert (c.encoder_shape, c.patch_size, c.img_size, c.predictor_depth) == ((1280, 32, 16), patch, img, depth)
    g = release_config("ijepa-vitg16-in22k")
    assert (g.encoder_shape, g.mlp_hidden, g.patch_size, g.predictor_depth) == ((1408, 40, 16), 6144, 16, 16)
    for name in ("ijepa-vith14-in1k", "ijepa-vitg16-in22k"):
        c = release_config(name)
        assert (c.num_frames, c.tubelet_size, c.pos_embed, c.predictor_width, c.predictor_num_heads,
                c.num_mask_types, c.loss) == (1, 1, "sincos", 384, 16, 1, "smooth_l1")


# ----------------------------------------------------------------------------------------------------------------
# init_from: a new run from imported weights


def test_init_from_loads_the_imported_weights_and_checks_the_model_config(tmp_path):
    from common.torch_file import CheckpointError
    from model.vjepa import VJEPA
    from train.init_from import initialise
    cfg = ModelConfig(size="tiny", pos_embed="rope", **ROPE_TINY)
    enc, pred = tiny_rope_models()
    ckpt = _write_tubelet_checkpoint(tmp_path / "imported.pt", cfg, enc, enc, pred)
    model = VJEPA.from_config(dataclasses.replace(cfg, activation_checkpointing=True))  # how it trains may differ
    initialise(model, model.encoder.config, ckpt)
    for part, source in (("encoder", enc), ("target_encoder", enc), ("predictor", pred)):
        for (name, a), (_, b) in zip(getattr(model, part).state_dict().items(), source.state_dict().items()):
            assert torch.equal(a, b), (part, name)
    other = VJEPA.from_config(dataclasses.replace(cfg, pos_embed="sincos"))
    with pytest.raises(CheckpointError, match="pos_embed: 'rope' there, 'sincos' here"):
        initialise(other, dataclasses.replace(cfg, pos_embed="sincos"), ckpt)


def test_train_config_has_init_from():
    from common.config import load_config
    from train.config import TrainConfig
    assert load_config(TrainConfig, overrides=["init_from=x.pt"]).init_from == "x.pt"


def test_release_configs_survive_the_hf_config_round_trip():
    """A release's architecture -> config.json fields -> the same ModelConfig (ViT-g's 22 heads and 48/11 ratio:
    int(1408 * ratio) is 6144 both ways)."""
    from model.layouts import hf_to_model_config, model_config_to_hf
    from model.releases import RELEASES, release_config
    for name in [n for n in RELEASES if n.startswith("vjepa2")]:
        cfg = release_config(name)
        assert hf_to_model_config({"model_type": "vjepa2", **model_config_to_hf(cfg)}, name) == cfg, name
    hf_g = model_config_to_hf(release_config("vjepa2-vitg"))
    assert int(hf_g["hidden_size"] * hf_g["mlp_ratio"]) == 6144 and hf_g["num_attention_heads"] == 22


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face transformers' IJepaModel: an image encoder (no predictor) in and out

HF_IJEPA_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=32,
                     patch_size=8, layer_norm_eps=1e-6)


def ijepa_table() -> torch.Tensor:
    from model.pos_embed import sincos_pos_embed_2d
    return torch.tensor(sincos_pos_embed_2d(64, 4, 4)).unsqueeze(0)


@pytest.fixture(scope="module")
def hf_ijepa_folder(tmp_path_factory):
    """A tiny IJepaModel with deterministic weights; its position_embeddings are I-JEPA's fixed 2D sin-cos table, as
    in the released conversions of the official checkpoints (HF's class stores them as a parameter)."""
    model = transformers.IJepaModel(transformers.IJepaConfig(**HF_IJEPA_TINY)).eval()
    fill_deterministic(model, 4)
    with torch.no_grad():
        model.embeddings.position_embeddings.copy_(ijepa_table())
    folder = tmp_path_factory.mktemp("hf_ijepa") / "tiny"
    model.save_pretrained(folder)
    return folder, model


def ijepa_images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@needs_hf
def test_hf_ijepa_import_gives_hf_outputs_and_exports_back(hf_ijepa_folder, tmp_path, capsys):
    """HF -> tubelet -> HF: the imported image encoder computes IJepaModel's last_hidden_state (to ATOL, float32:
    fused against separate qkv), the exported folder loads into IJepaModel with no missing / unexpected keys and
    computes the same, and importing it again gives the first import's tensors exactly."""
    from model.exports import main as export_main
    from model.features import load_encoder
    from model.imports import main as import_main
    folder, hf_model = hf_ijepa_folder
    ckpt = tmp_path / "imported.pt"
    assert import_main([str(folder), f"out={ckpt}"]) == 0
    assert "has no predictor" in capsys.readouterr().out
    state = torch.load(ckpt, weights_only=True)
    assert "predictor" not in state and state["imported_from"] == f"hf:{folder}"
    cfg = ModelConfig(**state["config"]["model"])
    assert (cfg.num_frames, cfg.tubelet_size, cfg.pos_embed, cfg.encoder_shape, cfg.mlp_hidden) == (
        1, 1, "sincos", (64, 2, 2), 256)
    images = ijepa_images()
    with torch.no_grad():
        ref = hf_model(pixel_values=images).last_hidden_state
        ours = load_encoder(ckpt)(images.unsqueeze(2))  # an image: a clip of one frame
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)

    out = tmp_path / "exported"
    assert export_main([f"checkpoint={ckpt}", "format=hf", f"out={out}"]) == 0
    back, info = transformers.IJepaModel.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(pixel_values=images).last_hidden_state, ref, atol=ATOL, rtol=0)
    # the official layout needs a predictor: one line, nothing written
    capsys.readouterr()  # transformers' loading progress above
    assert export_main([f"checkpoint={ckpt}", "format=official", f"out={tmp_path / 'official.pt'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing key 'predictor'" in err[0], err
    assert not (tmp_path / "official.pt").exists()
    again = tmp_path / "again.pt"
    assert import_main([str(out), f"out={again}"]) == 0
    for part in ("encoder", "target_encoder"):
        first, second = state[part], torch.load(again, weights_only=True)[part]
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@needs_hf
def test_an_official_ijepa_checkpoint_exports_to_an_ijepa_model(tmp_path):
    """official I-JEPA .pth.tar -> tubelet -> IJepaModel folder: the target encoder's outputs, to ATOL."""
    from common.torch_file import write_torch_file
    from model.exports import main as export_main
    from model.imports import import_official
    path, cfg = official_file(tmp_path / "ijepa.pth.tar", "ijepa")
    ckpt = write_torch_file(tmp_path / "imported.pt", import_official(path, cfg))
    assert export_main([f"checkpoint={ckpt}", "format=hf", f"out={tmp_path / 'hf'}"]) == 0
    model, info = transformers.IJepaModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    clips, _, _ = official_inputs("ijepa")
    with torch.no_grad():
        out = model.eval()(pixel_values=clips[:, :, 0]).last_hidden_state
    shape, total, abs_total, row, _ = OFFICIAL_GOLDEN["ijepa"]["full"]
    assert tuple(out.shape) == shape and out.double().abs().sum().item() == pytest.approx(abs_total, rel=1e-6)
    torch.testing.assert_close(out[1, 3, :4], torch.tensor(row), atol=ATOL, rtol=0)


@needs_hf
def test_bad_hf_ijepa_inputs_are_one_error_line_each_and_write_nothing(hf_ijepa_folder, tmp_path, capsys):
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    folder, _ = hf_ijepa_folder

    def variant(name, config=None, tensors=None):
        target = tmp_path / name
        shutil.copytree(folder, target)
        if config:
            raw = json.loads((target / "config.json").read_text())
            (target / "config.json").write_text(json.dumps({**raw, **config}))
        if tensors:
            state = load_file(target / "model.safetensors")
            save_file({**state, **tensors}, target / "model.safetensors")
        return target

    no_config = variant("no_config")
    (no_config / "config.json").unlink()
    _bad_import(tmp_path, no_config, capsys, "no config.json")
    truncated = variant("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    _bad_import(tmp_path, truncated, capsys, "cannot be read as safetensors")
    learned = variant("learned", tensors={"embeddings.position_embeddings": torch.randn(1, 16, 64)})
    _bad_import(tmp_path, learned, capsys, "is not the sin-cos table")
    _bad_import(tmp_path, variant("deeper", config={"num_hidden_layers": 1}), capsys, "no place")
    _bad_import(tmp_path, variant("ratio", config={"intermediate_size": 192}), capsys, "mlp_ratio 3.0")
    _bad_import(tmp_path, variant("eps", config={"layer_norm_eps": 1e-12}), capsys, "layer_norm_eps")
    # the same 4x4 grid (same table), 16-pixel patches: the patch embedding's weights do not fit
    _bad_import(tmp_path, variant("patch", config={"image_size": 64, "patch_size": 16}), capsys, "shape")


@needs_hf
def test_init_from_refuses_an_encoder_only_import_in_one_line(hf_ijepa_folder, tmp_path):
    from common.torch_file import CheckpointError
    from model.imports import import_weights
    from common.torch_file import write_torch_file
    from model.vjepa import VJEPA
    from train.init_from import initialise
    folder, _ = hf_ijepa_folder
    state = import_weights(folder)
    ckpt = write_torch_file(tmp_path / "imported.pt", state)
    cfg = ModelConfig(**state["config"]["model"])
    model = VJEPA.from_config(cfg)
    with pytest.raises(CheckpointError, match="has no predictor") as e:
        initialise(model, cfg, ckpt)
    assert "\n" not in str(e.value) and f"hf:{folder}" in str(e.value)


def test_hf_ijepa_config_round_trip_of_the_ijepa_releases():
    from model.layouts import hf_ijepa_to_model_config, model_config_to_hf_ijepa
    from model.releases import RELEASES, release_config
    for name in [n for n in RELEASES if n.startswith("ijepa")]:
        cfg = release_config(name)
        back = hf_ijepa_to_model_config({"model_type": "ijepa", **model_config_to_hf_ijepa(cfg)}, name)
        # the folder has no predictor: the one recorded is I-JEPA's ViT-H predictor (ViT-g's is 16 deep)
        assert dataclasses.replace(back, predictor_depth=cfg.predictor_depth) == cfg and back.predictor_depth == 12
