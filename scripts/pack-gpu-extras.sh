#!/usr/bin/env bash
# Wheels a GPU host reached through capped transfers needs beyond ../shared/gpu/pack-dali's bundle, as extra parts
# that bundle's setup.sh installs when they arrive (CPython 3.12, manylinux x86-64):
#   DEST/extra/nvc   PyNvVideoCodec (make bench-gpu's peer row; about 26 MB)
# Usage: scripts/pack-gpu-extras.sh [DEST]   (default .gpu; then stash it with carry [".gpu/extra/nvc", ".gpu/setup.sh"])
set -euo pipefail
dest=${1:-.gpu}
rm -rf "$dest/extra/nvc"
mkdir -p "$dest/extra/nvc"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest/extra/nvc" "pynvvideocodec==2.2.4"
ls -la "$dest/extra/nvc"
