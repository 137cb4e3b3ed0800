"""`init_from=CKPT`: a new run that starts from another checkpoint's weights (a `tubelet-import`ed release, or
another run), with a fresh optimizer, schedule and data order: step 0 of this run, not a resume.

Used only when the run folder has no checkpoint of its own: once this run has written one, it resumes from that
(the weights it started from are in it), so a restarted job never goes back to the initial weights. The source's
model config must describe the same weights as this run's `model` section (shape fields; how the run trains, as
activation checkpointing, the init scheme or the loss, may differ); any other difference is a CheckpointError
naming the fields, and the weights are loaded strictly.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from common.torch_file import CheckpointError
from model.config import ModelConfig
from model.features import model_config_of
from model.vjepa import VJEPA
from train.checkpoint import load

_log = logging.getLogger(__name__)
# ModelConfig fields that do not change which weights there are or what they compute
TRAINING_ONLY = ("activation_checkpointing", "init", "loss")


def initialise(model: VJEPA, cfg: ModelConfig, path: str | Path) -> None:
    """Copy the encoder, predictor and target encoder of the checkpoint at `path` into `model` (in place, so the
    optimizer, DDP and compiled graphs built on its parameters keep them)."""
    state = load(path)
    if "predictor" not in state and "imported_from" in state:
        # an encoder-only import (a Hugging Face IJepaModel): refused rather than pairing it with a fresh predictor,
        # which would silently train something else than the released model
        raise CheckpointError(f"{path}: has no predictor (imported from {state['imported_from']}, an encoder-only "
                              f"release): it serves tubelet-probe and feature extraction; init_from needs a "
                              f"checkpoint with a predictor (an official .pth.tar with release=NAME)")
    for key in ("encoder", "predictor", "target_encoder", "config"):
        if key not in state:
            raise CheckpointError(f"{path}: init_from needs {key!r}, the checkpoint has {sorted(map(str, state))}")
    theirs = model_config_of(state, path)
    differ = [f"{f.name}: {getattr(theirs, f.name)!r} there, {getattr(cfg, f.name)!r} here"
              for f in dataclasses.fields(ModelConfig)
              if f.name not in TRAINING_ONLY and getattr(theirs, f.name) != getattr(cfg, f.name)]
    if differ:
        raise CheckpointError(f"{path}: init_from's model config differs from this run's model section ("
                              + "; ".join(differ) + "); set those model fields to the checkpoint's")
    for part in ("encoder", "predictor", "target_encoder"):
        module = getattr(model, part)
        try:
            module.load_state_dict(state[part], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: {part} does not fit: {str(e).splitlines()[0]}") from None
    _log.info(f"initialised encoder, predictor and target encoder from {path} (step {state['step']} there)")
