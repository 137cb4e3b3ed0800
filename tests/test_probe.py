"""The frozen attentive probe: results next to the checkpoint, multi-view evaluation, resume, distributed run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.probe import AttentiveProbe
from common.config import ConfigError, load_config
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


def test_reference_head_computes_what_the_official_evaluation_computes():
    """The official AttentiveClassifier (facebookresearch/jepa, src/models/attentive_pooler.py), written out from
    its source: norm1 on the tokens, cross-attention whose `proj` is never applied, residual, MLP on norm2, linear;
    nn.LayerNorm's default eps 1e-5. The reference variant gives exactly that; the tubelet one applies a projection."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    probe = AttentiveProbe(32, 5, num_heads=4)  # variant="reference", the default
    assert probe.norm1.eps == probe.norm2.eps == 1e-5 and not any("attn.proj" in n for n, _ in probe.named_parameters())
    x = torch.randn(3, 20, 32)
    B, N, C, h = 3, 20, 32, 4
    q = probe.query.repeat(B, 1, 1)
    xn = F.layer_norm(x, (C,), probe.norm1.weight, probe.norm1.bias, eps=1e-5)
    qh = probe.attn.q(q).reshape(B, 1, h, C // h).permute(0, 2, 1, 3)
    k, v = probe.attn.kv(xn).reshape(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)
    attn = ((qh @ k.transpose(-2, -1)) * (C // h) ** -0.5).softmax(-1)
    y = (attn @ v).transpose(1, 2).reshape(B, 1, C)  # no projection
    q = q + y
    q = q + probe.mlp(F.layer_norm(q, (C,), probe.norm2.weight, probe.norm2.bias, eps=1e-5))
    torch.testing.assert_close(probe(x), probe.head(q[:, 0]), rtol=1e-5, atol=1e-6)
    ours = AttentiveProbe(32, 5, num_heads=4, variant="tubelet")
    assert ours.norm1.eps == 1e-6 and isinstance(ours.attn.proj, torch.nn.Linear)


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


@pytest.mark.slow
def test_random_weights_baseline_is_a_separate_result(ckpt, small_shards):
    result = run_probe(load_config(ProbeConfig, None, probe_args(ckpt, small_shards, "random_init=true", "epochs=1")))
    assert result["random_init"] and (ckpt.parent / f"probe-random-{ckpt.stem}-s0.json").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_proof_sweep_runs_pretraining_supervised_and_probes(tmp_path):
    """The recipe-search tool (research/proof_sweep.py): rendered sample, trainer steps, probes, summary."""
    from research import proof_sweep

    small = {"sample": {"train_per_class": 2, "val_per_class": 1},
             "train": ["schedule.total_steps=3", "optim.warmup_steps=1", "model.width=48", "model.depth=2",
                       "model.heads=3", "model.predictor_width=48", "model.predictor_depth=1",
                       "model.predictor_heads=3"],
             "probe": ["epochs=2", "cached_passes=1", "data.eval_clips=1", "data.eval_crops=2"]}
    camera = {**small, "sample": {**small["sample"], "motion": "camera"}, "control": "frame_difference"}
    discs = {**small, "sample": {**small["sample"], "motion": "discs"}, "control": "frame_difference"}
    extra = json.dumps({"jepa": small, "sup": {**small, "supervised": True}, "camdiff": camera, "discdiff": discs})
    out = tmp_path / "sweep"
    assert proof_sweep.main([f"out={out}", f"cache={tmp_path / 'cache'}", "variants=[]", f"extra={extra}",
                             "seeds=[0]", "workers=2"]) == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == ["camdiff", "discdiff", "jepa", "sup"]
    assert not [r for r in rows if "error" in r]
    for r in rows:
        assert r["steps"] == (0 if r["name"].endswith("diff") else 3)  # the controls pretrain nothing
        assert 0.0 <= r["pretrained"] <= 1.0 and 0.0 <= r["random"] <= 1.0
        assert 0.0 <= r["pretrained_signals"]["clip_share"] <= 1.0 and r["random_signals"]["erank"] > 0
    assert "| jepa | 1 |" in (out / "sweep.md").read_text()
    # one render per design (the sample's, the camera-motion one, the disc pans), reused by variants sharing it
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_disc_pans_move_the_way_their_label_says():
    """proof_sweep's disc design: the picture moves 45 * label degrees counter-clockwise from "right"."""
    from research.designs import DISC_CLASSES, render_discs

    for c in range(DISC_CLASSES):
        v = torch.from_numpy(render_discs({"split": "val", "cls_index": c, "index": 3})).float().mean(-1)
        a, b = v[0] - v[0].mean(), v[8] - v[8].mean()  # 8 frames apart: 8-12 px
        score = {(dy, dx): float((a[16:-16, 16:-16] * b.roll((-dy, -dx), (0, 1))[16:-16, 16:-16]).sum())
                 for dy in range(-14, 15) for dx in range(-14, 15)}
        dy, dx = max(score, key=score.get)  # b is a moved by (dy, dx), y down
        assert 7 <= math.hypot(dx, dy) <= 13, (c, dx, dy)
        assert round(math.degrees(math.atan2(-dy, dx)) / 45) % DISC_CLASSES == c, (c, dx, dy)


@pytest.mark.slow
def test_learning_proof_runs_end_to_end_with_its_controls(tmp_path):
    """make proof's smoke run: pretraining, the probe on pretrained and random weights, the longer-probe control,
    the signals, proof.json and proof.png; steps timed from the budget when not given."""
    from research.learning_proof import ProofConfig, prove, steps_for_budget

    tiny = ["model.width=48", "model.depth=2", "model.heads=3", "model.predictor_width=48", "model.predictor_depth=1",
            "model.predictor_heads=3"]
    cfg = ProofConfig(out=str(tmp_path), device="cpu", steps=4, long_probe=2, train_per_class=2, val_per_class=1,
                      train=tiny, probe=["epochs=1", "cached_passes=1", "data.eval_clips=1", "data.eval_crops=1"])
    summary = prove(cfg)
    (r,) = summary["per_seed"]
    assert summary["steps"] == 4 and r["steps"] == 4 and summary["chance"] == 20.0
    for key in ("pretrained", "random", "pretrained_long", "random_long"):
        assert 0.0 <= r[key] <= 1.0
    assert set(r["pretrained_signals"]) == {"std", "erank", "clip_share", "position_share"}
    assert json.loads((tmp_path / "proof.json").read_text())["task"] == "camera" and (tmp_path / "proof.png").exists()
    assert 20 <= steps_for_budget(cfg, torch.device("cpu"), 1.0) <= 20000


class _Payload:
    """What a crafted .pt file could hold: an object whose unpickling runs code."""

    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_proof_sweep_never_unpickles_code(tmp_path):
    """A crafted data file (a pickled callable) is refused, not run: the sweep loads with weights_only=True."""
    import pickle

    from research.proof_sweep import SweepConfig, run_job

    evil = tmp_path / "evil.pt"
    torch.save({"train": ([_Payload()], [0])}, evil)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_job({"name": "x", "seed": 0, "variant": {}, "data": str(evil), "out": str(tmp_path)})
    assert SweepConfig(out="o").cache == ""  # the default cache is <out>/cache, this run's own


def test_proof_sweep_reports_a_job_that_died_instead_of_waiting_forever():
    import multiprocessing as mp
    from types import SimpleNamespace

    from research.scheduler import next_result

    queue = mp.get_context("spawn").Queue()
    running = {("alive", 0): SimpleNamespace(is_alive=lambda: True, exitcode=None),
               ("killed", 1): SimpleNamespace(is_alive=lambda: False, exitcode=-9)}
    row = next_result(queue, running, poll=0.05)
    assert row == {"name": "killed", "seed": 1, "error": "job process died without a result (exit code -9)"}
    queue.put({"name": "alive", "seed": 0, "pretrained": 0.5})
    assert next_result(queue, running, poll=0.05)["name"] == "alive"


@pytest.mark.parametrize("kind", ["vjepa2", "ijepa"])
def test_probe_takes_an_imported_hf_checkpoint_as_it_is(small_shards, tmp_path, kind):
    """tubelet-import of a tiny Hugging Face VJEPA2Model / IJepaModel folder, then tubelet-probe on that file as it is
    (no training config in it: the probe's own data settings; an image model sees one frame per clip)."""
    transformers = pytest.importorskip("transformers")
    from model.imports import main as import_main
    from test_interop import HF_IJEPA_TINY, HF_TINY, fill_deterministic, ijepa_table

    if kind == "vjepa2":
        model = transformers.VJEPA2Model(transformers.VJEPA2Config(**HF_TINY))
    else:
        model = transformers.IJepaModel(transformers.IJepaConfig(**HF_IJEPA_TINY))
    fill_deterministic(model, 3)
    if kind == "ijepa":
        with torch.no_grad():
            model.embeddings.position_embeddings.copy_(ijepa_table())
    model.save_pretrained(tmp_path / "hf")
    ckpt = tmp_path / "imported" / "release.pt"
    assert import_main([str(tmp_path / "hf"), f"out={ckpt}"]) == 0
    result = run_probe(load_config(ProbeConfig, None, probe_args(ckpt, small_shards, "epochs=2", "data.eval_crops=1")))
    assert result["videos"] == 4 and len(result["history"]) == 2 and 0 <= result["top1"] <= 1
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    assert json.loads((ckpt.parent / "probe-release-s0.json").read_text())["top1"] == result["top1"]
