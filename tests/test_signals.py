"""Collapse and feature-quality signals (train/signals.py): what they measure, the alert's bounds, and real runs
that stay healthy or are driven to collapse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from common.config import load_config
from train.config import TrainConfig
from train.signals import COLLAPSE, collapse_reasons, feature_signals
from train.trainer import run

from test_train import TINY  # tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
N, D = 32, 64
GRID = torch.arange(N).expand(4, -1)


def test_signals_measure_what_they_say():
    torch.manual_seed(0)
    healthy = feature_signals(torch.randn(4, N, D), GRID, N)
    assert healthy["std"] > 0.9 and healthy["erank"] > 0.7
    assert healthy["clip_share"] < 0.1 and healthy["position_share"] < 0.4 and not collapse_reasons(healthy)
    same = feature_signals(torch.randn(1, N, D).expand(4, N, D) + 1e-4 * torch.randn(4, N, D), GRID, N)
    assert same["std"] < 0.01 and same["position_share"] > 0.99  # every clip alike: a function of the position
    per_clip = feature_signals(torch.randn(4, 1, D).expand(4, N, D) + 1e-3 * torch.randn(4, N, D), GRID, N)
    assert per_clip["clip_share"] > 0.99 and per_clip["erank"] < 0.05  # the tokens of a clip are all alike
    assert {r.split()[0] for r in collapse_reasons(per_clip)} == {"clip_share", "erank"}
    constant = feature_signals(torch.randn(D).expand(4, N, D) + 1e-5 * torch.randn(4, N, D), GRID, N)
    assert constant["std"] < 0.01 and {"std"} <= {r.split()[0] for r in collapse_reasons(constant)}
    # predictions: positions differ per clip; the std across clips uses the positions clips share
    pos = torch.stack([torch.randperm(N)[:20] for _ in range(4)])
    partial = feature_signals(torch.randn(4, 20, D), pos, N)
    assert 0.5 < partial["std"] < 1.5 and 0 <= partial["position_share"] <= 1


def test_the_alert_uses_the_same_bounds():
    """configs/monitoring/rules/alerts.yml's TubeletRepresentationCollapse and train/signals.py agree."""
    rules = yaml.safe_load((ROOT / "configs/monitoring/rules/alerts.yml").read_text())["groups"][0]["rules"]
    (rule,) = [r for r in rules if r.get("alert") == "TubeletRepresentationCollapse"]
    found = {m[0]: ("below" if m[1] == "<" else "above", float(m[2]))
             for m in re.findall(r'tubelet_train_feature_(\w+)\{source="target"\} ([<>]) ([\d.]+)', rule["expr"])}
    assert found == COLLAPSE


def signal_rows(run_dir: Path) -> list:
    rows = [json.loads(ln) for ln in (run_dir / "losses.jsonl").read_text().splitlines()]
    return [r for r in rows if "target_std" in r]


@pytest.mark.slow
def test_a_healthy_run_stays_clear_and_a_collapsing_run_trips_the_signal(small_shards, tmp_path):
    """The same tiny recipe twice on the test shards: as configured (early training, healthy), and driven to
    collapse (the target encoder follows the online one at once, EMA momentum 0, with a learning rate 30x too
    high): the loss still falls, the signals say what happened."""
    base = TINY + [f"data.root={small_shards}", "schedule.total_steps=30", "checkpoint.every_steps=30",
                   "log_every=5"]
    run(load_config(TrainConfig, None, base + [f"run_dir={tmp_path / 'healthy'}"]))
    healthy = signal_rows(tmp_path / "healthy")
    assert [r["step"] for r in healthy] == [5, 10, 15, 20, 25, 30]
    assert not any(collapse_reasons(r, "target_") for r in healthy), healthy
    assert "looks collapsed" not in (tmp_path / "healthy" / "train.log").read_text()
    forced = ["optim.ema_start=0", "optim.ema_end=0", "optim.lr=3e-2", "optim.start_lr=3e-2"]
    run(load_config(TrainConfig, None, base + forced + [f"run_dir={tmp_path / 'collapsed'}"]))
    collapsed = signal_rows(tmp_path / "collapsed")
    assert collapse_reasons(collapsed[-1], "target_"), collapsed[-1]
    assert collapsed[-1]["loss"] < healthy[-1]["loss"]  # the loss alone would call it the better run
    log = (tmp_path / "collapsed" / "train.log").read_text()
    assert "WARNING" in log and "the representation looks collapsed (target_std" in log
    assert (tmp_path / "collapsed" / "loss.png").stat().st_size > 10_000
