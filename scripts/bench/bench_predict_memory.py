"""Peak memory of `streamem predict --proba --score` against data size.

Runs the real command line in a subprocess (LocalCluster of 2 workers) on the
stores made by bench_scaling.py and samples the resident memory of the
command and all its children every 50 ms.

Usage: python scripts/bench/bench_predict_memory.py [--dir data/bench] [--sizes 2000000 16000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date

import psutil

import streamem
from streamem.generate import generate, mixture_parameters


def run_with_peak(cmd: list[str]) -> tuple[int, float, int]:
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, tic = 0, time.perf_counter()
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        sys.exit(proc.stderr.read().decode())
    return proc.returncode, time.perf_counter() - tic, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="data/bench")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000_000, 16_000_000])
    args = parser.parse_args()
    K, D = 8, 16
    truth = mixture_parameters(K, D, 2)
    tmp = tempfile.mkdtemp()
    try:
        # A model of the right shape, fitted on a small sample of the same mixture.
        small = os.path.join(tmp, "small.zarr")
        generate(small, 20_000, D, K, seed=2)
        model = os.path.join(tmp, "model.zarr")
        streamem.GaussianMixture(K, random_state=0, means_init=truth["means"]).fit(small).save(model)
        print(f"# {date.today()}: streamem predict --proba --score, 2 workers, output to local disk")
        for n in args.sizes:
            data = os.path.join(args.dir, f"scaling-{n}-65536.zarr")
            if not os.path.exists(data):
                generate(data, n, D, K, seed=2)
            out = os.path.join(tmp, "pred.zarr")
            _, seconds, peak = run_with_peak(
                [sys.executable, "-m", "streamem.cli", "predict", model, data, "--out", out, "--proba", "--score", "-q"]
            )
            out_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
            print(f"N={n:>11,}: input {n * D * 8 / 2**30:.2f} GiB, output {out_bytes / 2**30:.2f} GiB, "
                  f"{seconds:.1f} s, peak RSS all processes {peak / 2**30:.2f} GiB")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
