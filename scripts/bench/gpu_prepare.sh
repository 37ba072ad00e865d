#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI) before a device session: downloads,
# into .whl/ (ignored by git), the Python 3.12 wheels of what streamem needs
# and the NVIDIA device image lacks (dask, distributed, zarr and their own
# needs), at the versions of this checkout's .venv. Then, with the device
# tool: run(command="bash scripts/bench/gpu_check.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/../.."
pins=$(.venv/bin/python -m pip freeze | grep -i -E '^(dask|distributed|zarr|numcodecs|donfig|google-crc32c|partd|locket|tblib|zict|tornado|importlib.metadata)==')
rm -rf .whl && mkdir .whl
for pin in $pins; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done
ls .whl
du -sh .whl
