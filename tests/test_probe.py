"""The frozen attentive probe: results next to the checkpoint, multi-view evaluation, resume, distributed run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.probe import AttentiveProbe
from pipeline.config import ConfigError, load_config
from train.config import TrainConfig
from train.probe import ProbeConfig, main
from train.probe import run as run_probe
from train.trainer import run as run_train

from test_train import TINY as TRAIN_TINY  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
TINY = TRAIN_TINY + ["schedule.total_steps=4", "checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def ckpt(small_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("probe_run")
    run_train(load_config(TrainConfig, None, TINY + [f"data.root={small_shards}", f"run_dir={run_dir}"]))
    return run_dir / "checkpoints" / "ckpt-00000004.pt"


def probe_args(ckpt: Path, shards: str, *extra: str) -> list:
    return [f"checkpoint={ckpt}", f"data.root={shards}", "data.batch_size=4", "data.threads=1", "data.dtype=fp32",
            "data.device=cpu", "device=cpu", "data.eval_clips=2", "data.eval_crops=3", "epochs=3",
            "cached_passes=2", "batch_size=8", *extra]


def test_attentive_probe_shapes_and_grads():
    probe = AttentiveProbe(32, 5, num_heads=4)
    tokens = torch.randn(3, 20, 32, requires_grad=True)
    logits = probe(tokens)
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert probe.query.grad is not None and tokens.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2 classes"):
        AttentiveProbe(32, 1)


def test_probe_writes_results_and_resumes(ckpt, small_shards, capsys):
    result = run_probe(load_config(ProbeConfig, None, probe_args(ckpt, small_shards)))
    out = ckpt.parent / f"probe-{ckpt.stem}-s0.json"
    saved = json.loads(out.read_text())
    assert saved["top1"] == result["top1"] and 0 <= result["top1"] <= 1
    assert result["videos"] == 4 and result["views"] == 6 and len(result["history"]) == 3
    assert result["classes"] == ["circle", "square", "triangle"] and out.with_suffix(".png").stat().st_size > 0
    # more epochs later: the cached features and the first 3 epochs are reused
    more = run_probe(load_config(ProbeConfig, None, probe_args(ckpt, small_shards, "epochs=5")))
    assert "resuming after epoch 3" in capsys.readouterr().out
    assert more["history"][:3] == result["history"] and len(more["history"]) == 5


def test_random_weights_baseline_is_a_separate_result(ckpt, small_shards):
    result = run_probe(load_config(ProbeConfig, None, probe_args(ckpt, small_shards, "random_init=true", "epochs=1")))
    assert result["random_init"] and (ckpt.parent / f"probe-random-{ckpt.stem}-s0.json").exists()


def test_probe_on_two_ranks(ckpt, small_shards, tmp_path):
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train.probe",
           *probe_args(ckpt, small_shards, "epochs=2", "cache=false", f"out={out}", "seed=7")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["videos"] == 4 and len(result["history"]) == 2  # views summed over both ranks


def test_probe_config_errors(capsys):
    with pytest.raises(ConfigError, match="checkpoint"):
        load_config(ProbeConfig, None, [])
    assert main(["checkpoint=/nonexistent/ckpt.pt"]) == 2
    assert "/nonexistent/ckpt.pt" in capsys.readouterr().err
