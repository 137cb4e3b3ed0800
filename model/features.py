"""Using a pretrained encoder: load it from a training checkpoint, extract features, export it.

A training checkpoint is a `torch.save`d dict holding at least
  "target_encoder": state_dict of a VisionTransformer (the EMA encoder, the one to evaluate),
  "config": the resolved training config as a plain dict; "config"["model"] holds ModelConfig fields.
An export is a safetensors file of the target encoder's weights, with the model config as JSON in the
file's metadata, so it can be rebuilt without the training code's config tree or the optimizer state.

CLI:  python -m model.features checkpoint=CKPT out=OUT.safetensors    (or tubelet-export)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.cli import main_for
from common.config import check
from common.files import atomic_path
from common.torch_file import CheckpointError, read_torch_file
from model.config import ModelConfig, as_model_config
from model.layouts import strip_prefixes
from model.vit import VisionTransformer

CONFIG_METADATA_KEY = "tubelet.model_config"
# Prefixes added by DistributedDataParallel and torch.compile. Stripped only when every key carries
# the same one: a wrapper rename, not a partial match.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def encoder_from_state(
    path: str | os.PathLike, cfg: ModelConfig, state: Mapping[str, torch.Tensor], what: str
) -> VisionTransformer:
    """Build the encoder for `cfg` and load `state` strictly, with a readable error on any mismatch."""
    encoder = VisionTransformer.from_config(cfg)
    state = strip_prefixes(state, _WRAPPER_PREFIXES)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        problems = [f"{label}: {show(items)}" for label, items in found if items]
        raise CheckpointError(
            f"{path}: {what} does not fit the encoder built from its config {dataclasses.asdict(cfg)}; "
            + "; ".join(problems)
        )
    encoder.load_state_dict(state, strict=True)
    return encoder


def read_training_checkpoint(path: str | os.PathLike, parts: tuple = ("target_encoder",)) -> Mapping:
    """A training checkpoint, CRC-checked and memory-mapped (the optimizer state, several times the encoder's
    size, is never read here), with the keys the caller needs: `parts` (by default the encoder's) and
    `config.model`."""
    ckpt = read_torch_file(path, mmap=True)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    require_parts(ckpt, path, (*parts, "config"))
    if not isinstance(ckpt["config"], Mapping) or "model" not in ckpt["config"]:
        raise CheckpointError(f"{path}: missing key 'config.model' (the ModelConfig fields)")
    return ckpt


def require_parts(ckpt: Mapping, path: str | os.PathLike, parts: tuple) -> None:
    """A CheckpointError naming the first of `parts` the checkpoint at `path` lacks, and the keys it has."""
    for key in parts:
        if key not in ckpt:
            raise CheckpointError(f"{path}: missing key {key!r} (found keys: {sorted(map(str, ckpt))})")


def model_config_of(ckpt: Mapping, path: str | os.PathLike) -> ModelConfig:
    try:
        return as_model_config(ckpt["config"]["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config.model: {e}") from e


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> VisionTransformer:
    """Target encoder of a training checkpoint, in eval mode on `device`.

    Raises CheckpointError naming the path: a damaged file, a missing key, or the missing/unexpected keys and
    shape mismatches; never loads partially.
    """
    ckpt = read_training_checkpoint(path)
    encoder = encoder_from_state(path, model_config_of(ckpt, path), ckpt["target_encoder"], "target_encoder")
    return encoder.to(device).eval()


def extract_features(encoder: VisionTransformer, clips: torch.Tensor) -> torch.Tensor:
    """All output tokens of the encoder. clips: [B, 3, T, H, W] (normalised like the training data)
    -> [B, N, D], tokens in t-major order (see model.pos_embed). No autograd graph is kept."""
    param = next(encoder.parameters())
    with torch.inference_mode():
        return encoder(clips.to(device=param.device, dtype=param.dtype))


def export_encoder(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the checkpoint's target encoder as safetensors, config JSON in the metadata. Returns out_path.

    Written to a temporary name and renamed (`common.files`), so a file at out_path is always complete.
    """
    encoder = load_encoder(ckpt_path)
    out_path = Path(out_path)
    tensors = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(encoder.config), sort_keys=True)}
    with atomic_path(out_path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return out_path


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> VisionTransformer:
    """Encoder from an `export_encoder` file, in eval mode on `device`."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if CONFIG_METADATA_KEY not in metadata:
            raise CheckpointError(
                f"{path}: missing metadata key {CONFIG_METADATA_KEY!r}; not a tubelet encoder export"
            )
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        cfg = as_model_config(json.loads(metadata[CONFIG_METADATA_KEY]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config in metadata: {e}") from e
    return encoder_from_state(path, cfg, state, "exported weights").to(device).eval()


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a training checkpoint (.pt); its target encoder is exported
    out: str = ""  # the .safetensors file to write

    def validate(self) -> None:
        check(bool(self.checkpoint), "checkpoint", "name a training checkpoint (.pt)")
        check(bool(self.out), "out", "name the .safetensors file to write")


def main(argv: list[str] | None = None) -> int:
    def run(cfg: ExportConfig) -> None:
        print(f"wrote {export_encoder(cfg.checkpoint, cfg.out)}")

    return main_for(ExportConfig, run, argv, prog="tubelet-export", doc=__doc__,
                    errors={CheckpointError: 2, FileNotFoundError: 2})


if __name__ == "__main__":
    sys.exit(main())
