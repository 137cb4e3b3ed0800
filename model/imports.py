"""Released weights -> a tubelet checkpoint: the format train/checkpoint.py writes (step 0, encoder, predictor,
target_encoder, config.model), so tubelet-probe, feature extraction and tubelet-export take it like a trained one.

SOURCE is
- a Hugging Face V-JEPA 2 folder (config.json + model.safetensors, or a model.safetensors.index.json with its
  shards), as `VJEPA2Model.save_pretrained` writes and the hub holds. Its one encoder (the release's target
  encoder) is stored as both encoder and target_encoder;
- a Hugging Face I-JEPA folder (`IJepaModel`, config.json model_type "ijepa"): an image encoder without a
  predictor, so the checkpoint has none either (the import says so): it is for tubelet-probe, feature extraction
  and tubelet-export; init_from refuses it (train/init_from.py). (transformers' convert_ijepa_to_hf.py converted
  the official files' `encoder`, not their target encoder: import the .pth.tar with release= for the EMA one);
- an official V-JEPA 1/2 or I-JEPA checkpoint (.pt, .pth, .pth.tar: {'encoder', 'target_encoder', 'predictor',
  ...}, keys under `module.` / `module.backbone.`), with release=NAME naming its architecture (model.releases: the
  file holds weights only). weights=target_encoder
  (the EMA encoder, the default) or encoder picks the one stored as target_encoder; the other slot gets the same.

Nothing runs code from the source: config.json is JSON, the weights are safetensors or a torch file read with
`torch.load(weights_only=True)`. Every tensor is placed in the
model built from the config or the import fails naming the file and key, and nothing is written.

CLI:  tubelet-import SOURCE out=CKPT.pt [release=NAME] [weights=target_encoder|encoder]
      (or source=SOURCE; python -m model.imports)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.cli import main_for
from common.config import check
from common.torch_file import CheckpointError, write_torch_file
from model.config import ModelConfig
from model.layouts import (LayoutError, check_shapes, hf_ijepa_to_model_config, hf_to_model_config, hf_to_tubelet,
                           ijepa_hf_to_tubelet, official_to_tubelet_encoder, official_to_tubelet_predictor)
from model.releases import RELEASES, release_config
from model.pos_embed import sincos_pos_embed_3d
from model.predictor import Predictor
from model.vit import VisionTransformer

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(raw, dict):
        raise LayoutError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a damaged or truncated file is a LayoutError naming it."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type (SafetensorError) is not importable from python
        raise LayoutError(f"{path}: cannot be read as safetensors (damaged or truncated?): {e}") from None


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json fields, every tensor) of a Hugging Face model folder."""
    if not (folder / "config.json").is_file():
        raise LayoutError(f"{folder}: no config.json; a Hugging Face model folder holds config.json and "
                          f"{HF_WEIGHTS} (or {HF_INDEX} with its shards)")
    raw = read_json(folder / "config.json")
    if (folder / HF_WEIGHTS).is_file():
        files = [folder / HF_WEIGHTS]
    elif (folder / HF_INDEX).is_file():
        weight_map = read_json(folder / HF_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LayoutError(f"{folder / HF_INDEX}: no 'weight_map' object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        raise LayoutError(f"{folder}: no {HF_WEIGHTS} or {HF_INDEX} (only safetensors weights are read)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise LayoutError(f"{path}: listed in {HF_INDEX} but missing")
        tensors = read_safetensors(path)
        twice = sorted(set(tensors) & set(state))
        if twice:
            raise LayoutError(f"{path}: tensors also in another shard: {twice[:4]}")
        state.update(tensors)
    return raw, state


def build_models(cfg: ModelConfig, encoder: dict, predictor: dict | None, where: str
                 ) -> tuple[VisionTransformer, Predictor | None]:
    """The config's encoder and predictor with `encoder` / `predictor` loaded (predictor None: the encoder alone,
    and None for it); a key or shape that does not fit is a LayoutError naming `where`."""
    enc = VisionTransformer.from_config(cfg)
    check_shapes(enc.state_dict(), encoder, f"{where} (encoder)")
    enc.load_state_dict(encoder, strict=True)
    if predictor is None:
        return enc.eval(), None
    pred = Predictor.from_config(cfg)
    check_shapes(pred.state_dict(), predictor, f"{where} (predictor)")
    pred.load_state_dict(predictor, strict=True)
    return enc.eval(), pred.eval()


def checkpoint_from_models(cfg: ModelConfig, enc: VisionTransformer, target: VisionTransformer,
                           pred: Predictor | None, source: str) -> dict:
    """A step-0 training checkpoint (train/checkpoint.py's parts a reader needs; no optimizer: a run started from
    it builds a fresh one). pred None: the source has no predictor (an HF IJepaModel), and neither has this."""
    out = {"step": 0, "skipped_steps": 0, "encoder": enc.state_dict(), "target_encoder": target.state_dict(),
           "config": {"model": dataclasses.asdict(cfg)}, "imported_from": source}
    if pred is not None:
        out["predictor"] = pred.state_dict()
    return out


def import_hf(folder: Path) -> dict:
    raw, state = read_hf_folder(folder)
    where = str(folder / (HF_WEIGHTS if (folder / HF_WEIGHTS).is_file() else HF_INDEX))
    if raw.get("model_type") == "ijepa":  # an image encoder, no predictor
        cfg = hf_ijepa_to_model_config(raw, str(folder / "config.json"))
        enc, _ = build_models(cfg, ijepa_hf_to_tubelet(state, cfg, sincos_tables(cfg)[0], where), None, where)
        return checkpoint_from_models(cfg, enc, enc, None, f"hf:{folder}")
    cfg = hf_to_model_config(raw, str(folder / "config.json"))
    enc_state, pred_state = hf_to_tubelet(state, cfg, where)
    enc, pred = build_models(cfg, enc_state, pred_state, where)
    return checkpoint_from_models(cfg, enc, enc, pred, f"hf:{folder}")


OFFICIAL_SUFFIXES = (".pt", ".pth", ".pth.tar", ".tar")


def read_official(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # an unpickling error (code objects refused), or a damaged file
        try:  # old-style (non-zip) torch files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise LayoutError(f"{path}: cannot be read as a torch file of tensors (weights_only=True): {e}") from None
    missing = [k for k in ("encoder", "target_encoder", "predictor") if not isinstance(state, dict) or k not in state]
    if missing:
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise LayoutError(f"{path}: not an official V-JEPA / I-JEPA checkpoint, no {missing} (found: {found})")
    return state


def sincos_tables(cfg: ModelConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The encoder's and predictor's sin-cos tables of `cfg` (None with rope), without building the models."""
    if cfg.pos_embed == "rope":
        return None, None
    return tuple(torch.tensor(sincos_pos_embed_3d(width, *cfg.grid, uniform_power=cfg.uniform_power))
                 for width in (cfg.encoder_width, cfg.predictor_width))


def import_official(path: Path, cfg: ModelConfig, weights: str = "target_encoder") -> dict:
    """An official V-JEPA or I-JEPA training checkpoint with the architecture `cfg` -> the tubelet checkpoint dict."""
    state = read_official(path)
    enc_table, pred_table = sincos_tables(cfg)
    enc_state = official_to_tubelet_encoder(state[weights], enc_table, f"{path} ({weights})")
    pred_state = official_to_tubelet_predictor(state["predictor"], pred_table, cfg.predictor_depth,
                                               f"{path} (predictor)")
    enc, pred = build_models(cfg, enc_state, pred_state, f"{path} ({weights})")
    return checkpoint_from_models(cfg, enc, enc, pred, f"official:{path}:{weights}")


def import_weights(source: str | Path, weights: str = "target_encoder", release: str = "") -> dict:
    """The tubelet checkpoint (a dict, not yet written) of a released model at `source`."""
    path = Path(source)
    if path.is_dir():
        if weights != "target_encoder" or release:
            raise LayoutError(f"{path}: a Hugging Face folder has one encoder (the release's target encoder) and "
                              f"its config.json; weights= and release= apply to official checkpoint files")
        return import_hf(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.name.endswith(OFFICIAL_SUFFIXES):
        if not release:
            raise LayoutError(f"{path}: an official checkpoint holds weights only; name its architecture with "
                              f"release=NAME, one of {sorted(RELEASES)}")
        try:
            return import_official(path, release_config(release), weights)
        except LayoutError as e:  # the weights fit another architecture: say which one was asked for
            raise LayoutError(f"{e}; not the weights of release={release} ({RELEASES[release][0]})?") from None
    raise LayoutError(f"{path}: unknown layout; expected a Hugging Face folder (config.json + {HF_WEIGHTS}) or an "
                      f"official checkpoint ({', '.join(OFFICIAL_SUFFIXES)})")


@dataclass
class ImportConfig:
    source: str = ""  # a Hugging Face VJEPA2Model / IJepaModel folder, or an official .pt / .pth.tar
    out: str = ""  # the tubelet checkpoint (.pt) to write
    weights: str = "target_encoder"  # target_encoder | encoder: which encoder of a source that holds both
    release: str = ""  # an official checkpoint's architecture (model.releases), e.g. vjepa2-vitl

    def validate(self) -> None:
        check(bool(self.source), "source", "name the released weights (a Hugging Face folder or official .pt)")
        check(bool(self.out), "out", "name the checkpoint (.pt) to write")
        check(self.weights in ("target_encoder", "encoder"), "weights",
              f"expected target_encoder or encoder, got {self.weights!r}")


def main(argv: list[str] | None = None) -> int:
    def run(cfg: ImportConfig) -> None:
        state = import_weights(cfg.source, cfg.weights, cfg.release)  # everything is checked before anything is written
        print(f"wrote {write_torch_file(cfg.out, state)}")
        if "predictor" not in state:
            print(f"{cfg.source} has no predictor (a Hugging Face IJepaModel is the encoder only): the checkpoint "
                  f"serves tubelet-probe, feature extraction and tubelet-export, not init_from")

    args = list(sys.argv[1:] if argv is None else argv)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        args[0] = f"source={args[0]}"  # the source may come first, bare
    return main_for(ImportConfig, run, args, prog="tubelet-import", doc=__doc__,
                    errors={LayoutError: 2, CheckpointError: 2, FileNotFoundError: 2, ValueError: 2})


if __name__ == "__main__":
    sys.exit(main())
