"""Frozen attentive-probe evaluation: `python -m train.probe checkpoint=RUN/checkpoints/ckpt-N.pt [key=value ...]`.

The checkpoint's target encoder is frozen; an attentive probe (model/probe.py; `head=linear`: I-JEPA's linear
probe on the average-pooled tokens) is trained on the train split's encoder features and scored on the val
split: every video is seen as `eval_clips x eval_crops` views whose logits are averaged. On an image set
(`make shards kind=image`) every image is a clip of one frame, repeated to a video encoder's frame count. `random_init=true` probes the same architecture with random weights, the same way
(the baseline a pretraining must beat).

Features are extracted in *passes*: one pass runs every training video once through the loader's training
augmentation (random crop and flip, new draws every pass). With `cache=true` (default) `cached_passes`
passes are extracted once, stored in the probe folder, and the probe's epochs cycle over them; with
`cache=false` every epoch extracts a fresh pass. Extraction is split over ranks like training (torchrun),
the probe is trained with DDP on each rank's share, and view logits are summed over ranks.

Results: `<checkpoint folder>/probe[-random]-<split>.json` (top-1, top-5, per epoch losses), a PNG of the
probe's curve next to it, and a resumable state folder (`probe[-random]/`) with the cached features and the
probe's last epoch.
"""

from __future__ import annotations

import itertools
import logging
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model.features import encoder_from_state, model_config_of, read_training_checkpoint
from model.probe import VARIANTS, AttentiveProbe, LinearProbe
from model.vit import VisionTransformer
from common import logs
from common.cli import main_for
from common.config import ConfigError, check, to_dict
from common.torch_file import CheckpointError, read_torch_file, write_torch_file
from common.files import atomic_write
from pipeline.config import LoaderConfig
from pipeline.loader import LoaderError, VideoLoader
from shards.manifest import ManifestError, read_set_index
from train import dist
from train.plots import plot_probe, try_plot


