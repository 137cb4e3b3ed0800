"""CPU tests of train/: config, schedules, dist, atomic checkpoints, exact resume, DDP over 2 gloo ranks, fault
injection (a killed rank under torchrun --max-restarts, a kill during a checkpoint write, NaN stop/skip),
learning on a small labelled shard set, and the checkpoint -> model.features hand-off.

Everything runs a ViT-tiny encoder on 4 frames of 32x32 with 8x8 patches (2x4x4 = 32 tokens) and a 2-layer
predictor, batch 2, one thread (torch and DALI), deterministic mode: runs are compared bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.vit import VisionTransformer
from model.vjepa import jepa_loss
from common.config import load_config, to_dict
from train import checkpoint, dist, schedules
from train.config import TrainConfig
from train.step import Student
from train.trainer import NonFiniteError, main, run

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.size=tiny", "model.img_size=32", "model.patch_size=8", "model.num_frames=4",
        "model.predictor_width=96", "model.predictor_depth=2", "model.predictor_heads=4",
        "data.crop_size=32", "data.num_frames=4", "data.frame_stride=1", "data.batch_size=2", "data.threads=1",
        "data.dtype=fp32", "data.device=cpu", "device=cpu", "metrics.enabled=false", "optim.warmup_steps=2",
        "deterministic=true", "log_every=1", "checkpoint.keep_last=0"]
STEPS = 6


def overrides(shards: str, run_dir: Path, *extra: str) -> list:
    return TINY + [f"data.root={shards}", f"run_dir={run_dir}", f"schedule.total_steps={STEPS}",
                   "checkpoint.every_steps=2", *extra]


def cfg_for(shards: str, run_dir: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, overrides(shards, run_dir, *extra))


def losses(run_dir: Path) -> list:
    """(step, loss, lr, skipped) per step from losses.jsonl: what two equivalent runs must share exactly."""
    rows = [json.loads(ln) for ln in (run_dir / "losses.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["skipped"]) for r in rows]


def weights(run_dir: Path, step: int = STEPS) -> dict:
    state = torch.load(checkpoint.path_for(run_dir / "checkpoints", step), weights_only=True)
    return {f"{part}.{k}": v for part in ("encoder", "predictor", "target_encoder") for k, v in state[part].items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUBELET_FAULT")}
    for k in dist.TORCHRUN_VARS:
        env.pop(k, None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def trainer_cmd(nproc: int = 0) -> list:
    if nproc == 0:
        return [sys.executable, "-m", "train.trainer"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=1", "-m", "train.trainer"]


def run_cmd(cmd: list, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in every subprocess (OMP_NUM_THREADS=1): runs compared bit for bit must use
    the same reduction order, and one thread per process is the fastest on a small, shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(small_shards, tmp_path_factory) -> Path:
    """An uninterrupted single-process run of STEPS steps (checkpoints every 2)."""
    run_dir = tmp_path_factory.mktemp("reference")
    summary = run(cfg_for(small_shards, run_dir))
    assert summary["step"] == STEPS and summary["first_step"] == 0
    return run_dir


# ----------------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_the_published_recipe_and_yamls_load():
    cfg = load_config(TrainConfig, None, [])
    assert (cfg.optim.lr, cfg.optim.start_lr, cfg.optim.warmup_steps) == (6.25e-4, 2e-4, 12000)
    assert (cfg.schedule.total_steps, cfg.schedule.horizon_scale) == (90000, 1.25)
    for name, size, batch in (("vitl16", "large", 24), ("vith16", "huge", 24), ("vitg16", "giant", 24),
                              ("cpu", "tiny", 8)):
        c = load_config(TrainConfig, REPO / "configs" / "train" / f"{name}.yaml", [])
        assert (c.model.size, c.data.batch_size) == (size, batch)
        assert c.data.num_frames == c.model.num_frames and c.data.crop_size == c.model.img_size


def test_vjepa2_adapt_recipe_fits_the_release_it_starts_from():
    """configs/train/vjepa2_vitl16_adapt.yaml builds exactly the released V-JEPA 2 ViT-L (what init_from checks),
    with the official cooldown's numbers: 64 frames at 256 px, EMA 0.99925, lr 5.25e-4 -> 1e-6, 12,000 steps."""
    from model.releases import release_config
    from train.init_from import TRAINING_ONLY
    c = load_config(TrainConfig, REPO / "configs/train/vjepa2_vitl16_adapt.yaml", [])
    release = release_config("vjepa2-vitl")
    differ = [f.name for f in dataclasses.fields(release)
              if f.name not in TRAINING_ONLY and getattr(release, f.name) != getattr(c.model, f.name)]
    assert not differ, differ
    assert (c.data.num_frames, c.data.crop_size, len(c.data.masks)) == (64, 256, 2)
    assert (c.optim.lr_schedule, c.optim.lr, c.optim.final_lr) == ("wsd", 5.25e-4, 1e-6)
    assert c.optim.ema_start == c.optim.ema_end == 0.99925 and c.schedule.total_steps == 12000


