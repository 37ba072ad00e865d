"""GPU (CuPy) against scikit-learn on the CPUs, same data and init.

N = 10M x 16 float64, K = 8 full by default. streamem runs with
device="cuda" on in-memory chunks (local threaded scheduler, one GPU);
scikit-learn on all CPU cores. Prints seconds per iteration, the ratio, the
final mean log-likelihood of each and the fraction of the GPU's float64 peak
(--peak-tflops, default 67 for an H100/H200 SXM with FP64 tensor cores)
reached by the ~4 N K d^2 floating-point operations of an iteration.

Usage: python scripts/bench/bench_gpu.py [--n-samples 10000000] [--skip-sklearn]
"""

from __future__ import annotations

import argparse
import time
import warnings
from datetime import date

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import streamem
from streamem.generate import _draw, mixture_parameters


def per_iteration(make, X, iters):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        tic = time.perf_counter()
        make(1).fit(X)
        one = time.perf_counter() - tic
        tic = time.perf_counter()
        model = make(1 + iters).fit(X)
        return (time.perf_counter() - tic - one) / iters, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=10_000_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--chunk-rows", type=int, default=1_000_000)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=67.0)
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args()
    import cupy

    N, d, K = args.n_samples, args.n_features, args.n_components
    truth = mixture_parameters(K, d, 3)
    X = _draw(truth, np.linalg.cholesky(truth["covariances"]), N, np.random.default_rng(3))
    init = dict(weights_init=np.full(K, 1 / K), means_init=truth["means"] + 0.3, precisions_init=np.repeat(np.eye(d)[None], K, 0))
    common = dict(n_components=K, covariance_type="full", tol=0.0, **init)
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"# {date.today()}: {N:,} x {d} float64, K={K} full; GPU {name}; chunks of {args.chunk_rows:,} rows")
    import dask.array as da

    chunks = da.from_array(X, chunks=(args.chunk_rows, d))
    gpu_t, gpu = per_iteration(lambda m: streamem.GaussianMixture(max_iter=m, device="cuda", persist="never", **common), chunks, args.iters)
    flops = 4 * N * K * d * d
    print(f"streamem GPU: {gpu_t:.3f} s/iteration, LL {gpu.lower_bound_:.10f}, "
          f"{flops / gpu_t / 1e12:.2f} TFLOP/s = {flops / gpu_t / 1e12 / args.peak_tflops:.1%} of {args.peak_tflops:g} TFLOP/s")
    if not args.skip_sklearn:
        sk_t, sk = per_iteration(lambda m: SkGaussianMixture(max_iter=m, **common), X, args.iters)
        print(f"scikit-learn CPU: {sk_t:.3f} s/iteration, LL {sk.lower_bound_:.10f}; ratio GPU/sklearn {gpu_t / sk_t:.3f}, "
              f"|LL diff| {abs(gpu.lower_bound_ - sk.lower_bound_):.1e}")


if __name__ == "__main__":
    main()
