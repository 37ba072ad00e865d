"""Memory against data size, speed-up from 1 to 2 workers, and tasks per pass.

1. Memory flat in N: fit Zarr stores of --sizes rows x 16 float64, streaming
   (persist="never"), on a 2-worker LocalCluster; peak resident memory of
   all processes (client, scheduler, workers) during the fit.
2. Speed-up: seconds per iteration at the first size with 1 and 2 workers,
   streaming from disk and with the data held in the workers' memory.
3. Tasks per pass for n_init = 1 and 4 at the first size, and at 2x chunks,
   on the local threaded scheduler (one task per chunk) and on a 2-worker
   cluster holding the data (a task per run of chunks on one worker).

Usage:
    python scripts/bench/bench_scaling.py [--sizes 2000000 16000000] [--dir data/bench]
        [--repeats 3] [--only memory speedup tasks]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from datetime import date

import numpy as np
from distributed import Client
from sklearn.exceptions import ConvergenceWarning

import streamem
from streamem.cluster import local_cluster
from streamem.generate import generate, mixture_parameters
from streamem.monitor import PeakMemory

D, K = 16, 8


def store(directory: str, n: int, chunk_rows: int = 65_536) -> str:
    path = os.path.join(directory, f"scaling-{n}-{chunk_rows}.zarr")
    if not os.path.exists(path):
        generate(path, n, D, K, chunk_rows=chunk_rows, seed=2)
    return path


def fixed_init() -> dict:
    truth = mixture_parameters(K, D, 2)
    return dict(weights_init=np.full(K, 1 / K), means_init=truth["means"] + 0.5, precisions_init=np.repeat(np.eye(D)[None], K, 0))


def timed_fit(path: str, workers: int, iters: int, persist: str = "never") -> tuple[float, int]:
    """Seconds per iteration (fit with 1 + iters iterations minus fit with 1) and peak memory."""
    with local_cluster(n_workers=workers, threads_per_worker=1) as cluster, Client(cluster):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            tic = time.perf_counter()
            streamem.GaussianMixture(K, max_iter=1, tol=0, persist=persist, **fixed_init()).fit(path)
            one = time.perf_counter() - tic
            with PeakMemory() as mem:
                tic = time.perf_counter()
                streamem.GaussianMixture(K, max_iter=1 + iters, tol=0, persist=persist, **fixed_init()).fit(path)
                many = time.perf_counter() - tic
    return (many - one) / iters, mem.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000_000, 16_000_000])
    parser.add_argument("--dir", default="data/bench")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="speed-up: median of this many measurements")
    parser.add_argument("--only", nargs="+", default=["memory", "speedup", "tasks"], choices=["memory", "speedup", "tasks"])
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    print(f"# {date.today()} on {platform.node()} ({os.cpu_count()} CPUs); D={D}, K={K}, full, float64, Zarr chunks of 65,536 rows")

    if "memory" in args.only:
        print("\n## memory against N (2 workers, streaming: persist='never')")
        peaks = {}
        for n in args.sizes:
            path = store(args.dir, n)
            sec, peak = timed_fit(path, 2, args.iters)
            peaks[n] = peak
            print(f"N={n:>11,} data {n * D * 8 / 2**30:5.2f} GiB  peak RSS all processes {peak / 2**30:5.2f} GiB  {sec:6.2f} s/iteration")
        if len(peaks) > 1:
            lo, hi = min(peaks), max(peaks)
            print(f"peak at N={hi:,} / peak at N={lo:,}: {peaks[hi] / peaks[lo]:.2f}")

    if "speedup" in args.only:
        print(f"\n## speed-up from 1 to 2 workers (1 thread each; median of {args.repeats})")
        path = store(args.dir, args.sizes[0])
        for persist in ("never", "always"):
            one = np.median([timed_fit(path, 1, args.iters, persist)[0] for _ in range(args.repeats)])
            two = np.median([timed_fit(path, 2, args.iters, persist)[0] for _ in range(args.repeats)])
            print(f"persist={persist!r}: 1 worker {one:.3f} s/iteration, 2 workers {two:.3f} s/iteration, speed-up {one / two:.2f}x")

    if "tasks" in args.only:
        print("\n## tasks per pass")
        with local_cluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster, set_as_default=False) as client:
            for where, kw in (("threads, streaming", {}), ("2 workers, held in memory", dict(client=client, persist="always"))):
                for n_init in (1, 4):
                    for chunk_rows in (65_536, 32_768):
                        p = store(args.dir, args.sizes[0], chunk_rows)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", ConvergenceWarning)
                            m = streamem.GaussianMixture(K, n_init=n_init, max_iter=1, random_state=0, init_sample_size=20_000, **kw).fit(p)
                        chunks = len(m.fit_data_["row_chunks"])
                        print(f"{where}: n_init={n_init} chunks={chunks:4d}: {m.tasks_per_pass_} tasks per pass, "
                              f"{m.n_data_passes_} passes in all")


if __name__ == "__main__":
    main()
