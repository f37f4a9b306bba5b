#!/usr/bin/env bash
# Run benchmarks/gpu.py on the lent GPU machine, in one call of the device tool:
#
#   here:   bash benchmarks/device_wheels.sh          # once: the wheels its image lacks, into .whl/
#   device: run(command="bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=420)
#
# Installs the wheels beside the image's torch (PYTHONPATH first, so the pinned
# pandas/tifffile/timm win), says what it runs on, then writes gpu.py's JSON and log
# to $OUT after every step: a run stopped from outside still returns its figures.
# Extra arguments go to gpu.py (for example --budget 240 or --compile).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run benchmarks/device_wheels.sh here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed" >&2; exit 2; }
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv >"$OUT/nvidia-smi.csv" 2>&1 || true
cat "$OUT/nvidia-smi.csv"
python3 - <<'PY' || exit 2
import importlib.metadata as md, sys
names = ["torch", "timm", "numpy", "pandas", "anndata", "zarr", "tifffile", "imagecodecs", "dask"]
print("python", sys.version.split()[0], *(f"{n} {md.version(n)}" for n in names))
import napari_deepspot2cell.encoders.embed, napari_deepspot2cell.predict  # noqa: F401  (fails here, not mid-run)
PY
python3 benchmarks/gpu.py --out "$OUT/gpu.json" --tmp /tmp "$@" 2>&1 | tee "$OUT/gpu.log"
rc=${PIPESTATUS[0]}
echo "gpu.py exit $rc; figures in $OUT/gpu.json"
exit "$rc"
