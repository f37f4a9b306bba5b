#!/usr/bin/env bash
# Fetch, on this machine, the wheels that benchmarks/gpu.py needs on the lent GPU
# machine and its image lacks (that machine reaches no package registry). They go
# to .whl/ (ignored by git); device_run.sh installs them there. Python 3.12, x86-64.
#
# The image has torch, numpy, scipy, h5py, scikit-image, huggingface_hub,
# safetensors, pyyaml and the like, but no anndata, zarr, numcodecs, imagecodecs or
# dask, and a pandas 3 that anndata refuses: these are pinned to what CI runs here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${DEVICE_PYTHON_VERSION:-3.12}  # the image's python3; another only to rehearse here
PKGS=(
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0
  scverse-misc==0.0.3 session-info2==0.4.1
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  imagecodecs==2026.3.6 tifffile==2026.3.3
  dask==2026.8.0 partd==1.4.2 locket==1.0.0
  pandas==2.3.3 pytz==2026.6 tzdata==2026.6
  timm==1.0.31
)
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
n=$(ls .whl/*.whl | wc -l)
[ "$n" -eq "${#PKGS[@]}" ] || { echo "expected ${#PKGS[@]} wheels: remove stale ones from .whl/" >&2; exit 1; }
# The device tool sends the tree (tracked and untracked, not ignored) and the carried .whl: 64 MiB at most.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
whl=$(cat .whl/*.whl | wc -c)
echo "$n wheels in .whl/: $((whl / 1048576)) MiB; with the tree, $(((tree + whl) / 1048576)) of the 64 MiB a call carries"
[ $((tree + whl)) -lt $((64 * 1048576)) ] || { echo "tree + wheels exceed 64 MiB: the device tool would refuse the call" >&2; exit 1; }
