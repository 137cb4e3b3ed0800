"""A tubelet checkpoint -> weights another tool reads.

format=features (the default, what tubelet-export always did): the target encoder as one safetensors file with
the model config in its metadata (model.features.export_encoder).
format=hf: a Hugging Face folder (config.json + model.safetensors) that transformers' `VJEPA2Model.from_pretrained`
loads with no missing or unexpected keys: the chosen encoder (weights=target_encoder|encoder) and the predictor.
Only pos_embed=rope video models have a VJEPA2Model counterpart; an image model (num_frames 1, I-JEPA) is written
as an `IJepaModel` folder: the chosen encoder only (HF's class has no predictor).
format=official: a torch file in the official V-JEPA training checkpoints' layout ({'encoder', 'target_encoder',
'predictor', 'epoch'}, keys under `module.backbone.`), which the official code's loaders read; of an image model
(num_frames 1) I-JEPA's (keys under `module.`, a Conv2d patch embedding, one `mask_token`).
The HF folder is written under a temporary name and renamed, so
`out` is complete or absent; an existing `out` is never replaced.

CLI:  tubelet-export checkpoint=CKPT out=OUT [format=features|hf|official] [weights=target_encoder|encoder]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from common.cli import main_for
from common.config import check
from common.files import fsync_dir
from common.torch_file import CheckpointError, write_torch_file
from model.features import (encoder_from_state, export_encoder, model_config_of, read_training_checkpoint,
                            require_parts)
from model.imports import HF_WEIGHTS, build_models
from model.layouts import (LayoutError, is_image_model, model_config_to_hf, model_config_to_hf_ijepa,
                           tubelet_to_hf, tubelet_to_ijepa_hf, tubelet_to_official)


def read_checkpoint(path: str | os.PathLike, weights: str) -> tuple:
    """(ModelConfig, encoder, predictor) of a training (or imported) checkpoint, loaded strictly."""
    return models_of(read_training_checkpoint(path, parts=(weights,)), path, weights)


def models_of(ckpt: Mapping, path: str | os.PathLike, weights: str) -> tuple:
    """(ModelConfig, encoder `weights`, predictor) of the checkpoint `ckpt` read from `path`, loaded strictly."""
    require_parts(ckpt, path, ("predictor",))
    cfg = model_config_of(ckpt, path)
    enc, pred = build_models(cfg, dict(ckpt[weights]), dict(ckpt["predictor"]), f"{path}")
    return cfg, enc, pred


def export_hf(ckpt_path: str | os.PathLike, out: str | os.PathLike, weights: str = "target_encoder") -> Path:
    """A V-JEPA 2 (rope) model as a VJEPA2Model folder, an image model as an IJepaModel folder (encoder only)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; name a new folder")
    ckpt = read_training_checkpoint(ckpt_path, parts=(weights,))
    cfg = model_config_of(ckpt, ckpt_path)
    if is_image_model(cfg):
        enc = encoder_from_state(ckpt_path, cfg, ckpt[weights], weights)
        hf_config = {"model_type": "ijepa", "architectures": ["IJepaModel"], "torch_dtype": "float32",
                     **model_config_to_hf_ijepa(cfg)}
        tensors = tubelet_to_ijepa_hf(enc.state_dict(), cfg, enc.pos_embed)
    else:
        cfg, enc, pred = models_of(ckpt, ckpt_path, weights)
        hf_config = {"model_type": "vjepa2", "architectures": ["VJEPA2Model"], "torch_dtype": "float32",
                     **model_config_to_hf(cfg)}
        tensors = tubelet_to_hf(enc.state_dict(), pred.state_dict(), cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        for name in ("config.json", HF_WEIGHTS):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; what tubelet writes is for every reader
        os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def export_official(ckpt_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Both encoders and the predictor in the official layout (the sin-cos tables included, as the official
    models keep them as parameters)."""
    ckpt = read_training_checkpoint(ckpt_path, parts=("target_encoder", "encoder"))  # read once
    cfg, target, pred = models_of(ckpt, ckpt_path, "target_encoder")
    enc, _ = build_models(cfg, dict(ckpt["encoder"]), None, f"{ckpt_path}")
    tables, image = (target.pos_embed, pred.pos_embed), is_image_model(cfg)
    enc_state, pred_state = tubelet_to_official(*tables, enc.state_dict(), pred.state_dict(), image)
    target_state, _ = tubelet_to_official(*tables, target.state_dict(), pred.state_dict(), image)
    return write_torch_file(out, {"encoder": enc_state, "target_encoder": target_state, "predictor": pred_state,
                                  "epoch": 0})


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a training (or tubelet-import) checkpoint (.pt)
    out: str = ""  # format=features: the .safetensors file; format=hf: the folder to create
    # features (tubelet's encoder file) | hf (Hugging Face VJEPA2Model folder) | official (V-JEPA's .pt layout)
    format: str = "features"
    weights: str = "target_encoder"  # format=hf: the encoder exported, target_encoder | encoder

    def validate(self) -> None:
        check(bool(self.checkpoint), "checkpoint", "name a training checkpoint (.pt)")
        check(bool(self.out), "out", "name the file (format=features) or folder (format=hf) to write")
        check(self.format in ("features", "hf", "official"), "format",
              f"expected features, hf or official, got {self.format!r}")
        check(self.weights in ("target_encoder", "encoder"), "weights",
              f"expected target_encoder or encoder, got {self.weights!r}")
        check(self.format == "hf" or self.weights == "target_encoder", "weights",
              "format=features exports the target encoder; weights=encoder needs format=hf")


def main(argv: list[str] | None = None) -> int:
    def run(cfg: ExportConfig) -> None:
        if cfg.format == "features":
            print(f"wrote {export_encoder(cfg.checkpoint, cfg.out)}")
        elif cfg.format == "official":
            print(f"wrote {export_official(cfg.checkpoint, cfg.out)}")
        else:
            print(f"wrote {export_hf(cfg.checkpoint, cfg.out, cfg.weights)}")

    return main_for(ExportConfig, run, argv, prog="tubelet-export", doc=__doc__,
                    errors={CheckpointError: 2, LayoutError: 2, FileNotFoundError: 2, FileExistsError: 2})


if __name__ == "__main__":
    sys.exit(main())
