"""streamem (Zarr on disk, LocalCluster) against scikit-learn (in memory), same data, same init.

Seconds per iteration are (time of a fit with 1 + m iterations minus time of
a fit with 1 iteration) / m, so neither library's set-up (scikit-learn's
initialisation pass, our cluster warm-up and first read) counts; the median
over --repeats such measurements (streamem's configurations interleaved, so
a slow minute of a shared machine does not land on one of them). Both fit
with tol=0 from the same weights/means/precisions. streamem runs first,
before the data are loaded into this process for scikit-learn, so its peak
memory (client + scheduler + workers) does not include the in-memory copy.

Usage:
    python scripts/bench/bench_vs_sklearn.py [--n-samples 1000000] [--n-features 16]
        [--n-components 8] [--covariance-type full tied diag spherical]
        [--dtype float64 float32] [--persist never] [--workers 2] [--iters 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from datetime import date

import numpy as np
import zarr
from distributed import Client
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import streamem
from streamem.cluster import local_cluster
from streamem.generate import generate
from streamem.monitor import PeakMemory


def initial_parameters(head: np.ndarray, K: int, covariance_type: str) -> dict:
    centers = KMeans(K, n_init=1, random_state=0).fit(head).cluster_centers_
    d = head.shape[1]
    precisions = {
        "full": np.repeat(np.eye(d)[None], K, axis=0),
        "tied": np.eye(d),
        "diag": np.ones((K, d)),
        "spherical": np.ones(K),
    }[covariance_type]
    return dict(weights_init=np.full(K, 1.0 / K), means_init=centers, precisions_init=precisions)


def seconds_per_iteration(make, fit_input, iters: int) -> tuple[float, object, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        tic = time.perf_counter()
        make(1).fit(fit_input)
        one = time.perf_counter() - tic
        with PeakMemory() as mem:
            tic = time.perf_counter()
            model = make(1 + iters).fit(fit_input)
            many = time.perf_counter() - tic
    return (many - one) / iters, model, mem.peak


def median_run(runs: list[tuple[float, object, int]]) -> tuple[float, object, int]:
    """The run of median time (its model), with the largest peak memory of all runs."""
    ordered = sorted(runs, key=lambda run: run[0])
    seconds, model, _ = ordered[len(ordered) // 2]
    return seconds, model, max(run[2] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=1_000_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--covariance-type", nargs="+", default=["full", "tied", "diag", "spherical"],
                        choices=["full", "tied", "diag", "spherical"])
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--persist", default="auto", choices=["auto", "always", "never"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per configuration (median reported)")
    parser.add_argument("--data", default=None, help="Zarr store to use/create (default: a temporary one)")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    path = args.data or os.path.join(tmp.name, "bench.zarr")
    if not os.path.exists(path):
        generate(path, args.n_samples, args.n_features, args.n_components, chunk_rows=args.chunk_rows, seed=1)
    stored = zarr.open_array(path, mode="r")
    head = stored[:20_000]
    inits = {ct: initial_parameters(head, args.n_components, ct) for ct in args.covariance_type}
    print(f"# {date.today()} on {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})")
    print(f"# median of {args.repeats} measurements per configuration")
    print(f"# data {stored.shape[0]:,} x {stored.shape[1]} float64 in a Zarr store, K={args.n_components}, chunks of "
          f"{args.chunk_rows} rows; streamem: LocalCluster of {args.workers} workers x 1 thread, persist={args.persist!r}; "
          f"scikit-learn {__import__('sklearn').__version__}: in memory, all cores")

    ours: dict = {}
    with local_cluster(n_workers=args.workers, threads_per_worker=1) as cluster, Client(cluster):
        for _ in range(args.repeats):
            for ct in args.covariance_type:
                for dtype in args.dtype:
                    kw = dict(n_components=args.n_components, covariance_type=ct, tol=0.0, dtype=dtype,
                              persist=args.persist, **inits[ct])
                    ours.setdefault((ct, dtype), []).append(
                        seconds_per_iteration(lambda m: streamem.GaussianMixture(max_iter=m, **kw), path, args.iters))
    ours = {key: median_run(runs) for key, runs in ours.items()}

    X = stored[:]
    print(f"{'cov':>9} {'dtype':>7} {'sklearn s/it':>12} {'streamem s/it':>13} {'ratio':>6} {'sklearn LL':>14} "
          f"{'streamem LL':>14} {'rel diff':>9} {'sk peak MiB':>11} {'se peak MiB':>11}")
    for ct in args.covariance_type:
        kw = dict(n_components=args.n_components, covariance_type=ct, tol=0.0, **inits[ct])
        sk_t, sk, sk_peak = median_run([seconds_per_iteration(lambda m: SkGaussianMixture(max_iter=m, **kw), X, args.iters)
                                        for _ in range(args.repeats)])
        for dtype in args.dtype:
            se_t, se, se_peak = ours[ct, dtype]
            rel = abs(se.lower_bound_ - sk.lower_bound_) / abs(sk.lower_bound_)
            print(f"{ct:>9} {dtype:>7} {sk_t:12.3f} {se_t:13.3f} {se_t / sk_t:6.2f} {sk.lower_bound_:14.8f} "
                  f"{se.lower_bound_:14.8f} {rel:9.1e} {sk_peak / 2**20:11.0f} {se_peak / 2**20:11.0f}")
        if len(args.dtype) == 2:
            t64, m64, _ = ours[ct, "float64"]
            t32, m32, _ = ours[ct, "float32"]
            print(f"{'':>9} float32/float64 time {t32 / t64:.2f}, |LL32 - LL64| = {abs(m32.lower_bound_ - m64.lower_bound_):.1e}")


if __name__ == "__main__":
    main()
