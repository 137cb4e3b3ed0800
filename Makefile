# tubelet: two commands on a fresh machine: `make demo` and `make test`. Every target sets itself up.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3 || command -v python)
VENV := .venv
# SETUP= skips the install step on a host that has the packages but no package index (a GPU host with the DALI
# bundle on PYTHONPATH: make gpu-check SETUP=); then the targets run with that host's python3 (or python).
SETUP ?= setup
ifeq ($(strip $(SETUP)),)
PY ?= $(PYTHON)
else
PY := $(VENV)/bin/python
endif
# torch: the CPU build here; on a GPU machine `make setup TORCH=torch` (or a pinned CUDA build).
TORCH ?= torch==2.13.0
# DALI flavour follows the CUDA major version: DALI=nvidia-dali-cuda120 on CUDA 12.
DALI ?= nvidia-dali-cuda130
STAMP := $(VENV)/.tubelet-setup
ARGS ?=

.PHONY: setup ffmpeg-tool prometheus-tool sample shards sample-shards train probe proof test test-fast test-gpu gpu-check \
	demo-images bench-shards bench-loader bench-gpu bench-remote bench-scale bench-train monitor demo clean help

help:
	@echo "make setup | demo | demo-images | test | test-fast | test-gpu | gpu-check | sample | shards | train | probe | proof | monitor | bench-shards | bench-loader | bench-train | bench-gpu | bench-remote | bench-scale   (ARGS='key=value ...'; ARGS=--help lists the keys; SETUP= skips the install)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]" "$(DALI)"
	@$(PY) -c "import torch, nvidia.dali, webdataset, av, pyarrow, omegaconf, prometheus_client, s3fs, moto; print('tubelet setup ok: torch', torch.__version__, 'DALI', nvidia.dali.__version__)"
	@# the peers make bench-loader compares with (decord, torchcodec): optional, a row says when one is missing
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[peers]" \
		|| echo "tubelet setup: the loader peers (pyproject's peers extra) did not install; make bench-loader says so in their rows"
	@touch $(STAMP)

# Debian tools some targets need (ffmpeg: the benchmark baseline, the CLI that re-encodes bench-loader's inputs, and
# the shared libraries torchcodec loads); installed only when missing.
ffmpeg-tool:
	@command -v ffmpeg >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; }

# Debian's prometheus (prometheus + promtool) and Alertmanager (alertmanager + amtool) for `make monitor` and the
# metrics tests; installed only when missing.
prometheus-tool:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null \
		&& command -v amtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install \
		-y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null; }

sample: $(SETUP)
	$(PY) -m shards.synthetic.generate out=data/sample $(ARGS)

# No ARGS: shards the built-in sample (generated if absent) into data/shards/sample/.
shards: $(SETUP)
	$(PY) -m shards.make_shards --config configs/shards.yaml $(ARGS)

# The built-in sample's shard set, for the targets that train on it: resumes or checks it (seconds once it is
# complete). Their ARGS are their own, never passed to make shards.
sample-shards: $(SETUP)
	$(PY) -m shards.make_shards --config configs/shards.yaml

# ViT-tiny on the built-in sample (data/shards/sample); a few minutes on 2 CPU cores. Rerunning resumes runs/cpu.
train: sample-shards
	$(PY) -m train.trainer --config configs/train/cpu.yaml $(ARGS)

# Frozen attentive probe of a checkpoint: make probe ARGS="checkpoint=runs/cpu/checkpoints/ckpt-00000300.pt"
probe: $(SETUP)
	$(PY) -m train.probe --config configs/probe/cpu.yaml $(ARGS)

# The learning proof: pretrain on a rendered task, probe it and random weights, with a longer-probe control
# (a smoke run on the CPU; on a GPU: make proof ARGS="device=cuda budget_s=360 seeds=[0,1,2]").
proof: $(SETUP)
	$(PY) -m research.learning_proof $(ARGS)

# Everything (CPU; real DALI, video, multi-process DDP and Prometheus): about 9 minutes on 2 cores (GPU checks: make test-gpu).
test: $(SETUP) prometheus-tool ffmpeg-tool
	$(PY) -m pytest -q $(ARGS)

