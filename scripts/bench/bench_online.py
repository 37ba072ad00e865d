"""Online EM (stepwise, incremental) against batch EM and scikit-learn: passes and seconds to the batch optimum.

Three Zarr stores on disk, each a K=8, 16-feature Gaussian mixture (full
covariances): "separated" (4M rows, means far apart), "overlapping" (4M rows,
means close), "few-chunks" (400k rows in 4 chunks: few mini-batches per
chunk task, which makes it harder). Every method starts from the same
parameters: K rows drawn at random as means, identity covariances, equal
weights (``--init kmeans`` repeats with the default k-means initialisation).

For each method and setting the table gives, pass by pass, the mean
log-likelihood of all rows under the parameters after that pass (computed by
an extra scoring pass that is not timed), and from that the passes and wall
seconds until it is within 1e-3 and within 1e-4 nats/sample of the batch EM
optimum (batch EM from the same start, tol=1e-8). Batch EM's k-th pass gives
the parameters of iteration k. scikit-learn runs in memory, iteration by
iteration (warm_start=True, max_iter=1), timed per iteration.

The update path (what a nightly job does): fit the first store, then
``streamem update`` with 400k new rows of the same distribution, against a
batch re-fit on all rows warm-started from the old model; and with new rows
from a shifted distribution and a constant ``--step-size``, how far the
model moves toward them.

Usage:
    python scripts/bench/bench_online.py [--n-samples 4000000] [--small-samples 400000]
        [--batch-sizes 500 1000 2000 5000] [--step-decays 0.51 0.6 0.7 0.9] [--averages on off]
        [--no-incremental] [--passes 3] [--workers 2] [--only separated overlapping few-chunks update]
        [--init random kmeans] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import zarr
from distributed import Client
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import streamem
from streamem.cluster import local_cluster

K, D = 8, 16


def mixture(separation: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(K, D, D)) / np.sqrt(D)
    return {
        "weights": rng.dirichlet(np.full(K, 5.0)),
        "means": rng.normal(size=(K, D)) * separation,
        "covariances": a @ a.transpose(0, 2, 1) + 0.5 * np.eye(D),
    }


def write_store(path: str, truth: dict, n: int, chunk_rows: int, seed: int, shift: float = 0.0) -> str:
    if os.path.exists(path):
        return path
    arr = zarr.create_array(path, shape=(n, D), chunks=(chunk_rows, D), dtype="float64", compressors=None, zarr_format=3)
    chol = np.linalg.cholesky(truth["covariances"])
    for i, start in enumerate(range(0, n, chunk_rows)):
        rng = np.random.default_rng([seed, i])
        rows = min(chunk_rows, n - start)
        labels = rng.choice(K, size=rows, p=truth["weights"])
        z = rng.standard_normal((rows, D))
        arr[start : start + rows] = truth["means"][labels] + shift + np.einsum("nij,nj->ni", chol[labels], z)
    return path


def random_start(path: str, seed: int = 0) -> dict:
    """K rows drawn at random as means, identity covariances, equal weights."""
    arr = zarr.open_array(path, mode="r")
    rows = np.sort(np.random.default_rng(seed).choice(arr.shape[0], K, replace=False))
    return dict(weights_init=np.full(K, 1.0 / K), means_init=np.stack([arr[int(r)] for r in rows]), precisions_init=np.repeat(np.eye(D)[None], K, 0))


def within(bounds: list[float], seconds: list[float], optimum: float, eps: float) -> str:
    for k, (b, s) in enumerate(zip(bounds, seconds), 1):
        if optimum - b <= eps:
            return f"{k} / {s:7.1f}"
    return "  > / -"


def run_online(path: str, start: dict, client, passes: int, **params) -> tuple[list[float], list[float]]:
    """Mean log-likelihood of all rows after each pass, and cumulative seconds of the online passes."""
    model = streamem.GaussianMixture(K, client=client, max_iter=1, tol=0.0, random_state=0, warm_start=True, **start, **params)
    bounds, seconds, total = [], [], 0.0
    for _ in range(passes):
        tic = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(path)
        total += time.perf_counter() - tic
        seconds.append(total)
        bounds.append(model.score(path))
    return bounds, seconds


def run_batch(path: str, start: dict, client, max_iter: int = 300) -> tuple[list[float], list[float], float]:
    """Batch EM: bounds after each iteration's M-step (from the next pass) and seconds per iteration."""
    model = streamem.GaussianMixture(K, client=client, tol=1e-8, max_iter=max_iter, random_state=0, verbose=0, **start)
    tic = time.perf_counter()
    model.fit(path)
    seconds = time.perf_counter() - tic
    final = model.score(path)
    # lower_bounds_[k] is the log-likelihood of the parameters after k M-steps.
    bounds = list(model.lower_bounds_[1:]) + [final]
    per_pass = seconds / max(model.n_data_passes_, 1)
    return bounds, [per_pass * (k + 1) for k in range(len(bounds))], max(final, max(bounds))


