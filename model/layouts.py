"""Weight layouts of other V-JEPA / I-JEPA implementations and tubelet's own: key names, the config fields that fix
the architecture, and strict conversion in both directions (every tensor placed, or an error naming it).

hf: Hugging Face transformers' VJEPA2Model (transformers/models/vjepa2/modeling_vjepa2.py), a folder with
config.json and safetensors. It always uses rotary positions, so it maps to and from pos_embed=rope models only.
Its attention has separate query / key / value projections where tubelet has one fused qkv (rows [q | k | v],
the order `Attention.forward` splits them in).
hf ijepa: transformers' IJepaModel (models/ijepa): the encoder of an image model only (no predictor), with a
Conv2d patch embedding and its sin-cos table stored as `position_embeddings`.
official: the facebookresearch/jepa, vjepa2 and ijepa training checkpoints (below).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model.config import MLP_RATIOS, VIT_SIZES, ModelConfig, as_model_config


class LayoutError(ValueError):
    """Weights or a config that do not fit a layout; the message names the file and the key."""


def is_image_model(cfg: ModelConfig) -> bool:
    """An I-JEPA model: clips of one frame (so tubelet size 1), as the trainer tells them apart. Its layouts
    elsewhere have a Conv2d patch embedding [D, 3, p, p] where tubelet has a Conv3d [D, 3, 1, p, p]."""
    return cfg.num_frames == 1


# tubelet block key suffix -> HF layer key suffix (besides the fused qkv, split below)
_BLOCK = {"norm1": "norm1", "attn.proj": "attention.proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
          "mlp.fc2": "mlp.fc2"}
_QKV = ("query", "key", "value")


def _block_keys(tub_prefix: str, hf_prefix: str) -> dict[str, str]:
    return {f"{tub_prefix}.{t}.{p}": f"{hf_prefix}.{h}.{p}" for t, h in _BLOCK.items() for p in ("weight", "bias")}


def hf_key_map(part: str, depth: int) -> dict[str, str]:
    """tubelet key -> HF VJEPA2Model key for the encoder or predictor (the fused qkv keys excluded)."""
    if part == "encoder":
        out = {"patch_embed.proj.weight": "encoder.embeddings.patch_embeddings.proj.weight",
               "patch_embed.proj.bias": "encoder.embeddings.patch_embeddings.proj.bias",
               "norm.weight": "encoder.layernorm.weight", "norm.bias": "encoder.layernorm.bias"}
        for i in range(depth):
            out.update(_block_keys(f"blocks.{i}", f"encoder.layer.{i}"))
        return out
    out = {"predictor_embed.weight": "predictor.embeddings.predictor_embeddings.weight",
           "predictor_embed.bias": "predictor.embeddings.predictor_embeddings.bias",
           "mask_tokens": "predictor.embeddings.mask_tokens",
           "norm.weight": "predictor.layernorm.weight", "norm.bias": "predictor.layernorm.bias",
           "predictor_proj.weight": "predictor.proj.weight", "predictor_proj.bias": "predictor.proj.bias"}
    for i in range(depth):
        out.update(_block_keys(f"blocks.{i}", f"predictor.layer.{i}"))
    return out


def _hf_qkv(part: str, i: int) -> tuple[str, str]:
    return f"blocks.{i}.attn.qkv", f"{part}.layer.{i}.attention"


def pop_fused_qkv(state: dict, hf_prefix: str, where: str) -> dict[str, torch.Tensor]:
    """HF's separate query / key / value projections under `hf_prefix`, popped from `state` and fused into
    tubelet's qkv rows [q | k | v]: {'weight': ..., 'bias': ...}."""
    out = {}
    for p in ("weight", "bias"):
        names = [f"{hf_prefix}.{n}.{p}" for n in _QKV]
        absent = [n for n in names if n not in state]
        if absent:
            raise LayoutError(f"{where}: missing key {absent[0]!r}")
        out[p] = torch.cat([state.pop(n) for n in names], dim=0)
    return out


def pop_split_qkv(state: dict, tub_prefix: str, hf_prefix: str, part: str) -> dict[str, torch.Tensor]:
    """tubelet's fused qkv under `tub_prefix`, popped from `state` and split into HF's query / key / value
    projections under `hf_prefix` (the inverse of `pop_fused_qkv`)."""
    out = {}
    for p in ("weight", "bias"):
        key = f"{tub_prefix}.{p}"
        if key not in state:
            raise LayoutError(f"{part}: missing tubelet key {key!r}")
        for name, chunk in zip(_QKV, state.pop(key).chunk(3, dim=0)):
            out[f"{hf_prefix}.{name}.{p}"] = chunk.detach().contiguous()
    return out


