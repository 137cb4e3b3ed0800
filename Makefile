# tubelet: two commands on a fresh machine: `make demo` and `make test`. Every target sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch: the CPU build here; on a GPU machine `make setup TORCH=torch` (or a pinned CUDA build).
TORCH ?= torch==2.13.0
# DALI flavour follows the CUDA major version: DALI=nvidia-dali-cuda120 on CUDA 12.
DALI ?= nvidia-dali-cuda130
STAMP := $(VENV)/.tubelet-setup
ARGS ?=

.PHONY: setup ffmpeg-tool prometheus-tool sample shards train probe proof test bench-shards bench-loader \
	bench-train monitor demo clean help

help:
	@echo "make setup | sample | shards [ARGS='k=v ...'] | test | bench-shards | demo"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]" "$(DALI)"
	@$(PY) -c "import torch, nvidia.dali, webdataset, av, pyarrow, omegaconf, prometheus_client; print('tubelet setup ok: torch', torch.__version__, 'DALI', nvidia.dali.__version__)"
	@touch $(STAMP)

# Debian tools some targets need (ffmpeg as the benchmark baseline); installed only when missing.
ffmpeg-tool:
	@command -v ffmpeg >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; }

# Debian's prometheus (prometheus + promtool) for `make monitor` and the metrics tests; installed only when missing.
prometheus-tool:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

sample: setup
	$(PY) -m pipeline.sample --out data/sample

# No ARGS: shards the built-in sample (generated if absent) into shards/sample/.
shards: setup
	$(PY) -m pipeline.make_shards --config configs/shards.yaml $(ARGS)

test: setup prometheus-tool
	$(PY) -m pytest -q $(ARGS)

bench-shards: setup ffmpeg-tool
	$(PY) -m benchmarks.bench_shards $(ARGS)

bench-loader: setup
	$(PY) -m benchmarks.bench_loader $(ARGS)

# Prometheus on 127.0.0.1:9090 scraping a local training job (ranks on 127.0.0.1:9400..9407); data in runs/prometheus.
monitor: prometheus-tool
	bash scripts/monitor.sh $(ARGS)

demo: shards

clean:
	rm -rf data/sample shards/sample runs