def run_sklearn(path: str, start: dict, iters: int) -> tuple[list[float], list[float]]:
    X = zarr.open_array(path, mode="r")[...]
    sk = SkGaussianMixture(K, warm_start=True, max_iter=1, tol=0.0, random_state=0, **start)
    bounds, seconds, total = [], [], 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(iters):
            tic = time.perf_counter()
            sk.fit(X)
            total += time.perf_counter() - tic
            seconds.append(total)
            bounds.append(float(sk.score(X)))
    return bounds, seconds


def table_for(name: str, path: str, args, client) -> None:
    for init in args.init:
        start = random_start(path) if init == "random" else {}
        if init == "kmeans":
            # The default k-means start, computed once, given to every method.
            km = streamem.GaussianMixture(K, client=client, max_iter=0, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                km.fit(path)
            start = dict(weights_init=km.weights_, means_init=km.means_, precisions_init=km.precisions_)
        cache = os.path.join(args.dir, f"batch-{name}-{init}.json") if args.dir else None
        known = args.optimum.get(f"{name}:{init}", args.optimum.get(name))
        if known is not None:  # measured by an earlier run on the same store: only the optimum is needed
            b_bounds, b_secs, optimum = [], [], known
        elif cache and os.path.exists(cache):  # batch EM to tol=1e-8 can take hundreds of passes: reuse it
            with open(cache) as fh:
                b_bounds, b_secs, optimum = json.load(fh)
        else:
            b_bounds, b_secs, optimum = run_batch(path, start, client)
            if cache:
                with open(cache, "w") as fh:
                    json.dump([b_bounds, b_secs, optimum], fh)
        print(f"\n### {name} ({zarr.open_array(path).shape[0]:,} rows, chunks of {zarr.open_array(path).chunks[0]:,}), start: {init}")
        print(f"batch EM optimum (mean log-likelihood): {optimum:.6f}\n")
        print("| method | batch_size | step_decay | average | after pass 1, 2, 3 (optimum - value) | passes / s to 1e-3 | passes / s to 1e-4 |")
        print("|---|---|---|---|---|---|---|")

        def row(method, bs, decay, average, bounds, secs):
            gaps = ", ".join(f"{optimum - b:.1e}" for b in bounds[: args.passes])
            print(f"| {method} | {bs} | {decay} | {average} | {gaps} | {within(bounds, secs, optimum, 1e-3)} | {within(bounds, secs, optimum, 1e-4)} |", flush=True)

        if b_bounds:
            row("batch", "-", "-", "-", b_bounds, b_secs)
        sk_b, sk_s = run_sklearn(path, start, min(len(b_bounds) + 1, args.sklearn_iters)) if args.sklearn and b_bounds else ([], [])
        if sk_b:
            row("scikit-learn (in memory)", "-", "-", "-", sk_b, sk_s)
        for bs in args.batch_sizes:
            for decay in args.step_decays:
                for average in args.averages:
                    bounds, secs = run_online(path, start, client, args.passes, algorithm="stepwise", batch_size=bs,
                                              step_decay=decay, average=average == "on")
                    row("stepwise", bs, decay, average, bounds, secs)
            if args.incremental:
                bounds, secs = run_online(path, start, client, args.passes, algorithm="incremental", batch_size=bs)
                row("incremental", bs, "-", "-", bounds, secs)


def update_table(args, client, root: str) -> None:
    truth = mixture(3.0, 11)
    base = write_store(os.path.join(root, "update-base.zarr"), truth, args.n_samples, 65_536, 1)
    new = write_store(os.path.join(root, "update-new.zarr"), truth, args.small_samples, 65_536, 2)
    both = os.path.join(root, "update-all.zarr")
    if not os.path.exists(both):
        arr = zarr.create_array(both, shape=(args.n_samples + args.small_samples, D), chunks=(65_536, D), dtype="float64", compressors=None)
        for src, off in ((base, 0), (new, args.n_samples)):
            z = zarr.open_array(src, mode="r")
            for s in range(0, z.shape[0], 65_536):
                arr[off + s : off + min(s + 65_536, z.shape[0])] = z[s : s + 65_536]
    model_path = os.path.join(root, "update-model.zarr")
    if not os.path.exists(model_path):
        m = streamem.GaussianMixture(K, client=client, algorithm="stepwise", max_iter=2, random_state=0).fit(base)
        m.client = None
        m.save(model_path)
    old = streamem.load(model_path)

    def command(*argv: str) -> float:
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-m", "streamem.cli", *argv, "--overwrite", "--quiet"], check=True)
        return time.perf_counter() - tic

    print(f"\n### update: {args.small_samples:,} new rows after {args.n_samples:,} (same distribution)")
    print("| what | workers | wall s (whole command) | mean log-likelihood on all rows |")
    print("|---|---|---|---|")
    print(f"| old model | | - | {old.score(both):.6f} |")
    times = {}
    for workers in (str(args.workers), "0"):
        updated_path, refit_path = os.path.join(root, "updated.zarr"), os.path.join(root, "refit.zarr")
        t_update = command("update", model_path, new, "--out", updated_path, "--workers", workers)
        t_refit = command("fit", both, "--out", refit_path, "--init-from", model_path, "--n-components", str(K), "--workers", workers)
        ll_up, ll_re = streamem.load(updated_path).score(both), streamem.load(refit_path).score(both)
        times[workers] = (t_update, t_refit)
        print(f"| streamem update (new rows only) | {workers} | {t_update:.1f} | {ll_up:.6f} |")
        print(f"| batch re-fit on all rows, from the old model | {workers} | {t_refit:.1f} | {ll_re:.6f} |", flush=True)
    scratch_path = os.path.join(root, "refit-scratch.zarr")
    t_scratch = command("fit", both, "--out", scratch_path, "--n-components", str(K), "--random-state", "0", "--workers", str(args.workers))
    print(f"| batch re-fit on all rows, from k-means | {args.workers} | {t_scratch:.1f} | {streamem.load(scratch_path).score(both):.6f} |")
    # In-process (no interpreter or cluster start): the work itself.
    tic = time.perf_counter()
    in_process = streamem.load(model_path).update(new)
    t_up_work = time.perf_counter() - tic
    tic = time.perf_counter()
    streamem.GaussianMixture(K, weights_init=old.weights_, means_init=old.means_, precisions_init=old.precisions_).fit(both)
    t_re_work = time.perf_counter() - tic
    print(f"| in this process (threads): update / warm re-fit | | {t_up_work:.2f} / {t_re_work:.2f} | {in_process.score(both):.6f} |")
    for workers, (t_update, t_refit) in times.items():
        print(f"update / warm re-fit, whole commands, --workers {workers}: {t_update / t_refit:.2f}")
    print(f"update / re-fit from k-means (--workers {args.workers}): {times[str(args.workers)][0] / t_scratch:.2f}; "
          f"in process, update / warm re-fit: {t_up_work / t_re_work:.2f}")

    shifted = write_store(os.path.join(root, "update-shifted.zarr"), truth, args.small_samples, 65_536, 3, shift=1.0)
    print(f"\n### update toward {args.small_samples:,} rows shifted by +1 in every feature")
    print("| --step-size | mean log-lik on shifted rows | on old rows | mean shift of the means |")
    print("|---|---|---|---|")
    for step in [None, 0.001, 0.01, 0.05]:
        out = os.path.join(root, "updated-shift.zarr")
        extra = [] if step is None else ["--step-size", str(step)]
        subprocess.run([sys.executable, "-m", "streamem.cli", "update", model_path, shifted, "--out", out, "--overwrite", "--quiet",
                        "--workers", str(args.workers), *extra], check=True)
        up = streamem.load(out)
        move = float(np.mean(up.means_ - old.means_))
        print(f"| {step if step is not None else 'none (running average)'} | {up.score(shifted):.4f} | {up.score(base):.4f} | {move:+.3f} |")
    print(f"(old model: {old.score(shifted):.4f} on shifted rows, {old.score(base):.4f} on old rows)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-samples", type=int, default=4_000_000)
    p.add_argument("--small-samples", type=int, default=400_000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    p.add_argument("--step-decays", type=float, nargs="+", default=[0.51, 0.6, 0.7, 0.9])
    p.add_argument("--averages", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="stepwise with and without averaging over each pass's second half")
    p.add_argument("--no-incremental", dest="incremental", action="store_false")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--init", nargs="+", default=["random"], choices=["random", "kmeans"])
    p.add_argument("--only", nargs="+", default=["separated", "overlapping", "few-chunks", "update"])
    p.add_argument("--no-sklearn", dest="sklearn", action="store_false")
    p.add_argument("--sklearn-iters", type=int, default=40, help="scikit-learn iterations at most")
    p.add_argument("--optimum", nargs="+", default=[], metavar="NAME[:INIT]=VALUE",
                   help="batch EM optimum of a data set (from one start) from an earlier run (its batch row is then not repeated)")
    p.add_argument("--dir", default=None, help="where the stores are kept (default: a temporary directory)")
    args = p.parse_args()
    args.optimum = {k: float(v) for k, v in (item.split("=") for item in args.optimum)}
    print(f"# bench_online, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
          f"streamem {streamem.__version__}\n# {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or tmp
        os.makedirs(root, exist_ok=True)
        with local_cluster(n_workers=args.workers) as cluster, Client(cluster) as client:
            stores = {
                "separated": lambda: write_store(os.path.join(root, "separated.zarr"), mixture(3.0, 1), args.n_samples, 65_536, 10),
                "overlapping": lambda: write_store(os.path.join(root, "overlapping.zarr"), mixture(0.7, 2), args.n_samples, 65_536, 20),
                "few-chunks": lambda: write_store(os.path.join(root, "few-chunks.zarr"), mixture(1.5, 3), args.small_samples, args.small_samples // 4, 30),
            }
            for name in ("separated", "overlapping", "few-chunks"):
                if name in args.only:
                    table_for(name, stores[name](), args, client)
            if "update" in args.only:
                update_table(args, client, root)


if __name__ == "__main__":
    main()