def test_wsd_schedule_warms_up_holds_then_decays_to_the_final_lr():
    lr = lambda s: schedules.wsd_lr(s, peak=5e-4, start=1e-4, final=1e-6, warmup=100, decay=400,  # noqa: E731
                                    total=1000)
    assert lr(0) == pytest.approx(1e-4) and lr(50) == pytest.approx(3e-4)
    assert lr(100) == lr(599) == 5e-4  # stable until the last `decay` steps
    assert lr(800) == pytest.approx((5e-4 + 1e-6) / 2) and lr(1000) == pytest.approx(1e-6)
    assert lr(5000) == pytest.approx(1e-6)
    values = [lr(s) for s in range(600, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="decay_steps"):
        load_config(TrainConfig, REPO / "configs/train/cpu.yaml", ["optim.lr_schedule=wsd",
                                                                   "optim.decay_steps=1000000000"])


def test_ijepa_vith14_yaml_is_the_official_in1k_recipe():
    """configs/train/ijepa_vith14.yaml against facebookresearch/ijepa configs/in1k_vith14_ep300.yaml: lr 1e-3
    from 2e-4 over 40 warm-up epochs to 1e-6, weight decay 0.04 -> 0.4, EMA 0.996 -> 1.0, 300 epochs at batch
    2048 (625 iterations an epoch), ipe_scale 1.0, no clipping; ViT-H/14, predictor 12 x 384, 4 target blocks of
    0.15-0.2 with aspect 0.75-1.5, a context block of 0.85-1.0, min_keep 10; crops of 0.3-1.0, no flip."""
    c = load_config(TrainConfig, REPO / "configs" / "train" / "ijepa_vith14.yaml", [])
    ipe, epochs, warmup = 1_281_167 // 2048, 300, 40
    o = c.optim
    assert (o.lr, o.start_lr, o.final_lr, o.warmup_steps) == (1e-3, 2e-4, 1e-6, warmup * ipe)
    assert (o.weight_decay, o.final_weight_decay, o.ema_start, o.ema_end, o.clip_grad) == (0.04, 0.4, 0.996, 1.0, 0)
    assert (c.schedule.total_steps, c.schedule.horizon_scale) == (epochs * ipe, 1.0)
    m = c.model
    assert (m.size, m.patch_size, m.img_size, m.num_frames, m.tubelet_size) == ("huge", 14, 224, 1, 1)
    assert (m.predictor_width, m.predictor_depth, m.num_mask_types, m.loss) == (384, 12, 1, "smooth_l1")
    d, k = c.data, c.data.image_masks
    assert d.batch_size * 16 == 2048 and d.num_frames == 1 and not d.flip and list(d.crop_scale) == [0.3, 1.0]
    assert (list(k.enc_scale), list(k.pred_scale), list(k.aspect_ratio)) == ([0.85, 1.0], [0.15, 0.2], [0.75, 1.5])
    assert (k.num_pred, k.min_keep, k.allow_overlap) == (4, 10, False)


def test_cli_overrides_keep_yaml11_words_as_strings():
    # `amp=off` is the string the field wants (YAML 1.1 would read False); bool fields still take the words
    cfg = load_config(TrainConfig, REPO / "configs" / "train" / "cpu.yaml", ["amp=off", "deterministic=yes"])
    assert cfg.amp == "off" and cfg.deterministic is True


def test_encoder_shape_overrides_build_a_smaller_vit():
    cfg = load_config(TrainConfig, REPO / "configs" / "train" / "cpu.yaml",
                      ["model.patch_size=8", "model.width=96", "model.depth=6", "model.heads=3"])
    enc = VisionTransformer.from_config(cfg.model)
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads) == (96, 6, 3)
    assert cfg.model.grid == (4, 8, 8) and cfg.model.encoder_width == 96
    with pytest.raises(ValueError, match="model.width"):
        load_config(TrainConfig, None, ["model.width=100", "model.heads=3"])


