"""streamem (Zarr on disk, LocalCluster) against scikit-learn (in memory), same data, same init.

Seconds per iteration are measured as (time of a fit with 1 + m iterations
minus time of a fit with 1 iteration) / m, so neither library's set-up
(scikit-learn's initialisation pass, our graph construction and cluster
start) counts. Both fits use tol=0 and the same weights/means/precisions.

Usage:
    python scripts/bench/bench_vs_sklearn.py [--n-samples 1000000] [--n-features 16]
        [--n-components 8] [--covariance-type full ...] [--workers 2] [--iters 10]
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


def initial_parameters(X: np.ndarray, K: int, covariance_type: str) -> dict:
    centers = KMeans(K, n_init=1, random_state=0).fit(X[:: max(1, len(X) // 20000)]).cluster_centers_
    d = X.shape[1]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=1_000_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--covariance-type", nargs="+", default=["full"], choices=["full", "tied", "diag", "spherical"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--data", default=None, help="Zarr store to use/create (default: a temporary one)")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    path = args.data or os.path.join(tmp.name, "bench.zarr")
    if not os.path.exists(path):
        generate(path, args.n_samples, args.n_features, args.n_components, chunk_rows=args.chunk_rows, seed=1)
    X = zarr.open_array(path, mode="r")[:]
    print(f"# {date.today()} on {platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})")
    print(f"# data {X.shape[0]:,} x {X.shape[1]} float64, K={args.n_components}, Zarr chunks of {args.chunk_rows} rows, "
          f"streamem on a LocalCluster of {args.workers} workers x 1 thread; scikit-learn in memory")
    print(f"{'cov':>9} {'sklearn s/it':>12} {'streamem s/it':>13} {'ratio':>6} {'sklearn LL':>14} {'streamem LL':>14} "
          f"{'rel diff':>9} {'sk peak MiB':>11} {'se peak MiB':>11}")
    with local_cluster(n_workers=args.workers, threads_per_worker=1) as cluster, Client(cluster):
        for ct in args.covariance_type:
            init = initial_parameters(X, args.n_components, ct)
            common = dict(n_components=args.n_components, covariance_type=ct, tol=0.0, **init)
            sk_t, sk, sk_peak = seconds_per_iteration(lambda m: SkGaussianMixture(max_iter=m, **common), X, args.iters)
            se_t, se, se_peak = seconds_per_iteration(lambda m: streamem.GaussianMixture(max_iter=m, **common), path, args.iters)
            rel = abs(se.lower_bound_ - sk.lower_bound_) / abs(sk.lower_bound_)
            print(f"{ct:>9} {sk_t:12.3f} {se_t:13.3f} {se_t / sk_t:6.2f} {sk.lower_bound_:14.8f} {se.lower_bound_:14.8f} "
                  f"{rel:9.1e} {sk_peak / 2**20:11.0f} {se_peak / 2**20:11.0f}")


if __name__ == "__main__":
    main()