log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    checkpoint: str = ""  # a training or tubelet-import checkpoint (its target encoder and model config are used)
    random_init: bool = False  # the same architecture with random weights (seeded by `seed`)
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(flip=True, masks=[]))
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, cosine to 0 over the epochs (the method's probe recipe)
    weight_decay: float = 0.01
    warmup_epochs: int = 0
    heads: int = 0  # probe attention heads; 0 = the encoder's
    # reference: exactly the official evaluation's probe (numbers comparable with the paper's: no output projection
    # in its cross-attention, LayerNorm eps 1e-5); tubelet: with the projection (model/probe.py)
    variant: str = "reference"
    # attentive (V-JEPA's protocol) or linear (I-JEPA's: a linear layer on the average-pooled tokens)
    head: str = "attentive"
    cache: bool = True
    cached_passes: int = 4
    seed: int = 0
    out: str = ""  # results JSON; "" = next to the checkpoint
    device: str = "auto"

    def validate(self) -> None:
        check(bool(self.checkpoint), "checkpoint",
              "name a training checkpoint (e.g. runs/train/checkpoints/ckpt-00000300.pt)")
        for key in ("epochs", "batch_size", "lr", "cached_passes"):
            check(getattr(self, key) > 0, key, "must be positive")
        check(self.heads >= 0, "heads", "must be >= 0 (0 = the encoder's)")
        check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        check(self.head in ("attentive", "linear"), "head", f"must be attentive or linear, got {self.head!r}")


def build_encoder(cfg: ProbeConfig, device: torch.device) -> Tuple[VisionTransformer, dict]:
    """The checkpoint's target encoder (or, with random_init, the same architecture with random weights), frozen,
    and the checkpoint's training config."""
    ckpt = read_training_checkpoint(cfg.checkpoint)
    model_cfg = model_config_of(ckpt, cfg.checkpoint)
    if cfg.random_init:
        torch.manual_seed(cfg.seed)
        encoder = VisionTransformer.from_config(model_cfg)
    else:
        encoder = encoder_from_state(cfg.checkpoint, model_cfg, ckpt["target_encoder"], "target_encoder")
    encoder.requires_grad_(False)
    return encoder.to(device).eval(), dict(ckpt["config"])


def data_config(cfg: ProbeConfig, train_cfg: dict, split: str) -> LoaderConfig:
    """Clips shaped like the pretraining's (frames, stride, size), from the probe's own data root and split; of an
    image set, images (one frame: `extract` repeats it to the encoder's frames, the paper's protocol for video
    encoders on images)."""
    m = train_cfg["model"]
    # an imported release (tubelet-import) has no data section: the probe's own data.frame_stride then
    stride = train_cfg["data"]["frame_stride"] if "data" in train_cfg else cfg.data.frame_stride
    images = read_set_index(cfg.data.root).meta.get("kind", "video") == "image"
    return replace(cfg.data, split=split, num_frames=1 if images else m["num_frames"], crop_size=m["img_size"],
                   frame_stride=1 if images else stride, masks=[], seed=cfg.seed)


@torch.no_grad()
def extract(encoder, loader: VideoLoader, steps: Optional[int], device, frames: int) -> Dict[str, torch.Tensor]:
    """Tokens [n, N, D] (fp16 to halve the cache), labels [n] and manifest rows [n] of this rank's clips; an image
    (a clip of one frame) is repeated to the encoder's `frames`."""
    feats, labels, rows = [], [], []
    amp = device.type == "cuda"
    for b in loader if steps is None else itertools.islice(loader, steps):
        keep = ~b.padded
        clips = b.clips if b.clips.shape[2] == frames else b.clips.expand(-1, -1, frames, -1, -1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            tokens = encoder(clips.to(device, torch.float32 if not amp else clips.dtype))
        feats.append(tokens[keep.to(tokens.device)].half().cpu())
        labels.append(b.labels[keep.to(b.labels.device)].cpu())
        rows.append(torch.tensor(b.rows)[keep.cpu()])
    return {"tokens": torch.cat(feats), "labels": torch.cat(labels), "rows": torch.cat(rows)}


def cached(path: Path, make):
    """`make()`'s value, stored at `path` the first time; a stored value that is damaged is made again."""
    if path.exists():
        try:
            return read_torch_file(path)
        except CheckpointError as e:
            log.warning(f"{e}; computing it again")
    value = make()
    write_torch_file(path, value)
    return value


def lr_at(cfg: ProbeConfig, epoch: float) -> float:
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    t = (epoch - cfg.warmup_epochs) / max(1, cfg.epochs - cfg.warmup_epochs)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, data: Dict[str, torch.Tensor],
                cfg: ProbeConfig, epoch: int, rank: int, device) -> float:
    """One probe epoch over cached features `data` (tokens, labels); returns this rank's mean loss. Ranks
    step the same number of batches (the smallest share), in a seeded order."""
    n = int(dist.all_reduce(torch.tensor([len(data["labels"])], device=device), "min").item())
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + rank)
    order = torch.randperm(len(data["labels"]), generator=g)[:n]
    nb = max(1, n // cfg.batch_size)
    total = 0.0
    model.train()
    for i in range(nb):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch + i / nb)
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        x = data["tokens"][idx].to(device, torch.float32)
        loss = F.cross_entropy(model(x), data["labels"][idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / nb


@torch.no_grad()
def video_scores(probe: torch.nn.Module, views: Dict[str, torch.Tensor], num_videos: int, num_classes: int,
                 batch_size: int, device) -> torch.Tensor:
    """[num_videos, num_classes]: the softmax of every view (tokens, rows) summed into its video's row."""
    probe.eval()
    logits = torch.zeros(num_videos, num_classes, device=device)
    for i in range(0, len(views["rows"]), batch_size):
        p = probe(views["tokens"][i:i + batch_size].to(device, torch.float32)).softmax(-1)
        logits.index_add_(0, views["rows"][i:i + batch_size].to(device), p)
    return logits


def run(cfg: ProbeConfig) -> Optional[dict]:
    env = dist.init(cfg.device)
    logs.console(env.rank)
    try:
        return _run(cfg, env)
    finally:
        dist.cleanup()


def _run(cfg: ProbeConfig, env) -> Optional[dict]:
    device = env.device
    encoder, train_cfg = build_encoder(cfg, device)
    frames = train_cfg["model"]["num_frames"]
    tag = ("probe-random" if cfg.random_init else "probe") + ("-linear" if cfg.head == "linear" else "")
    ckpt_dir = Path(cfg.checkpoint).parent
    state_dir = ckpt_dir / f"{tag}-{Path(cfg.checkpoint).stem}-s{cfg.seed}"
    state_dir.mkdir(parents=True, exist_ok=True)
    out = Path(cfg.out) if cfg.out else ckpt_dir / f"{tag}-{Path(cfg.checkpoint).stem}-s{cfg.seed}.json"
    t0 = time.time()

    train_loader = VideoLoader(data_config(cfg, train_cfg, cfg.train_split), **env.placement(), train=True)
    classes = train_loader.index.classes
    if len(classes) < 2 or (train_loader.index.labels < 0).any():
        raise ConfigError(f"{cfg.data.root} split {cfg.train_split}: a probe needs labelled videos of at least "
                          f"2 classes (found classes {classes})")
    steps = train_loader.steps_per_epoch
    passes: Dict[int, dict] = {}

    def features_for(epoch: int) -> dict:
        p = epoch % cfg.cached_passes if cfg.cache else epoch
        if p not in passes:
            def make():
                train_loader.load_state_dict({**train_loader.state_dict(), "epoch": p, "position": 0})
                return extract(encoder, train_loader, steps, device, frames)
            passes.clear()
            passes[p] = cached(state_dir / f"train-pass{p}-rank{env.rank}.pt", make) if cfg.cache else make()
        return passes[p]

    if cfg.head == "linear":
        probe = LinearProbe(encoder.embed_dim, len(classes)).to(device)
    else:
        probe = AttentiveProbe(encoder.embed_dim, len(classes), cfg.heads or encoder.blocks[0].attn.num_heads,
                               variant=cfg.variant).to(device)
    model = DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(probe)) if env.distributed else probe
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: List[dict] = []
    start_epoch = 0
    state_file = state_dir / "state.pt"
    if state_file.exists():  # resume after the last finished epoch
        st = read_torch_file(state_file)  # damaged: a CheckpointError naming it (delete it to start over)
        probe.load_state_dict(st["probe"])
        opt.load_state_dict(st["optimizer"])
        start_epoch, history = st["epoch"], json.loads(st["history"])
        log.info(f"probe: resuming after epoch {start_epoch} from {state_file}")

    for epoch in range(start_epoch, cfg.epochs):
        loss = train_epoch(model, opt, features_for(epoch), cfg, epoch, env.rank, device)
        history.append({"epoch": epoch + 1, "loss": dist.mean_scalar(loss, device)})
        if env.is_main:
            write_torch_file(state_file, {"probe": probe.state_dict(), "optimizer": opt.state_dict(),
                                     "epoch": epoch + 1, "history": json.dumps(history)})
        log.info(f"probe epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['loss']:.4f}")

    val_cfg = replace(data_config(cfg, train_cfg, cfg.val_split), eval_clips=cfg.data.eval_clips,
                      eval_crops=cfg.data.eval_crops)
    val_loader = VideoLoader(val_cfg, **env.placement(), train=False)
    val = cached(state_dir / f"val-rank{env.rank}.pt", lambda: extract(encoder, val_loader, None, device, frames))
    nvid = len(val_loader.index)
    logits = video_scores(probe, val, nvid, len(classes), cfg.batch_size, device)
    dist.all_reduce(logits)  # every view's probabilities, summed per video over all ranks
    labels = torch.from_numpy(val_loader.index.labels).to(device)
    top1 = (logits.argmax(-1) == labels).float().mean().item()
    k = min(5, len(classes))
    top5 = (logits.topk(k, -1).indices == labels[:, None]).any(-1).float().mean().item() if len(classes) > 5 else None
    result = {
        "checkpoint": str(cfg.checkpoint), "random_init": cfg.random_init, "seed": cfg.seed,
        "split": cfg.val_split, "videos": nvid, "classes": classes, "chance": 1 / len(classes),
        "views": cfg.data.eval_clips * cfg.data.eval_crops, "head": cfg.head, "top1": top1, "top5": top5,
        "epochs": cfg.epochs, "history": history, "seconds": round(time.time() - t0, 1),
        "config": to_dict(cfg),
    }
    if env.is_main:
        atomic_write(out, json.dumps(result, indent=2))
        try_plot(plot_probe, result, out.with_suffix(".png"))
        log.info(f"probe {'(random weights) ' if cfg.random_init else ''}top-1 {100 * top1:.1f}% on "
                    f"{nvid} {cfg.val_split} {'images' if val_loader.images else 'videos'} (chance "
                    f"{100 / len(classes):.1f}%) -> {out}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(ProbeConfig, run, argv, prog="tubelet-probe", doc=__doc__,
                    errors={CheckpointError: 2, FileNotFoundError: 2, ManifestError: 2, LoaderError: 2,
                            dist.DistError: 2})


if __name__ == "__main__":
    sys.exit(main())
