#!/usr/bin/env bash
# Before a device call: put into this checkout what a copy of the tree on a GPU machine lacks, then call
#   run(command="ECGCL_GIT_COMMIT=<commit> bash bench/run_gpu.sh main profile", carry=[".whl"], timeout_s=600)
# - .bench_shared/torch_reference.py: ../shared beside the checkout does not travel (untracked, not ignored: travels)
# - .whl/ml_collections-*.whl: the GPU image may lack ml_collections; run_gpu.sh installs it from there (ignored by
#   git, so name it in carry)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .bench_shared .whl
cp ../shared/bench/torch_reference.py .bench_shared/
wheel=$(ls /opt/pypi/files/ml_collections-*-py3-none-any.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then
  cp "$wheel" .whl/
else  # elsewhere: let pip fetch it (needs network on this side only)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml_collections
fi
ls -l .bench_shared .whl
echo "commit: $(git rev-parse --short HEAD)"