# The suite without the long integration tests (marked `slow`): under a minute on 2 cores, for the edit loop.
test-fast: $(SETUP) prometheus-tool ffmpeg-tool
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench-shards: $(SETUP) ffmpeg-tool
	$(PY) -m benchmarks.bench_shards $(ARGS)

bench-train: $(SETUP)
	$(PY) -m benchmarks.bench_train $(ARGS)

# tubelet's loader against its PyAV reference and the raw-file peers (decord as the official V-JEPA loader uses
# it, torchcodec), on generated H.264 inputs and on the same re-encoded with ffmpeg's defaults (the ffmpeg CLI).
bench-loader: $(SETUP) ffmpeg-tool
	$(PY) -m benchmarks.bench_loader $(ARGS)

# One GPU: the decode paths and the best loader feeding a ViT-L/16 step, about 4 minutes (a GPU host without a
# package index: make bench-gpu SETUP= ARGS=out=DIR). ARGS=smoke=true runs it on the CPU.
bench-gpu: $(SETUP)
	$(PY) -m benchmarks.bench_gpu $(ARGS)

# The checks that need a CUDA GPU, on shard sets of their own (skipped without a GPU).
test-gpu: $(SETUP)
	$(PY) -m pytest -q -m gpu tests/test_gpu.py $(ARGS)

# Everything a GPU session owes in one call, under 9 minutes on one H100/H200: the GPU tests, bench-gpu, bench-train
# ViT-B/L/H eager with the largest batch of each, ViT-L compiled; each step bounded, every row in OUT as measured.
# On the GPU host: make gpu-check SETUP= OUT=DIR. ARGS=smoke runs the same steps on the CPU, tiny.
OUT ?= runs/gpu-check
gpu-check: $(SETUP)
	OUT=$(OUT) PY=$(PY) bash benchmarks/gpu_check.sh $(ARGS)

# One epoch from a local S3 server (moto) through a cache a tenth of the set, against local disk; kill -9 resume;
# shuffle quality of the window order. A few minutes the first time (inputs and shards are made once).
bench-remote: $(SETUP)
	$(PY) -m benchmarks.bench_remote $(ARGS)

# A rank's start-up, memory and bytes read on a big synthetic set (sparse shards), the merge and verify, each in a
# fresh process: ARGS="rows=1000000 today=../main-checkout s3=true --json FILE" (BENCHMARKS.md).
bench-scale: $(SETUP)
	$(PY) -m benchmarks.bench_scale $(ARGS)

# Prometheus on 127.0.0.1:9090 scraping local training (ranks on 127.0.0.1:19400..19407) and sharding
# (127.0.0.1:19390), with Alertmanager on 127.0.0.1:9093; data in runs/prometheus and runs/alertmanager.
monitor: prometheus-tool
	bash scripts/monitor.sh $(ARGS)

# The main job end to end on the built-in sample: generate, shard, pretrain briefly (loss.png in runs/demo).
demo: sample-shards
	$(PY) -m train.trainer --config configs/train/cpu.yaml run_dir=runs/demo schedule.total_steps=60 \
		optim.warmup_steps=10 checkpoint.every_steps=30 $(ARGS)

# I-JEPA on the built-in image sample (generated and sharded on first use), then I-JEPA's linear probe of it.
demo-images: $(SETUP)
	$(PY) -m shards.make_shards --config configs/shards_images.yaml
	$(PY) -m train.trainer --config configs/train/ijepa_cpu.yaml run_dir=runs/demo-images schedule.total_steps=100 \
		optim.warmup_steps=10 checkpoint.every_steps=50 $(ARGS)
	$(PY) -m train.probe checkpoint=runs/demo-images/checkpoints/ckpt-00000100.pt data.root=data/shards/sample_images \
		head=linear epochs=10 device=cpu data.device=cpu data.dtype=fp32

clean:
	rm -rf data/sample data/shards/sample data/sample_images data/shards/sample_images runs
