"""`make demo`: generate a mixture data set as a Zarr store, fit it out of core, report.

Usage: python scripts/demo.py [--n-samples N] [--path data/demo.zarr] [--model data/demo-model.zarr]

The fitted model is saved (replacing an older one) for the commands the demo
prints at the end: ``streamem info``, ``streamem plot``, ``streamem predict``.
"""

from __future__ import annotations

import argparse
import os

# Worker processes log a heartbeat error when the cluster shuts down; the
# demo's output is clearer without it (real errors still reach the client).
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
import time
import warnings

import numpy as np
from distributed import Client

import streamem
from streamem.cluster import local_cluster
from streamem.generate import generate
from streamem.monitor import PeakMemory, tree_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-samples", type=int, default=8_388_608, help="rows (16 float64 features: 8,388,608 rows = 1 GiB)")
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--path", default="data/demo.zarr", help="the data store (reused when it has the asked shape)")
    parser.add_argument("--model", default="data/demo-model.zarr", help="where the fitted model is saved (replaced)")
    parser.add_argument("--max-iter", type=int, default=100)
    args = parser.parse_args()

    nbytes = args.n_samples * args.n_features * 8
    existing = streamem.load_data(args.path).array.shape if os.path.exists(args.path) else None
    if existing != (args.n_samples, args.n_features):
        print(f"generating {args.n_samples:,} x {args.n_features} float64 ({nbytes / 2**30:.2f} GiB) -> {args.path}")
        tic = time.perf_counter()
        generate(args.path, args.n_samples, args.n_features, args.n_components, seed=0, overwrite=True)
        print(f"  written in {time.perf_counter() - tic:.1f} s")
    else:
        print(f"using existing {args.path} ({nbytes / 2**30:.2f} GiB)")

    with local_cluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as client:
        print(f"LocalCluster: 2 workers on 127.0.0.1, dashboard {client.dashboard_link}")
        # persist="never": stream every chunk from disk in every iteration, as
        # for data larger than memory (the default, "auto", would keep 1 GiB
        # in the workers' memory since it fits there).
        gm = streamem.GaussianMixture(
            n_components=args.n_components, covariance_type="full", max_iter=args.max_iter,
            random_state=0, verbose=1, verbose_interval=1, persist="never",
        )
        baseline = tree_rss()
        with PeakMemory() as mem, warnings.catch_warnings():
            warnings.simplefilter("default")
            tic = time.perf_counter()
            gm.fit(args.path)
            wall = time.perf_counter() - tic

    np.set_printoptions(precision=3, suppress=True, linewidth=120)
    print(f"\nconverged: {gm.converged_} after {gm.n_iter_} iterations ({gm.n_data_passes_} data passes)")
    print(f"final mean log-likelihood per sample: {gm.lower_bound_:.6f}")
    print("weights:", gm.weights_)
    print("means (first 4 features):")
    print(gm.means_[:, :4])
    print(f"wall time: {wall:.1f} s for {gm.n_data_passes_} passes over the data ({wall / gm.n_data_passes_:.2f} s per pass)")
    print(f"memory of client + scheduler + 2 workers: {baseline / 2**20:,.0f} MiB idle, {mem.peak / 2**20:,.0f} MiB at the peak "
          f"of the fit: the fit added {(mem.peak - baseline) / 2**20:,.0f} MiB for {nbytes / 2**20:,.0f} MiB of data")
    gm.save(args.model, overwrite=True)
    print(f"\nsaved the model to {args.model}. Next, with the installed command (or `source .venv/bin/activate` first):")
    for command in (f"info {args.model}", f"plot {args.model} --data {args.path} --out demo.png",
                    f"predict {args.model} {args.path} --out data/demo-labels.zarr --proba"):
        print(f"  .venv/bin/streamem {command}")


if __name__ == "__main__":
    main()