@pytest.mark.parametrize("args, message", [
    (["nosuchkey=1"], "nosuchkey"),
    (["model.depth=-1"], "model.depth"),
    (["optim.nosuchkey=1"], "optim.nosuchkey"),
    (["data.num_frames=8"], "data.num_frames: 8 != model.num_frames 16"),
    (["data.crop_size=112"], "data.crop_size: 112 != model.img_size 224"),
    (["optim.warmup_steps=100", "schedule.total_steps=50"], "optim.warmup_steps"),
    (["nonfinite=ignore"], "nonfinite"),
    (["model.size=gigantic"], "model.size"), (["ddp.bucket_cap_mb=0"], "ddp.bucket_cap_mb"),
    (["optim.lr=fast"], "optim.lr"),
])
def test_config_errors_name_the_key(args, message, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(TrainConfig, None, args)
    assert main(args) == 2  # the entry point: a one-line message, no traceback
    err = capsys.readouterr().err
    assert err.startswith("config error:") and message in err


# ----------------------------------------------------------------------------------------------------
# schedules


def test_schedules_follow_the_reference_recipe():
    h = 1.25 * 90000
    lr = lambda s: schedules.lr(s, peak=6.25e-4, start=2e-4, final=1e-6, warmup=12000, horizon=h)  # noqa: E731
    assert lr(0) == 2e-4 and lr(6000) == pytest.approx(4.125e-4) and lr(12000) == pytest.approx(6.25e-4)
    assert lr(90000) == pytest.approx(7.5e-5, rel=0.01)  # the note: training ends at LR ~7.5e-5
    assert lr(int(h)) == pytest.approx(1e-6) and lr(10**6) == pytest.approx(1e-6)
    values = [lr(s) for s in range(12000, 90001, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    wd = lambda s: schedules.weight_decay(s, start=0.04, final=0.4, horizon=h)  # noqa: E731
    assert wd(0) == pytest.approx(0.04) and wd(90000) == pytest.approx(0.3656, abs=1e-3)
    ema = lambda s: schedules.ema_momentum(s, start=0.998, end=1.0, horizon=h)  # noqa: E731
    assert ema(0) == 0.998 and ema(90000) == pytest.approx(0.9996) and ema(10**6) == 1.0


def test_fault_injection_reads_its_variables_and_names_a_bad_one():
    from train.faults import Faults
    assert Faults.from_env({"TUBELET_FAULT_SLOW_LOADER": "0.3"}).slow_loader == 0.3
    relative = Faults.from_env({"TUBELET_FAULT_SLOW_LOADER": "0.5x"})
    assert (relative.slow_loader, relative.slow_relative) == (0.5, True)
    assert Faults.from_env({}) == Faults()
    with pytest.raises(ValueError, match="TUBELET_FAULT_SLOW_LOADER='soon'"):
        Faults.from_env({"TUBELET_FAULT_SLOW_LOADER": "soon"})
    with pytest.raises(ValueError, match="TUBELET_FAULT_NAN"):
        Faults.from_env({"TUBELET_FAULT_NAN": "a:b:c"})


# ----------------------------------------------------------------------------------------------------
# dist


def test_dist_single_process_without_torchrun_env(monkeypatch):
    for k in dist.TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    env = dist.init("cpu")
    assert (env.rank, env.world_size, env.backend, env.device.type) == (0, 1, "none", "cpu")
    assert dist.any_rank(True, env.device) and not dist.any_rank(False, env.device)


@pytest.mark.slow
def test_dist_fails_loudly_never_alone(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(dist.DistError, match="partial torchrun environment"):
        dist.init("cpu")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(k, v)
    with pytest.raises(dist.DistError, match="distributed init failed for rank 1/2"):
        dist.init("cpu", timeout_s=3)
    assert not torch.distributed.is_initialized()


def _check_ranks(rank: int, port: int, same: bool, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    env = dist.init("cpu", timeout_s=60)
    try:
        t = torch.arange(6.0)
        if not same and rank == 1:
            t[4] = torch.nextafter(t[4], torch.tensor(5.0))  # one ulp
        dist.assert_same_across_ranks([("a", torch.zeros(3)), ("b", t)])
        out.put((rank, "same"))
    except dist.DistError as e:
        out.put((rank, str(e)))
    finally:
        dist.cleanup()
    assert env.world_size == 2


@pytest.mark.slow
def test_assert_same_across_ranks_finds_a_one_ulp_difference():
    ctx = mp.get_context("spawn")
    for same in (True, False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = ctx.Queue()
        procs = [ctx.Process(target=_check_ranks, args=(r, port, same, out)) for r in range(2)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(60)
        if same:
            assert results == {0: "same", 1: "same"}
        else:  # every rank raises, naming the tensor
            assert all(r.startswith("b differs across ranks") for r in results.values()), results


# DistributedDataParallel's keywords in torch 2.6 (the oldest supported; README) and in 2.13, where
# forward_sync_buffers arrived and broadcast_buffers became deprecated
DDP_ARGS_2_6 = ["self", "module", "device_ids", "output_device", "dim", "broadcast_buffers", "init_sync",
                "process_group", "bucket_cap_mb", "find_unused_parameters", "check_reduction",
                "gradient_as_bucket_view", "static_graph", "delay_all_reduce_named_params", "param_to_hook_all_reduce",
                "mixed_precision", "device_mesh"]


def test_ddp_keywords_follow_the_installed_torch():
    from train.config import DDPConfig
    from train.step import ddp_kwargs

    old = ddp_kwargs(DDPConfig(), DDP_ARGS_2_6)
    assert old["broadcast_buffers"] is False and "forward_sync_buffers" not in old
    new = ddp_kwargs(DDPConfig(), DDP_ARGS_2_6 + ["forward_sync_buffers"])
    assert new["forward_sync_buffers"] is False and "broadcast_buffers" not in new
    assert ddp_kwargs(DDPConfig()).keys() in (old.keys(), new.keys())  # the installed torch's, one of the two


def _ddp_rank(rank: int, port: int, keywords, out) -> None:
    """One gloo rank: build() with DDP given the keywords of `keywords`' torch, one step, the weights back."""
    import warnings
    from types import SimpleNamespace

    import train.step as step

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2")
    real = step.ddp_kwargs
    step.ddp_kwargs = lambda d: real(d, keywords)
    warnings.simplefilter("ignore")  # broadcast_buffers' deprecation on torch >= 2.13
    env = dist.init("cpu", timeout_s=60)
    try:
        cfg = load_config(TrainConfig, None, TINY)
        parts = step.build(cfg, env)
        assert isinstance(parts.student, torch.nn.parallel.DistributedDataParallel) and env.local_world_size == 2
        masks = _masks_of([(10, 14), (6, 20)], seed=rank)  # different data on each rank: DDP averages
        torch.manual_seed(rank)
        step.read_stats([step.train_step(parts, SimpleNamespace(clips=torch.randn(2, 3, 4, 32, 32), masks=masks), 1)])
        dist.assert_same_across_ranks(parts.named_weights())
        out.put((rank, "same"))
    except BaseException as e:
        out.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.cleanup()


@pytest.mark.parametrize("keywords", [DDP_ARGS_2_6, None], ids=["torch-2.6-keywords", "installed-torch"])
def test_ddp_over_two_gloo_ranks_with_each_torch_versions_keywords(keywords):
    """The DDP construction of build(), over 2 real gloo ranks, with the keywords the oldest supported torch takes
    and with the installed torch's: one step trains and both ranks hold identical weights after it."""
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, keywords, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
    assert results == {0: "same", 1: "same"}, results


# ----------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_atomic_fallback_and_keep_last(tmp_path):
    folder = tmp_path / "ckpt"
    for step in (2, 4, 6):
        checkpoint.save(folder, step, {"step": step, "w": torch.full((3,), float(step)), "cfg": {"a": [1]}},
                        keep_last=2)
    assert [s for s, _ in checkpoint.list_checkpoints(folder)] == [6, 4]
    (folder / ".ckpt-00000008.pt.123.tmp").write_bytes(b"partial")  # a writer that died: never listed
    path = checkpoint.path_for(folder, 6)
    path.write_bytes(path.read_bytes()[:100])  # truncated: must be reported, and the older one used
    logged = []
    found_path, state = checkpoint.load_latest(folder, log=logged.append)
    assert found_path.name == "ckpt-00000004.pt" and state["step"] == 4 and torch.equal(state["w"], torch.full((3,), 4.0))
    assert len(logged) == 1 and "ckpt-00000006.pt" in logged[0] and "does not load" in logged[0]
    checkpoint.path_for(folder, 4).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="none loads.*Refusing to start again from step 0"):
        checkpoint.load_latest(folder, log=logged.append)
    assert checkpoint.load_latest(tmp_path / "empty") is None
    checkpoint.save(folder, 10, {"step": 10}, keep_last=2)
    assert not list(folder.glob(".*.tmp"))  # stale temp files go at the next save


def flip_bytes(path: Path, at: float = 0.5, count: int = 64) -> None:
    """Overwrite `count` bytes in the middle of a file: same size, different content (a bad disk, a bad copy)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + count] = bytes(b ^ 0xFF for b in data[i:i + count])
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bytes_is_skipped_for_the_newest_good_one(tmp_path):
    folder = tmp_path / "ckpt"
    for step in (2, 4):
        checkpoint.save(folder, step, {"step": step, "w": torch.randn(64, 1024)})
    flip_bytes(checkpoint.path_for(folder, 4))
    assert torch.load(checkpoint.path_for(folder, 4), weights_only=True)["step"] == 4  # torch alone loads it
    logged = []
    path, state = checkpoint.load_latest(folder, log=logged.append)
    assert state["step"] == 2 and path.name == "ckpt-00000002.pt"
    assert len(logged) == 1 and "ckpt-00000004.pt" in logged[0] and "CRC mismatch" in logged[0]
    from model.features import load_encoder  # the user-facing loader refuses it too, naming the file
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt-00000004\.pt: damaged"):
        load_encoder(checkpoint.path_for(folder, 4))


def test_retention_counts_only_checkpoints_that_load(tmp_path):
    """keep_last=1 with a damaged newest checkpoint: the new one is kept, and the damaged one never counts."""
    folder = tmp_path / "ckpt"
    for step in (2, 4):
        checkpoint.save(folder, step, {"step": step, "w": torch.randn(64, 256)})
    flip_bytes(checkpoint.path_for(folder, 4))
    checkpoint.save(folder, 3, {"step": 3, "w": torch.randn(64, 256)}, keep_last=1)  # resumed from 2, saved 3
    assert [s for s, _ in checkpoint.list_checkpoints(folder)] == [4, 3]
    assert checkpoint.load_latest(folder, log=lambda m: None)[1]["step"] == 3
    checkpoint.save(folder, 4, {"step": 4, "w": torch.randn(64, 256)}, keep_last=1)  # the run reaches step 4
    assert [s for s, _ in checkpoint.list_checkpoints(folder)] == [4]
    assert checkpoint.load_latest(folder)[1]["step"] == 4


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    folder = tmp_path / "ckpt"
    checkpoint.save(folder, 2, {"step": 2, "w": torch.ones(3)})

    def full_disk(obj, f):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"no space left on device writing .*ckpt-00000004\.pt"):
        checkpoint.save(folder, 4, {"step": 4, "w": torch.ones(3)}, keep_last=1)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000002.pt"]  # no temp file, the old one kept
    assert checkpoint.load_latest(folder)[1]["step"] == 2


def test_a_bad_run_folder_is_refused_before_any_work(small_shards, tmp_path, capsys):
    from common.files import lock_file, unlock_file
    from train.trainer import RunDirError

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(checkpoint.CheckpointError, match="is \\(or lies under\\) a file"):
        run(cfg_for(small_shards, tmp_path / "a", f"checkpoint.dir={tmp_path / 'file'}"))
    assert not (tmp_path / "a" / "losses.jsonl").exists()  # refused at start, not at the first save
    assert main(overrides(small_shards, tmp_path / "file")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: run_dir ")
    assert main(overrides(str(tmp_path / "no-set"), tmp_path / "c")) == 2  # a missing shard set: one line, no traceback
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "no manifest.parquet" in err and "Traceback" not in err
    # a second trainer in the same run_dir is refused while the first holds it, and runs once it is gone
    (tmp_path / "b").mkdir()
    held = lock_file(tmp_path / "b" / ".lock")
    short = ("schedule.total_steps=2", "optim.warmup_steps=1")
    with pytest.raises(RunDirError, match="another trainer is using run_dir .*pid="):
        run(cfg_for(small_shards, tmp_path / "b", *short))
    unlock_file(held)
    assert run(cfg_for(small_shards, tmp_path / "b", *short))["step"] == 2
    assert not (tmp_path / "b" / ".lock").exists()  # a finished run leaves no lock behind


def test_a_run_whose_picture_cannot_be_drawn_still_succeeds(small_shards, tmp_path, monkeypatch, caplog):
    """matplotlib missing (or failing) when the run ends: the checkpoint is written, so the run succeeds with a
    warning and no loss.png, instead of failing (and looping through torchrun's restarts)."""
    import train.plots

    def no_matplotlib():
        raise ModuleNotFoundError("No module named 'matplotlib'")

    monkeypatch.setattr(train.plots, "_plt", no_matplotlib)
    out = run(cfg_for(small_shards, tmp_path / "r", "schedule.total_steps=2", "optim.warmup_steps=1"))
    assert out["step"] == 2 and checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints")
    assert not (tmp_path / "r" / "loss.png").exists()
    assert any("loss.png was not drawn (ModuleNotFoundError" in r.getMessage() for r in caplog.records)
    end = [r.getMessage() for r in caplog.records if r.getMessage().startswith("results in ")]
    assert end and "loss.png" not in end[0] and "ckpt-00000002.pt" in end[0]  # it says what it did write


def test_a_run_ends_saying_where_its_results_are_and_what_to_try_next(reference, caplog):
    """The last lines of a run (make demo's included): the run folder, loss.png, the last checkpoint, and the
    probe command that evaluates it; the loss plot names the objective of the run."""
    from train.trainer import objective_name, where_results_are

    cfg = cfg_for("data/shards/sample", reference)
    ckpt = checkpoint.path_for(reference / "checkpoints", STEPS)
    text = where_results_are(cfg, reference, ckpt)
    assert f"results in {reference}/: loss.png" in text and f"last checkpoint {ckpt}" in text
    assert f'make probe ARGS="checkpoint={ckpt} data.root=data/shards/sample"' in text
    assert (reference / "loss.png").exists() and objective_name(cfg) == "V-JEPA L1 loss"
    images = load_config(TrainConfig, None, TINY + ["model.num_frames=1", "model.tubelet_size=1",
                                                    "model.loss=smooth_l1", "data.num_frames=1"])
    assert objective_name(images) == "I-JEPA smooth L1 loss" and "head=linear" in where_results_are(images, reference, ckpt)


# ----------------------------------------------------------------------------------------------------
# the step and exact resume


def test_student_loss_is_the_models_loss():
    from model.config import ModelConfig
    from model.vjepa import VJEPA
    from pipeline.masks import default_masks, sample_masks

    torch.manual_seed(0)
    cfg = ModelConfig(img_size=32, num_frames=4, patch_size=8, predictor_width=96, predictor_depth=2,
                      predictor_heads=4)
    model = VJEPA.from_config(cfg)
    clips = torch.randn(3, 3, 4, 32, 32)
    masks = [(torch.from_numpy(c), torch.from_numpy(t))
             for c, t in sample_masks(np.random.default_rng(0), 3, cfg.grid, default_masks())]
    ours = jepa_loss(Student(model)(clips, masks), model.forward_target(clips, masks))
    assert torch.equal(ours, model(clips, masks))


def test_reference_run_outputs(reference, small_shards):
    cfg = cfg_for(small_shards, reference)
    assert load_config(TrainConfig, reference / "config.yaml", []) == cfg  # the resolved config round-trips
    rows = losses(reference)
    assert [r[0] for r in rows] == list(range(1, STEPS + 1)) and all(np.isfinite([r[1] for r in rows]))
    assert [s for s, _ in checkpoint.list_checkpoints(reference / "checkpoints")] == [6, 4, 2]
    log = (reference / "train.log").read_text()  # the run's log, with times, ranks and the time left
    assert "INFO rank0 train.trainer: training tiny" in log and f"done: step {STEPS}" in log
    steps = [ln for ln in log.splitlines() if f"/{STEPS} | loss" in ln]
    assert len(steps) == STEPS and all("| eta " in ln and "| target std " in ln for ln in steps)
    assert "| eta 0s |" in steps[-1]
    logged = [r for r in map(json.loads, (reference / "losses.jsonl").read_text().splitlines()) if "target_std" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))  # log_every=1: the signals of every step
    assert all(0 < r["target_erank"] <= 1 and 0 <= r["pred_clip_share"] <= 1 for r in logged)
    assert not (reference / ".lock").exists()
    state = torch.load(checkpoint.path_for(reference / "checkpoints", STEPS), weights_only=True)
    assert state["step"] == STEPS and state["config"] == to_dict(cfg) and state["skipped_steps"] == 0
    assert (state["loader"]["epoch"], state["loader"]["position"]) == (0, 12)  # 12 videos, 6 steps of 2
    assert {"encoder", "predictor", "target_encoder", "optimizer", "rng"} <= state.keys()


@pytest.mark.slow
def test_resume_is_exact(reference, small_shards, tmp_path):
    run_dir = tmp_path / "split"
    first = run(cfg_for(small_shards, run_dir, "schedule.stop_at=3"))
    assert (first["first_step"], first["step"]) == (0, 3)
    second = run(cfg_for(small_shards, run_dir))  # finds ckpt-3 (the stop_at step is always saved)
    assert (second["first_step"], second["step"]) == (3, STEPS)
    assert losses(run_dir) == losses(reference)
    assert_same_weights(weights(run_dir), weights(reference))
    ref = torch.load(checkpoint.path_for(reference / "checkpoints", STEPS), weights_only=True)
    got = torch.load(checkpoint.path_for(run_dir / "checkpoints", STEPS), weights_only=True)
    for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref["loader"] == got["loader"]


def test_features_load_the_trainers_checkpoint(reference):
    from model.features import load_encoder

    enc = load_encoder(checkpoint.path_for(reference / "checkpoints", STEPS))
    assert_same_weights({f"target_encoder.{k}": v for k, v in enc.state_dict().items()},
                        {k: v for k, v in weights(reference).items() if k.startswith("target_encoder.")})


# ----------------------------------------------------------------------------------------------------
# the step on the device: no host sync, the guard decided there


def tiny_parts(*extra: str):
    from types import SimpleNamespace

    from pipeline.masks import sample_masks
    from train.step import build

    cfg = load_config(TrainConfig, None, TINY + list(extra))
    parts = build(cfg, dist.init("cpu"))
    rng = np.random.default_rng(0)
    batches = [SimpleNamespace(clips=torch.randn(2, 3, 4, 32, 32), masks=[
        (torch.from_numpy(c), torch.from_numpy(t)) for c, t in sample_masks(rng, 2, cfg.model.grid, cfg.data.masks)])
        for _ in range(3)]
    return parts, batches


def test_an_ijepa_step_on_images_learns_through_the_same_trainer_step():
    """An image model (one frame, tubelet 1, one mask token, smooth L1) with I-JEPA's masks from the plan: the
    same train_step; the loss falls on a fixed batch, and the context is encoded once for its 4 target blocks."""
    from pipeline.image_masks import ImageMaskConfig
    from pipeline.clips import map_masks
    from pipeline.sampling import Plan
    from train.step import build, read_stats, train_step

    cfg = load_config(TrainConfig, None, TINY + [
        "model.num_frames=1", "model.tubelet_size=1", "model.img_size=64", "model.num_mask_types=1",
        "model.loss=smooth_l1", "data.num_frames=1", "data.crop_size=64", "data.image_masks.min_keep=4",
        "optim.lr=1e-3", "optim.start_lr=1e-3"])
    parts = build(cfg, dist.init("cpu"))
    plan = Plan([(1, 64, 64)] * 4, batch_size=2, seed=0)
    bp = next(plan)
    masks = map_masks(plan.masks(bp, cfg.model.grid, cfg.data.mask_specs(cfg.model.grid)), torch.from_numpy)
    assert isinstance(cfg.data.mask_specs(cfg.model.grid), ImageMaskConfig) and len(masks) == 4
    assert all(c is masks[0][0] for c, _ in masks)
    torch.manual_seed(0)
    from types import SimpleNamespace

    batch = SimpleNamespace(clips=torch.randn(2, 3, 1, 64, 64), masks=masks)
    calls = []
    parts.model.encoder.register_forward_hook(lambda m, args, out: calls.append(1))
    results = [train_step(parts, batch, step) for step in range(1, 9)]
    assert len(calls) == 8  # one context pass per step, not one per target block
    losses = [loss for loss, _, _ in read_stats(results)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_the_step_never_waits_for_the_device(monkeypatch, mode):
    """Nothing in train_step reads a tensor's value on the host (what would wait for a GPU): every Python way of
    doing so fails here, and so does every op below Python that reads a value, sizes its output by the values,
    copies to the host or makes a tensor from Python data (tests/host_sync.py: a 0-d tensor passed as a foreach
    op's scalar weight is read in C++). The NaN guard still works under it; the outcome is read afterwards, many
    steps in one transfer."""
    from host_sync import NoHostSync
    from train.step import read_stats, train_step

    parts, batches = tiny_parts(f"nonfinite={mode}")
    assert parts.fused  # fused AdamW: it skips a non-finite step through its found-inf flag, on the device

    def host_read(*args, **kwargs):
        raise AssertionError("the step read a tensor on the host")

    with monkeypatch.context() as m, NoHostSync():
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            m.setattr(torch.Tensor, name, host_read)
        results = [train_step(parts, b, i + 1, force_nan=i == 1) for i, b in enumerate(batches)]
    rows = read_stats(results)
    assert [bad for _, _, bad in rows] == [False, True, False]
    assert np.isfinite(rows[0][0]) and np.isnan(rows[1][0]) and rows[2][1] > 0
    assert float(parts.halted) == (1.0 if mode == "stop" else 0.0)


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_a_nonfinite_step_changes_nothing_and_stop_halts_on_the_device(mode):
    """Step 2 is NaN: its update is skipped (weights, AdamW moments and step counts, the target encoder all as after
    step 1). With nonfinite=stop the device skips every later step too, so the weights stay as after step 1 until
    the host reads the flag; with skip, step 3 trains."""
    from train.step import train_step

    parts, batches = tiny_parts(f"nonfinite={mode}")
    train_step(parts, batches[0], 1)
    after_1 = {k: v.clone() for k, v in parts.named_weights()}
    moments = [s["exp_avg"].clone() for s in parts.optimizer.state.values()]
    assert train_step(parts, batches[1], 2, force_nan=True).nonfinite
    assert_same_weights(dict(parts.named_weights()), after_1)
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, parts.optimizer.state.values()))
    assert {float(s["step"]) for s in parts.optimizer.state.values()} == {1.0}
    out = train_step(parts, batches[2], 3)
    assert not out.nonfinite  # step 3's own loss is finite
    changed = [k for k, v in parts.named_weights() if not torch.equal(v, after_1[k])]
    if mode == "stop":
        assert changed == [] and float(parts.halted) == 1.0
    else:
        assert len(changed) == len(after_1) and {float(s["step"]) for s in parts.optimizer.state.values()} == {2.0}


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """compile=true (torch.compile, token counts symbolic: the three batches' masks differ in size, one graph):
    the losses, gradient norms and weights of three steps agree with eager mode. About 3 minutes on 2 cores, nearly
    all of it inductor compiling C++ kernels."""
    from train.step import read_stats, train_step

    runs = []
    for extra in ([], ["compile=true"]):
        parts, batches = tiny_parts("deterministic=false", *extra)
        stats = read_stats([train_step(parts, b, i + 1) for i, b in enumerate(batches)])
        runs.append((stats, dict(parts.named_weights())))
    (eager, w_eager), (compiled, w_compiled) = runs
    assert [s[2] for s in compiled] == [False] * 3
    np.testing.assert_allclose([s[:2] for s in compiled], [s[:2] for s in eager], rtol=1e-5)
    for k in w_eager:
        torch.testing.assert_close(w_compiled[k], w_eager[k], rtol=1e-4, atol=1e-6)


def _masks_of(counts, seed: int, tokens: int = 32, batch: int = 2):
    """Fresh mask tensors for each (context, target) token count pair: disjoint random index sets per clip."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for nc, nt in counts:
        perms = [torch.randperm(tokens, generator=g) for _ in range(batch)]
        out.append((torch.stack([p[:nc].sort().values for p in perms]),
                    torch.stack([p[nc:nc + nt].sort().values for p in perms])))
    return out


@pytest.mark.parametrize("shared", [False, True], ids=["vjepa", "ijepa-shared-context"])
def test_compiled_steps_do_not_recompile_for_fresh_masks(monkeypatch, shared):
    """compile=true over six steps whose masks are new tensors every step, with token counts seen before and new
    ones: Dynamo compiles the step's graphs once per distinct token count at most (read from its counter; a guard
    on a mask tensor's identity would recompile every step, then fall back to eager), and the compiled steps
    agree with eager ones. I-JEPA's target blocks share one context tensor: it is still encoded once. Dynamo's
    guards do not depend on the backend, so the graphs run through aot_eager here (inductor's C++ compile would
    take minutes; test_compiled_step_matches_eager covers it)."""
    from types import SimpleNamespace

    from torch._dynamo.testing import CompileCounterWithBackend
    from train.step import read_stats, train_step

    counts = [((10, 14), (6, 20)), ((10, 14), (6, 20)), ((12, 12), (5, 22)), ((10, 14), (6, 20)),
              ((8, 16), (7, 21)), ((12, 12), (5, 22))]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    runs = []
    for extra in ([], ["compile=true"]):
        parts, _ = tiny_parts("deterministic=false", *extra)
        torch.manual_seed(1)
        clips = [torch.randn(2, 3, 4, 32, 32) for _ in counts]
        results, graphs = [], []
        for i, (pair, x) in enumerate(zip(counts, clips)):
            masks = _masks_of(pair, seed=i)
            if shared:  # I-JEPA: every target block beside one context tensor
                masks = [(masks[0][0], t) for _, t in masks]
            results.append(train_step(parts, SimpleNamespace(clips=x, masks=masks), i + 1))
            graphs.append(counter.frame_count)
        runs.append((read_stats(results), graphs))
    (eager, _), (compiled, graphs) = runs
    per_compile = graphs[0]  # the graphs of one compilation (the student's and the target encoder's)
    assert per_compile >= 1 and graphs[1] == per_compile  # the same counts again: nothing new
    assert graphs[-1] <= per_compile * len(set(counts)), graphs
    np.testing.assert_allclose([s[:2] for s in compiled], [s[:2] for s in eager], rtol=1e-4)
    torch._dynamo.reset()


def test_a_resumed_optimizer_stays_fused():
    """A checkpoint's optimizer groups carry their fused/foreach flags; loading one (e.g. from a foreach build)
    must not turn off the fused kernels that skip non-finite steps on the device."""
    from types import SimpleNamespace

    parts, _ = tiny_parts()
    foreach = torch.optim.AdamW(parts.model.param_groups(0.04), foreach=True)
    state = {"encoder": parts.model.encoder.state_dict(), "predictor": parts.model.predictor.state_dict(),
             "target_encoder": parts.model.target_encoder.state_dict(), "optimizer": foreach.state_dict(),
             "loader": {}, "rng": {"torch": torch.get_rng_state()}, "step": 5, "skipped_steps": 0}
    assert checkpoint.restore(parts, SimpleNamespace(load_state_dict=lambda s: None), state) == (5, 0)
    assert all(g["fused"] and not g["foreach"] for g in parts.optimizer.param_groups)


def test_checkpoints_are_written_in_the_background(tmp_path, monkeypatch):
    """save() returns once the state is copied: training may change its tensors at once without changing what is
    written; writes stay atomic and keep_last applies; a write's error comes back from the next wait()."""
    from common.torch_file import CheckpointError

    done = []
    saver = checkpoint.BackgroundSaver(tmp_path, keep_last=2, on_done=lambda step, paused, s: done.append(step))
    for step in (1, 2, 3):
        w = torch.full((1000,), float(step))
        saver.save(step, {"step": step, "w": w, "nested": [{"m": w}]})
        w.add_(100.0)  # the next step's in-place update, while the write may still be going
    saver.wait()
    assert done == [1, 2, 3] and [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 2]
    state = checkpoint.load(checkpoint.path_for(tmp_path, 3))
    assert torch.equal(state["w"], torch.full((1000,), 3.0)) and torch.equal(state["nested"][0]["m"], state["w"])

    def full_disk(*args, **kwargs):
        raise CheckpointError("no space left on device writing ckpt-00000004.pt")

    monkeypatch.setattr(checkpoint, "save", full_disk)
    saver.save(4, {"step": 4})
    with pytest.raises(CheckpointError, match="no space left"):
        saver.wait()
    saver.wait()  # reported once


# ----------------------------------------------------------------------------------------------------
# non-finite guard


@pytest.mark.slow
def test_nan_stop_names_the_step(small_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUBELET_FAULT_NAN", "3")
    with pytest.raises(NonFiniteError, match="at step 3"):
        run(cfg_for(small_shards, tmp_path / "a", "nonfinite=stop"))
    assert main(overrides(small_shards, tmp_path / "b", "nonfinite=stop")) == 1
    assert "non-finite loss or gradient at step 3" in capsys.readouterr().err
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "b" / "checkpoints")] == [2]
    # the host reads the guard every 5 steps: it still names step 3, and nothing after step 2 is saved or logged
    with pytest.raises(NonFiniteError, match="at step 3"):
        run(cfg_for(small_shards, tmp_path / "c", "nonfinite=stop", "log_every=5"))
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "c" / "checkpoints")] == [2]
    assert [r[0] for r in losses(tmp_path / "c")] == [1, 2]


@pytest.mark.slow
def test_nan_skip_completes_and_counts(small_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TUBELET_FAULT_NAN", "3")
    summary = run(cfg_for(small_shards, tmp_path, "nonfinite=skip"))
    assert summary["step"] == STEPS and summary["skipped_steps"] == 1
    rows = losses(tmp_path)
    assert [r[3] for r in rows] == [False, False, True, False, False, False] and np.isnan(rows[2][1])
    assert all(np.isfinite(r[1]) for r in rows if not r[3])
    state = torch.load(checkpoint.path_for(tmp_path / "checkpoints", STEPS), weights_only=True)
    assert state["skipped_steps"] == 1 and all(torch.isfinite(v).all() for v in state["encoder"].values())


# ----------------------------------------------------------------------------------------------------
# fault injection in real processes


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one(reference, small_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(small_shards, run_dir)
    killed = run_cmd(trainer_cmd() + args, subprocess_env(TUBELET_FAULT_KILL_IN_CKPT="4"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = run_dir / "checkpoints"
    assert [s for s, _ in checkpoint.list_checkpoints(folder)] == [2]
    assert list(folder.glob(".ckpt-00000004.pt.*.tmp"))  # the half-written temp file, never a ckpt name
    assert checkpoint.load_latest(folder)[1]["step"] == 2
    resumed = run_cmd(trainer_cmd() + args, subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 2)" in resumed.stdout and "done: step 6" in resumed.stdout
    assert losses(run_dir) == losses(reference)
    assert_same_weights(weights(run_dir), weights(reference))


@pytest.mark.slow
def test_sigterm_lets_the_checkpoint_in_flight_land(small_shards, tmp_path):
    """SIGTERM (torchrun stopping workers, SLURM's time limit) while checkpoints are written every step in the
    background: the process exits 143 after the write in flight has landed; no half-written file is left, the
    newest checkpoint loads, and the run resumes from it."""
    import time

    run_dir = tmp_path / "run"
    args = overrides(small_shards, run_dir, "schedule.total_steps=200", "checkpoint.every_steps=1",
                     "checkpoint.keep_last=3", "optim.warmup_steps=5")
    proc = subprocess.Popen(trainer_cmd() + args, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    folder = run_dir / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (folder.is_dir() and len(checkpoint.list_checkpoints(folder)) >= 3):
        time.sleep(0.1)
    proc.terminate()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]
    assert not list(folder.glob(".ckpt-*.tmp")), sorted(p.name for p in folder.iterdir())
    newest = checkpoint.list_checkpoints(folder)[0][0]
    assert checkpoint.load_latest(folder)[1]["step"] == newest
    resumed = run_cmd(trainer_cmd() + args + [f"schedule.stop_at={newest + 1}"], subprocess_env())
    assert resumed.returncode == 0 and f"(step {newest})" in resumed.stdout, resumed.stdout[-2000:]


@pytest.mark.slow
def test_ddp_two_ranks_survive_a_killed_rank(small_shards, tmp_path):
    """2 gloo ranks: weights identical across ranks; a NaN on rank 1 only is skipped by both; rank 1 SIGKILLed
    at step 4 under --max-restarts=1 resumes from ckpt-2 and ends exactly where the uninterrupted run ends."""
    common = ["nonfinite=skip"]
    nan = {"TUBELET_FAULT_NAN": "1:5"}
    straight = run_cmd(trainer_cmd(2) + overrides(small_shards, tmp_path / "a", *common), subprocess_env(**nan))
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in straight.stdout
    rows = losses(tmp_path / "a")
    assert [r[3] for r in rows] == [False] * 4 + [True, False]  # rank 0's loss was finite: agreed across ranks

    killed = run_cmd(trainer_cmd(2) + overrides(small_shards, tmp_path / "b", *common),
                     subprocess_env(TUBELET_FAULT_KILL="1:4", **nan))
    out = killed.stdout + killed.stderr
    assert killed.returncode == 0, out[-4000:]
    assert "rank 1: SIGKILL at step 4" in out and "resuming from" in out
    assert "parameters identical on all 2 ranks" in killed.stdout
    assert losses(tmp_path / "b") == rows
    assert_same_weights(weights(tmp_path / "b"), weights(tmp_path / "a"))


# ----------------------------------------------------------------------------------------------------
# learning


@pytest.mark.slow
def test_loss_falls_on_a_small_labelled_set(small_shards, tmp_path):
    """40 steps of batch 4 on the 12 training videos: the loss falls to about a third (0.32-0.37 measured over 4
    seeds), and not by collapse: the target encoder's features on held-out clips stay as diverse as at init."""
    import torch.nn.functional as F

    from model.features import load_encoder
    from model.vit import VisionTransformer
    from pipeline.loader import VideoLoader

    cfg = load_config(TrainConfig, None, TINY + [
        f"data.root={small_shards}", f"run_dir={tmp_path}", "schedule.total_steps=40", "data.batch_size=4",
        "optim.warmup_steps=5", "optim.lr=1e-3", "checkpoint.every_steps=100", "deterministic=false"])
    got = run(cfg)["losses"]
    first, last = np.mean(got[:5]), np.mean(got[-5:])
    assert last < 0.6 * first, got

    val = VideoLoader(load_config(TrainConfig, None, TINY + [f"data.root={small_shards}", "data.split=val",
                                                              "data.batch_size=4"]).data, train=False)
    clips = next(iter(val)).clips.float()  # [4, 3, 4, 32, 32]
    val.close()

    def diversity(encoder) -> float:  # std over all tokens of the layer-normed targets, mean over channels
        with torch.no_grad():
            h = F.layer_norm(encoder(clips), (encoder.embed_dim,))  # [B, N, D]
        return h.flatten(0, 1).std(0).mean().item()

    torch.manual_seed(cfg.seed)
    at_init = diversity(VisionTransformer.from_config(cfg.model))
    trained = diversity(load_encoder(checkpoint.path_for(tmp_path / "checkpoints", 40)))
    assert trained > 0.5 * at_init, (trained, at_init)  # measured: 0.34 vs 0.35


# ----------------------------------------------------------------------------------------------------
# benchmark


@pytest.mark.parametrize("shape", [[], ["model.size=giant", "model.width=88", "model.depth=2", "model.heads=4"]],
                         ids=["tiny", "giant-mlp-ratio"])
def test_bench_flop_count_matches_torch_flop_counter(shape):
    """The analytic model-FLOP count of benchmarks.bench_train equals torch's FlopCounterMode on a real step
    (matmuls, convolutions and attention, forward and backward), for MLP ratio 4 and ViT-g's 48/11."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_train import step_flops
    from pipeline.masks import sample_masks
    from train.step import build, train_step

    cfg = load_config(TrainConfig, None, TINY + ["model.img_size=48", "data.crop_size=48", "model.patch_size=16",
                                                 *shape])
    assert cfg.model.mlp_hidden == (384 if shape else 4 * 192)
    parts = build(cfg, dist.init("cpu"))
    masks = [(torch.from_numpy(c), torch.from_numpy(t))
             for c, t in sample_masks(np.random.default_rng(0), 3, cfg.model.grid, cfg.data.masks)]
    batch = SimpleNamespace(clips=torch.randn(3, 3, 4, 48, 48), masks=masks)
    # the math attention path (matmuls): the fused CPU kernel is invisible to the counter
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        train_step(parts, batch, 1)
    expected = step_flops(cfg.model, 3, [(c.shape[1], t.shape[1]) for c, t in masks])["total"]
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_bench_train_runs(tmp_path):
    from benchmarks.bench_train import main as bench

    out = tmp_path / "bench.json"
    assert bench(["sizes=[tiny,small]", "batch=2", "img=32", "frames=4", "steps=2", "warmup=1", "--json", str(out),
                  "train=[device=cpu,model.predictor_depth=2]"]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["matmul_flops_per_second"] > 0
    assert [r["size"] for r in result["rows"]] == ["tiny", "small"]
    for r in result["rows"]:
        assert r["steps"] == 2 and r["clips_per_second"] > 0 and 0 < r["mfu"] < 1 and r["optimizer"] == "fused"
        assert r["signals_seconds"] > 0 and 0 < r["signals_share_of_step"] < 1 and r["first_step_seconds"] > 0
    assert result["rows"][1]["params_encoder"] == 21_884_544  # ViT-small: the golden count


def test_the_largest_batch_search_is_bounded_and_builds_the_model_once(monkeypatch):
    """Doubling then bisection on one built model, within max_batch_tries tries and max_batch_limit clips: exact
    when it converges, a lower bound (exact False) when the tries end first."""
    import benchmarks.bench_train as bt

    builds, tried = [], []
    monkeypatch.setattr(bt, "build", lambda cfg, env: builds.append(1) or "parts")
    monkeypatch.setattr(bt, "fits", lambda parts, cfg, batch, device: tried.append(batch) or batch <= 37)
    env = dist.init("cpu")

    def search(**kw):
        builds.clear(), tried.clear()
        args = bt.BenchTrainConfig(max_batch=True, **kw)
        return bt.largest_batch(args, bt.train_config(args, "tiny", 16), env)

    assert search(max_batch_tries=20) == (37, True) and builds == [1]
    assert tried == [16, 32, 64, 48, 40, 36, 38, 37]  # doubling from the config's batch, then bisection
    assert search(max_batch_tries=4) == (32, False)  # ran out of tries: a lower bound
    assert search(max_batch_limit=20) == (20, True) and tried == [16, 20]  # as much as asked for
    monkeypatch.setattr(bt, "fits", lambda parts, cfg, batch, device: tried.append(batch) or False)
    assert search() == (0, True) and tried == [16, 8, 4, 2, 1]  # not even one clip


@pytest.mark.slow
def test_bench_train_writes_each_row_as_it_is_measured(tmp_path, monkeypatch):
    """--json is rewritten after every row: a size that fails (or a timeout) keeps the rows before it; the
    largest-batch search runs on the CPU up to its limit."""
    import benchmarks.bench_train as bt

    real, out = bt.measure, tmp_path / "rows.json"

    def measure(args, cfg, env):
        if cfg.model.size == "small":
            raise RuntimeError("killed")
        return real(args, cfg, env)

    monkeypatch.setattr(bt, "measure", measure)
    with pytest.raises(RuntimeError, match="killed"):
        bt.bench(bt.BenchTrainConfig(sizes=["tiny", "small"], batch=2, img=32, frames=4, steps=1, warmup=1,
                                     max_batch=True, max_batch_limit=4, json=str(out),
                                     train=["device=cpu", "model.predictor_depth=2"]))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["max_batch"], r["max_batch_exact"]) for r in rows] == [("tiny", 4, True)]


def test_gradients_are_clipped_only_after_clip_start(monkeypatch):
    """As the reference: no clipping through its warm-up epochs, then every step (ViT-L: from iteration 12,300)."""
    from types import SimpleNamespace

    from pipeline.masks import sample_masks
    from train.step import build, train_step

    assert load_config(TrainConfig, REPO / "configs/train/vitl16.yaml").optim.clip_start == 12300
    clipped = []
    real = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_",
                        lambda params, max_norm, total, **kw: clipped.append(max_norm) or real(params, max_norm,
                                                                                                 total, **kw))
    cfg = load_config(TrainConfig, None, TINY + ["optim.clip_start=3", "optim.clip_grad=0.5"])
    parts = build(cfg, dist.init("cpu"))
    masks = [(torch.from_numpy(c), torch.from_numpy(t))
             for c, t in sample_masks(np.random.default_rng(0), 2, cfg.model.grid, cfg.data.masks)]
    batch = SimpleNamespace(clips=torch.randn(2, 3, 4, 32, 32), masks=masks)
    for step in range(1, 6):
        train_step(parts, batch, step)
        assert len(clipped) == 2 * max(0, step - 3)  # encoder and predictor, each, from step 4 on
    assert set(clipped) == {0.5}


def test_init_from_starts_a_new_run_from_another_checkpoints_weights(reference, small_shards, tmp_path):
    """init_from: step 1 of a new run (fresh optimizer: one step in its state) from the given weights. With an LR
    of at most 1e-9 an AdamW update moves each weight by about that much, so the weights after it are the source's
    to 1e-6, and far from the source run's own checkpoint 4 updates before."""
    source = checkpoint.path_for(reference / "checkpoints", STEPS)
    run_dir = tmp_path / "from"
    summary = run(cfg_for(small_shards, run_dir, f"init_from={source}", "optim.start_lr=0.0", "optim.lr=1e-9",
                          "optim.final_lr=0.0", "schedule.stop_at=1"))
    assert (summary["first_step"], summary["step"]) == (0, 1)
    got = torch.load(checkpoint.path_for(run_dir / "checkpoints", 1), weights_only=True)
    want = torch.load(source, weights_only=True)
    earlier = torch.load(checkpoint.path_for(reference / "checkpoints", 2), weights_only=True)
    for part in ("encoder", "predictor"):
        for k, v in want[part].items():
            torch.testing.assert_close(got[part][k], v, atol=1e-6, rtol=0, msg=f"{part}.{k}")
        assert any((earlier[part][k] - v).abs().max() > 1e-4 for k, v in want[part].items())
    assert all(int(s["step"]) == 1 for s in got["optimizer"]["state"].values())
    assert losses(run_dir)[0][1] != losses(reference)[0][1]  # not the random init's first loss
    # once the run has its own checkpoint it resumes from it, not from init_from
    again = run(cfg_for(small_shards, run_dir, f"init_from={source}", "optim.start_lr=0.0", "optim.lr=1e-9",
                        "optim.final_lr=0.0", "schedule.stop_at=2"))
    assert (again["first_step"], again["step"]) == (1, 2)


@pytest.mark.slow
def test_resuming_an_init_from_run_is_exact(reference, small_shards, tmp_path):
    """A run started from imported weights (the reference run's checkpoint, through the official layout and
    tubelet-import) and stopped after 3 steps resumes from its own checkpoint, init_from still given as a
    restarted job would, and ends exactly where the uninterrupted init_from run ends: losses, weights, optimizer."""
    from common.torch_file import write_torch_file
    from model.exports import export_official
    from model.imports import import_official
    cfg = cfg_for(small_shards, tmp_path / "unused")
    official = export_official(checkpoint.path_for(reference / "checkpoints", 4), tmp_path / "official.pth.tar")
    source = write_torch_file(tmp_path / "imported.pt", import_official(official, cfg.model))
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run(cfg_for(small_shards, whole, f"init_from={source}"))["step"] == STEPS
    first = run(cfg_for(small_shards, split, f"init_from={source}", "schedule.stop_at=3"))
    assert (first["first_step"], first["step"]) == (0, 3)
    second = run(cfg_for(small_shards, split, f"init_from={source}"))
    assert (second["first_step"], second["step"]) == (3, STEPS)
    assert losses(split) == losses(whole) and losses(whole) != losses(reference)
    assert_same_weights(weights(split), weights(whole))
    a, b = (torch.load(checkpoint.path_for(d / "checkpoints", STEPS), weights_only=True) for d in (whole, split))
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a["loader"] == b["loader"]
