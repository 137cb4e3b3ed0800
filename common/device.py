"""Which torch device a component runs on: one rule for the trainer, the probe and the loader."""

from __future__ import annotations

import torch

from common.config import ConfigError


def resolve_device(name: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """`auto` (a GPU when torch sees one), `cpu` or `cuda`; a rank's GPU is cuda:local_rank. `key` is the config
    key the name came from, for the error message."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("cuda but torch sees no GPU; use cpu or auto", key)
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                              "--nproc-per-node must not exceed the GPUs per node", key)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"must be auto, cpu or cuda, got {name!r}", key)
    return torch.device("cpu")
