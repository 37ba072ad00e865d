#!/usr/bin/env bash
# Run ON the device machine (see gpu_prepare.sh): the GPU correctness tests,
# then the GPU benchmark (10M x 16, K=8 full; scikit-learn on that machine's
# CPUs). Output also lands in $OUT/gpu_check.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import cupy, dask, zarr, distributed; print('cupy', cupy.__version__, 'dask', dask.__version__, 'zarr', zarr.__version__)"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs
  timeout 420 python3 scripts/bench/bench_gpu.py --n-samples 10000000 --iters 5
} 2>&1 | tee "$log"
