#!/usr/bin/env bash
# The wheels a device call carries (the GPU image has torch, numpy, Pillow, safetensors, accelerate,
# pyarrow, fsspec, xxhash ... but not these): Python 3.12, manylinux x86_64, no dependencies
# resolved (each is named). Into .wheels-dir (default .whl, git-excluded); carry it and start the
# command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
WHEELS=(diffusers==0.42.1 lpips==0.1.4 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
ls -la "$DEST"
du -sh "$DEST"
