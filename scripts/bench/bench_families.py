"""Seconds per batch EM iteration of every family at 1M rows (issue 15, item 2).

For each family one Zarr store on disk: ``--n-samples`` rows (default
1,000,000), 16 features, drawn from a K=8 mixture of that family, written
chunk by chunk in chunks of 65,536 rows (float64, uncompressed, so that every
family reads the same bytes). Each estimator starts from fixed initial
parameters (every ``*_init`` given: no initialisation pass) and runs 5 batch
EM iterations with ``tol=0``. The per-iteration seconds are those batch EM
logs (one data pass, E-steps of all chunks, the M-step on the client); the
first iteration also reads the store (and, with ``persist="auto"``, keeps
the chunks in memory), so it is reported apart from the median of the rest.

Families: Bernoulli, Binomial (n_trials=10), Poisson, Categorical (5
categories), Gaussian with full and with diagonal covariances (both on the
same Gaussian store).

Usage:
    python scripts/bench/bench_families.py [--n-samples 1000000] [--chunk-rows 65536]
        [--iters 5] [--workers 0] [--persist auto] [--only bernoulli binomial poisson categorical gaussian-full gaussian-diag]
        [--dir DIR]

``--workers 0`` (default) runs Dask's threads in this process; ``--workers
N`` starts a LocalCluster of N single-threaded workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import zarr
from sklearn.exceptions import ConvergenceWarning

import streamem
from streamem.cluster import local_cluster

K, D = 8, 16
N_TRIALS, N_CATEGORIES = 10, 5
FAMILIES = ("bernoulli", "binomial", "poisson", "categorical", "gaussian-full", "gaussian-diag")
#: The stores (the two Gaussian fits share one); their index seeds the draws.
STORES = ("bernoulli", "binomial", "poisson", "categorical", "gaussian")


# ------------------------------------------------------------------ truths
def truth(family: str) -> dict[str, np.ndarray]:
    """The mixture a store is drawn from (fixed seed per family)."""
    rng = np.random.default_rng(STORES.index(family))
    out = {"weights": rng.dirichlet(np.full(K, 5.0))}
    if family in ("bernoulli", "binomial"):
        out["probs"] = rng.beta(0.7, 0.7, size=(K, D))
    elif family == "poisson":
        out["rates"] = rng.gamma(2.0, 3.0, size=(K, D))
    elif family == "categorical":
        out["probs"] = rng.dirichlet(np.full(N_CATEGORIES, 0.7), size=(K, D))
    else:
        a = rng.normal(size=(K, D, D)) / np.sqrt(D)
        out["means"] = rng.normal(size=(K, D)) * 2.0
        out["chol"] = np.linalg.cholesky(a @ a.transpose(0, 2, 1) + 0.5 * np.eye(D))
    return out


def draw(family: str, t: dict[str, np.ndarray], labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of the given components."""
    n = len(labels)
    if family == "bernoulli":
        return (rng.random((n, D)) < t["probs"][labels]).astype(np.float64)
    if family == "binomial":
        return rng.binomial(N_TRIALS, t["probs"][labels]).astype(np.float64)
    if family == "poisson":
        return rng.poisson(t["rates"][labels]).astype(np.float64)
    if family == "categorical":
        cum = np.cumsum(t["probs"], axis=2)[labels]  # (n, D, C)
        return (rng.random((n, D, 1)) > cum[:, :, :-1]).sum(axis=2).astype(np.float64)
    return t["means"][labels] + np.einsum("nij,nj->ni", t["chol"][labels], rng.standard_normal((n, D)))


def write_store(path: str, family: str, n: int, chunk_rows: int) -> str:
    """The family's store, written chunk by chunk (kept when it exists: ``--dir`` reuses stores)."""
    if os.path.exists(path):
        return path
    t = truth(family)
    arr = zarr.create_array(path, shape=(n, D), chunks=(chunk_rows, D), dtype="float64", compressors=None, zarr_format=3)
    for i, start in enumerate(range(0, n, chunk_rows)):
        rng = np.random.default_rng([STORES.index(family), i])
        rows = min(chunk_rows, n - start)
        arr[start : start + rows] = draw(family, t, rng.choice(K, size=rows, p=t["weights"]), rng)
    return path