def tubelet_to_hf(encoder: Mapping[str, torch.Tensor], predictor: Mapping[str, torch.Tensor],
                  cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """tubelet encoder and predictor state_dicts -> one HF VJEPA2Model state_dict. Strict: a tubelet key left
    over, or one the layout needs and the state lacks, is a LayoutError."""
    out: dict[str, torch.Tensor] = {}
    for part, state, depth in (("encoder", encoder, cfg.encoder_shape[1]), ("predictor", predictor,
                                                                            cfg.predictor_depth)):
        state = dict(state)
        for tub, hf in hf_key_map(part, depth).items():
            if tub not in state:
                raise LayoutError(f"{part}: missing tubelet key {tub!r}")
            out[hf] = state.pop(tub).detach().contiguous()
        for i in range(depth):
            out.update(pop_split_qkv(state, *_hf_qkv(part, i), part))
        if state:
            raise LayoutError(f"{part}: tubelet keys with no place in the HF layout: {sorted(state)[:8]}")
    return out


def hf_to_tubelet(state: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One HF VJEPA2Model state_dict -> (encoder, predictor) tubelet state_dicts. Strict: an HF key that is not
    placed, or one that is missing, is a LayoutError naming `where` (the file) and the key."""
    state = dict(state)
    parts = []
    for part, depth in (("encoder", cfg.encoder_shape[1]), ("predictor", cfg.predictor_depth)):
        out = {}
        for tub, hf in hf_key_map(part, depth).items():
            if hf not in state:
                raise LayoutError(f"{where}: missing key {hf!r} (config: {part} depth {depth})")
            out[tub] = state.pop(hf)
        for i in range(depth):
            tub, hf = _hf_qkv(part, i)
            out.update({f"{tub}.{p}": t for p, t in pop_fused_qkv(state, hf, where).items()})
        parts.append(out)
    if state:
        extra = sorted(state)
        raise LayoutError(f"{where}: {len(extra)} tensors with no place in a tubelet encoder + predictor "
                          f"(more layers than config.json says, or another model's weights): {extra[:6]}")
    return parts[0], parts[1]


# --------------------------------------------------------------------------------------------------------------
# configs


def _need(raw: Mapping, key: str, where: str):
    if key not in raw:
        raise LayoutError(f"{where}: missing field {key!r}")
    return raw[key]


def _size_for(width: int, depth: int, heads: int, mlp_ratio: float, where: str) -> dict:
    """ModelConfig size fields for an encoder shape: the published size of that width whose MLP ratio matches,
    with depth/heads overrides where they differ; a ratio no size has is an error (tubelet's MLP width follows
    the size)."""
    for size, (w, d, h) in VIT_SIZES.items():
        if w == width and abs(MLP_RATIOS.get(size, 4.0) - mlp_ratio) < 1e-9:
            return {"size": size, "depth": 0 if d == depth else depth, "heads": 0 if h == heads else heads}
    if abs(mlp_ratio - 4.0) < 1e-9:
        return {"size": "tiny", "width": width, "depth": depth, "heads": heads}
    raise LayoutError(f"{where}: mlp_ratio {mlp_ratio} with hidden_size {width} is not an architecture tubelet "
                      f"builds (MLP ratio 4, or {MLP_RATIOS} for those sizes)")


def hf_to_model_config(raw: Mapping, where: str) -> ModelConfig:
    """HF VJEPA2Config fields (config.json) -> ModelConfig (pos_embed=rope). Fields tubelet cannot represent
    (another activation, no qkv bias, a predictor MLP ratio but 4, ...) are errors naming the field."""
    if raw.get("model_type") != "vjepa2":
        raise LayoutError(f"{where}: model_type is {raw.get('model_type')!r}, expected 'vjepa2' or 'ijepa'")
    fixed = {"hidden_act": "gelu", "qkv_bias": True, "in_chans": 3, "pred_mlp_ratio": 4.0, "layer_norm_eps": 1e-6}
    for key, want in fixed.items():
        if key in raw and raw[key] != want:
            raise LayoutError(f"{where}: {key}={raw[key]!r}, tubelet's models have {want!r}")
    patch = _need(raw, "patch_size", where)
    if not isinstance(patch, int):
        raise LayoutError(f"{where}: patch_size {patch!r}: only square patches (an int) are supported")
    fields = _size_for(_need(raw, "hidden_size", where), _need(raw, "num_hidden_layers", where),
                       _need(raw, "num_attention_heads", where), float(raw.get("mlp_ratio", 4.0)), where)
    try:
        return as_model_config(dict(
            fields, img_size=_need(raw, "crop_size", where), num_frames=_need(raw, "frames_per_clip", where),
            patch_size=patch, tubelet_size=_need(raw, "tubelet_size", where),
            predictor_width=_need(raw, "pred_hidden_size", where),
            predictor_depth=_need(raw, "pred_num_hidden_layers", where),
            predictor_heads=_need(raw, "pred_num_attention_heads", where),
            num_mask_types=_need(raw, "pred_num_mask_tokens", where), pos_embed="rope"))
    except ValueError as e:
        raise LayoutError(f"{where}: {e}") from None


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> VJEPA2Config keyword arguments. Only rope models have an HF counterpart."""
    if cfg.pos_embed != "rope":
        raise LayoutError("model.pos_embed is sincos; Hugging Face's VJEPA2Model has rotary positions only "
                          "(export a pos_embed=rope model)")
    width, depth, heads = cfg.encoder_shape
    return dict(patch_size=cfg.patch_size, crop_size=cfg.img_size, frames_per_clip=cfg.num_frames,
                tubelet_size=cfg.tubelet_size, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                mlp_ratio=cfg.mlp_hidden / width, in_chans=3, qkv_bias=True, hidden_act="gelu",
                layer_norm_eps=1e-6, pred_hidden_size=cfg.predictor_width, pred_num_hidden_layers=cfg.predictor_depth,
                pred_num_attention_heads=cfg.predictor_num_heads, pred_num_mask_tokens=cfg.num_mask_types,
                pred_mlp_ratio=4.0)


# --------------------------------------------------------------------------------------------------------------
# hf ijepa: transformers' IJepaModel, as save_pretrained writes it (and the hub holds it): ViT key names


_IJEPA_BLOCK = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
                "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
IJEPA_POSITIONS = "embeddings.position_embeddings"


def ijepa_key_map(depth: int) -> dict[str, str]:
    """tubelet encoder key -> HF IJepaModel key (the fused qkv and the position table excluded)."""
    out = {"patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for i in range(depth):
        out.update({f"blocks.{i}.{t}.{p}": f"encoder.layer.{i}.{h}.{p}" for t, h in _IJEPA_BLOCK.items()
                    for p in ("weight", "bias")})
    return out


def ijepa_hf_to_tubelet(state: Mapping[str, torch.Tensor], cfg: ModelConfig, table: torch.Tensor, where: str
                        ) -> dict[str, torch.Tensor]:
    """An HF IJepaModel state_dict -> a tubelet image encoder's. Strict like hf_to_tubelet; the stored position
    table must be the config's fixed 2D sin-cos table (tubelet's image model does not learn positions)."""
    state = dict(state)
    if IJEPA_POSITIONS not in state:
        raise LayoutError(f"{where}: missing key {IJEPA_POSITIONS!r}")
    _check_table({"position_embeddings": state.pop(IJEPA_POSITIONS)}, "position_embeddings", table, where)
    depth = cfg.encoder_shape[1]
    out = {}
    for tub, hf in ijepa_key_map(depth).items():
        if hf not in state:
            raise LayoutError(f"{where}: missing key {hf!r} (config: depth {depth})")
        out[tub] = state.pop(hf)
    if out["patch_embed.proj.weight"].dim() == 4:  # Conv2d [D, 3, p, p] -> Conv3d [D, 3, 1, p, p]
        out["patch_embed.proj.weight"] = out["patch_embed.proj.weight"].unsqueeze(2)
    for i in range(depth):
        qkv = pop_fused_qkv(state, f"encoder.layer.{i}.attention.attention", where)
        out.update({f"blocks.{i}.attn.qkv.{p}": t for p, t in qkv.items()})
    if state:
        extra = sorted(state)
        raise LayoutError(f"{where}: {len(extra)} tensors with no place in a tubelet image encoder (more layers "
                          f"than config.json says, a pooler, or another model's weights): {extra[:6]}")
    return out


def tubelet_to_ijepa_hf(encoder: Mapping[str, torch.Tensor], cfg: ModelConfig, table: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
    """A tubelet image encoder's state_dict -> an HF IJepaModel's (its position table: the fixed sin-cos one)."""
    state = dict(encoder)
    depth = cfg.encoder_shape[1]
    out = {IJEPA_POSITIONS: table.reshape(1, *table.shape).contiguous()}
    for tub, hf in ijepa_key_map(depth).items():
        if tub not in state:
            raise LayoutError(f"encoder: missing tubelet key {tub!r}")
        out[hf] = state.pop(tub).detach()
    out["embeddings.patch_embeddings.projection.weight"] = out["embeddings.patch_embeddings.projection.weight"][:, :, 0]
    for i in range(depth):
        out.update(pop_split_qkv(state, f"blocks.{i}.attn.qkv", f"encoder.layer.{i}.attention.attention", "encoder"))
    if state:
        raise LayoutError(f"encoder: tubelet keys with no place in the HF IJepaModel layout: {sorted(state)[:8]}")
    return {k: v.contiguous() for k, v in out.items()}


# I-JEPA's released predictor (model.releases), recorded in the config of an encoder-only import: the folder does not
# say, and no predictor weights come with it (an import of an IJepaModel cannot start init_from)
IJEPA_PREDICTOR = dict(predictor_width=384, predictor_depth=12, num_mask_types=1)


def hf_ijepa_to_model_config(raw: Mapping, where: str) -> ModelConfig:
    """HF IJepaConfig fields (config.json) -> the ModelConfig of a tubelet image model (one frame, tubelet size 1,
    sin-cos positions). Fields tubelet cannot represent are errors naming the field."""
    fixed = {"hidden_act": "gelu", "qkv_bias": True, "num_channels": 3, "layer_norm_eps": 1e-6}
    for key, want in fixed.items():
        if key in raw and raw[key] != want:
            raise LayoutError(f"{where}: {key}={raw[key]!r}, tubelet's models have {want!r}")
    for key in ("image_size", "patch_size"):
        if not isinstance(_need(raw, key, where), int):
            raise LayoutError(f"{where}: {key} {raw[key]!r}: only square images and patches (an int) are supported")
    width, heads = _need(raw, "hidden_size", where), _need(raw, "num_attention_heads", where)
    fields = _size_for(width, _need(raw, "num_hidden_layers", where), heads,
                       _need(raw, "intermediate_size", where) / width, where)
    try:
        return as_model_config(dict(
            fields, img_size=raw["image_size"], patch_size=raw["patch_size"], num_frames=1, tubelet_size=1,
            pos_embed="sincos", loss="smooth_l1", **IJEPA_PREDICTOR,
            # the encoder's heads, as I-JEPA builds its predictor; 12 for an encoder whose heads do not divide 384
            predictor_heads=heads if IJEPA_PREDICTOR["predictor_width"] % heads == 0 else 12))
    except ValueError as e:
        raise LayoutError(f"{where}: {e}") from None


def model_config_to_hf_ijepa(cfg: ModelConfig) -> dict:
    """ModelConfig of an image model -> IJepaConfig keyword arguments."""
    if not is_image_model(cfg) or cfg.pos_embed != "sincos":
        raise LayoutError(f"Hugging Face's IJepaModel is an image model with sin-cos positions; this one has "
                          f"num_frames={cfg.num_frames}, pos_embed={cfg.pos_embed}")
    width, depth, heads = cfg.encoder_shape
    return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=cfg.mlp_hidden,
                hidden_act="gelu", layer_norm_eps=1e-6, image_size=cfg.img_size, patch_size=cfg.patch_size,
                num_channels=3, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def check_shapes(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where: str) -> None:
    """Same keys and shapes as a freshly built module's state_dict, or a LayoutError naming the first misfit."""
    for key in sorted(set(expected) | set(state)):
        if key not in state:
            raise LayoutError(f"{where}: missing {key!r}")
        if key not in expected:
            raise LayoutError(f"{where}: unexpected {key!r}")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise LayoutError(f"{where}: {key} has shape {tuple(state[key].shape)}, the config's model needs "
                              f"{tuple(expected[key].shape)}")



# --------------------------------------------------------------------------------------------------------------
# official: facebookresearch/jepa (V-JEPA 1), vjepa2 and ijepa training checkpoints, a torch file holding
# {'encoder', 'target_encoder', 'predictor', ...} state_dicts whose keys carry the wrappers' prefixes
# (DistributedDataParallel's `module.`; V-JEPA's MultiSeqWrapper adds `backbone.`). Encoder keys are tubelet's;
# the predictor names its blocks predictor_blocks and its norm predictor_norm. V-JEPA keeps one Parameter per mask
# token (mask_tokens.0, .1, ...), I-JEPA one `mask_token`; I-JEPA's patch embedding is a Conv2d. Sin-cos models
# store their (fixed) table as pos_embed / predictor_pos_embed.

OFFICIAL_PREFIXES = ("module.", "backbone.")
OFFICIAL_WRITE_PREFIX = "module.backbone."  # what the official V-JEPA training code's wrappers produce
IJEPA_WRITE_PREFIX = "module."  # I-JEPA's: DistributedDataParallel only


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes=OFFICIAL_PREFIXES) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (by default the official `module.` / `backbone.`) while every key carries the same one."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _check_table(state: dict, key: str, table: torch.Tensor | None, where: str) -> None:
    """An official sin-cos table must be the one tubelet computes for the config (same positions); a rope model
    has none."""
    if key not in state:
        if table is not None:
            raise LayoutError(f"{where}: no {key!r}, but the config has sin-cos positions (pos_embed=sincos)")
        return
    found = state.pop(key)
    if table is None:
        raise LayoutError(f"{where}: has a {key!r} table but the config has rotary positions (pos_embed=rope)")
    if tuple(found.shape[-2:]) != tuple(table.shape) or not torch.allclose(found.reshape(table.shape).float(),
                                                                           table.float(), atol=1e-5):
        raise LayoutError(f"{where}: {key} {tuple(found.shape)} is not the sin-cos table of the config "
                          f"({tuple(table.shape)}; check img_size, patch_size, num_frames, uniform_power)")


PATCH_WEIGHT = "patch_embed.proj.weight"


def official_to_tubelet_encoder(state: Mapping[str, torch.Tensor], table: torch.Tensor | None, where: str) -> dict:
    state = strip_prefixes(state)
    _check_table(state, "pos_embed", table, where)
    if PATCH_WEIGHT in state and state[PATCH_WEIGHT].dim() == 4:  # I-JEPA's Conv2d: one frame, tubelet size 1
        state[PATCH_WEIGHT] = state[PATCH_WEIGHT].unsqueeze(2)
    return state


def official_to_tubelet_predictor(state: Mapping[str, torch.Tensor], table: torch.Tensor | None, depth: int,
                                  where: str) -> dict:
    state = strip_prefixes(state)
    _check_table(state, "predictor_pos_embed", table, where)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("predictor_blocks.")}
    if len(blocks) != depth:
        raise LayoutError(f"{where}: the predictor has {len(blocks)} blocks, the config's predictor_depth is {depth}")
    tokens = sorted((k for k in state if k.startswith("mask_tokens.")), key=lambda k: int(k.split(".")[1]))
    out = {}
    if tokens:
        out["mask_tokens"] = torch.stack([state.pop(k).reshape(1, 1, -1) for k in tokens])
    if "mask_token" in state:  # I-JEPA: one token for every target block
        out["mask_tokens"] = state.pop("mask_token").reshape(1, 1, 1, -1)
    for k, v in state.items():
        for old, new in (("predictor_blocks.", "blocks."), ("predictor_norm.", "norm.")):
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


def tubelet_to_official(encoder_table: torch.Tensor | None, predictor_table: torch.Tensor | None,
                        encoder: Mapping, predictor: Mapping, image: bool = False) -> tuple[dict, dict]:
    """tubelet encoder / predictor state_dicts -> the official ones, with the official wrappers' prefixes: V-JEPA's
    layout, or with `image` (an image model) I-JEPA's."""
    enc = dict(encoder)
    if encoder_table is not None:
        enc["pos_embed"] = encoder_table.unsqueeze(0)
    if image:
        enc[PATCH_WEIGHT] = enc[PATCH_WEIGHT].squeeze(2)
    pred = {}
    for k, v in predictor.items():
        if k == "mask_tokens":
            if image:
                if v.shape[0] != 1:
                    raise LayoutError(f"I-JEPA's predictor has one mask token, this one has {v.shape[0]} "
                                      f"(model.num_mask_types)")
                pred["mask_token"] = v.reshape(1, 1, -1)
            else:
                pred.update({f"mask_tokens.{i}": v[i] for i in range(v.shape[0])})
            continue
        if k.startswith(("blocks.", "norm.")):
            k = "predictor_" + k
        pred[k] = v
    if predictor_table is not None:
        pred["predictor_pos_embed"] = predictor_table.unsqueeze(0)
    add = IJEPA_WRITE_PREFIX if image else OFFICIAL_WRITE_PREFIX
    return ({add + k: v.detach().contiguous() for k, v in enc.items()},
            {add + k: v.detach().contiguous() for k, v in pred.items()})