# ------------------------------------------------------------------ estimators
def estimator(name: str, **common: Any) -> streamem.MixtureEstimator:
    """The family's estimator from fixed initial parameters: the truth pulled halfway to a flat start."""
    family = name.split("-")[0]
    t = truth(family)
    start = {"weights_init": np.full(K, 1.0 / K), "n_components": K, **common}
    if family == "bernoulli":
        return streamem.BernoulliMixture(probs_init=0.5 * t["probs"] + 0.25, **start)
    if family == "binomial":
        return streamem.BinomialMixture(n_trials=N_TRIALS, probs_init=0.5 * t["probs"] + 0.25, **start)
    if family == "poisson":
        return streamem.PoissonMixture(rates_init=0.5 * t["rates"] + 0.5 * t["rates"].mean(), **start)
    if family == "categorical":
        return streamem.CategoricalMixture(n_categories=N_CATEGORIES, probs_init=0.5 * t["probs"] + 0.5 / N_CATEGORIES, **start)
    covariance_type = name.split("-")[1]
    precisions = np.broadcast_to(np.eye(D), (K, D, D)) if covariance_type == "full" else np.ones((K, D))
    means = t["means"] + np.random.default_rng(99).normal(size=(K, D)) * 0.5
    return streamem.GaussianMixture(covariance_type=covariance_type, means_init=means, precisions_init=precisions, **start)


class IterationSeconds(logging.Handler):
    """Collects the seconds batch EM logs for every iteration (its INFO line's fifth argument)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("iteration") and record.args:
            self.seconds.append(float(record.args[4]))


def time_fit(make: Callable[[], streamem.MixtureEstimator], path: str) -> tuple[list[float], float, streamem.MixtureEstimator]:
    """Per-iteration seconds, wall seconds of the whole fit, and the fitted model."""
    handler = IterationSeconds()
    logger = logging.getLogger("streamem")
    logger.addHandler(handler)
    try:
        model = make()
        tic = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0: a fixed number of iterations
            model.fit(path)
        wall = time.perf_counter() - tic
    finally:
        logger.removeHandler(handler)
    return handler.seconds, wall, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-samples", type=int, default=1_000_000)
    p.add_argument("--chunk-rows", type=int, default=65_536)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="0: Dask's threads in this process; N: a LocalCluster of N workers")
    p.add_argument("--persist", default="auto", choices=["auto", "always", "never"])
    p.add_argument("--only", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--dir", default=None, help="where the stores are kept (default: a temporary directory)")
    args = p.parse_args()
    if args.iters < 2:
        p.error("--iters must be >= 2 (the first iteration is reported apart)")
    print(f"# bench_families, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} {platform.processor()}, "
          f"{os.cpu_count()} cores, streamem {streamem.__version__}\n# {' '.join(sys.argv)}")  # fmt: skip
    print(f"# {args.n_samples:,} rows x {D} features, K={K}, chunks of {args.chunk_rows:,} rows, float64; "
          f"{args.iters} batch EM iterations from fixed parameters, tol=0, persist={args.persist!r}, "
          f"{'threads in this process' if args.workers == 0 else f'LocalCluster of {args.workers} workers'}\n")
    print("| family | estimator | write store s | iteration 1 s | s / iteration (median of 2..) | rows/s | fit wall s | lower bound |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or tmp
        os.makedirs(root, exist_ok=True)
        cluster = local_cluster(n_workers=args.workers) if args.workers else None
        client = None
        if cluster is not None:
            from distributed import Client

            client = Client(cluster)
        try:
            for name in args.only:
                family = name.split("-")[0]
                tic = time.perf_counter()
                path = write_store(os.path.join(root, f"{family}.zarr"), family, args.n_samples, args.chunk_rows)
                written = time.perf_counter() - tic

                def make(name: str = name) -> streamem.MixtureEstimator:
                    return estimator(name, max_iter=args.iters, tol=0.0, verbose=1, verbose_interval=1,
                                     persist=args.persist, client=client)  # fmt: skip

                seconds, wall, model = time_fit(make, path)
                steady = statistics.median(seconds[1:])
                print(f"| {name} | {type(model).__name__} | {written:.1f} | {seconds[0]:.2f} | {steady:.3f} | "
                      f"{args.n_samples / steady:,.0f} | {wall:.1f} | {model.lower_bound_:.4f} |", flush=True)  # fmt: skip
        finally:
            if client is not None:
                client.close()
                cluster.close()


if __name__ == "__main__":
    main()
