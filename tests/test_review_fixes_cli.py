"""Review of issue 13, items 4, 6, 8 and 9: map-reduce shards, missing chunks and checkpoint paths on the command line.

Commands run through :func:`streamem.cli.main` in process (``cli_main``), with
Dask's threads or on the shared cluster (``scheduler_flags``); the checks made
before any work keep ``--workers 1`` without ``--quiet``, so that a cluster
started too early would add its dashboard line. A subprocess only runs the
command as another user. References are scikit-learn on the same values, or
the library run on a complete store holding the same values.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import xarray as xr
import yaml
from numpy.testing import assert_allclose, assert_array_equal

import streamem
from streamem.mapreduce import accumulate, reduce_stats, write_stats
from workflow_helpers import (
    REPO,
    check_ok,
    check_usage_error,
    cli_main,
    inits,
    mixture_sample,
    quiet_fit,
    save_npy_inits,
    sklearn_fit,
    sklearn_from,
    write_zarr,
)

N_ROWS = 2100
CHUNK_ROWS = 300  # 7 chunks
HOLE = slice(900, 1200)  # chunk 3, deleted from the store
LOCAL = ("--workers", 1, "--threads-per-worker", 1)
NO_CLUSTER = ("--workers", 0)


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(N_ROWS, seed=61, spread=0.6)


@pytest.fixture(scope="module")
def X_filled(X) -> np.ndarray:
    """The values a reader that fills missing chunks sees: the hole holds the fill value 0."""
    filled = X.copy()
    filled[HOLE] = 0.0
    return filled


@pytest.fixture(scope="module")
def stores(X, X_filled, tmp_path_factory) -> dict:
    """``holey``: X with chunk 3 deleted; ``filled``: a complete store of X_filled; ``model``: fitted on X_filled."""
    root = tmp_path_factory.mktemp("review-cli")
    holey = write_zarr(root / "holey.zarr", X, CHUNK_ROWS)
    os.remove(os.path.join(holey, "c", "3", "0"))
    filled = _write_every_chunk(root / "filled.zarr", X_filled)
    # random_state: update shuffles its mini-batches by it, so the command and the library shuffle alike.
    model = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=4, random_state=0, **inits("full")), X_filled)
    model.save(root / "model.zarr")
    return {"holey": holey, "filled": filled, "model": str(root / "model.zarr"), "root": root}


def _write_every_chunk(path, X: np.ndarray) -> str:
    """``X`` in Zarr with every chunk written, also those holding only the fill value (Zarr skips them by default)."""
    import zarr

    arr = zarr.create_array(os.fspath(path), shape=X.shape, chunks=(CHUNK_ROWS, X.shape[1]), dtype=X.dtype,
                            zarr_format=3, config={"write_empty_chunks": True})  # fmt: skip
    arr[...] = X
    assert os.path.exists(os.path.join(os.fspath(path), "c", "3", "0"))
    return os.fspath(path)


# ------------------------------------------------ item 4: shards of one variable
def _two_variable_group(path, X: np.ndarray) -> str:
    xr.Dataset({"a": (("t", "f"), X), "b": (("t", "f"), X * 3 + 100)}).to_zarr(path, zarr_format=3, consolidated=False)
    return os.fspath(path)


def test_reduce_refuses_shards_of_different_variables_of_one_group(X, stores, tmp_path):
    group = _two_variable_group(tmp_path / "g.zarr", X)
    old = streamem.load(stores["model"])
    first, second = tmp_path / "s1.zarr", tmp_path / "s2.zarr"
    write_stats(accumulate(old, group, variable="a", rows="0:1000"), first)
    write_stats(accumulate(old, group, variable="b", rows=f"1000:{N_ROWS}"), second)
    with pytest.raises(ValueError, match="different data") as info:
        reduce_stats(old, [first, second])
    assert "'a'" in str(info.value) and "'b'" in str(info.value)
    proc = cli_main("reduce", first, second, "--model", stores["model"], "--out", tmp_path / "new.zarr")
    check_usage_error(proc, "different data", "'a'", "'b'")
    assert not (tmp_path / "new.zarr").exists()


def test_reduce_refuses_shards_read_along_different_sample_dims(tmp_path):
    """A square variable read along either dimension has the same shape: only the sample dimension tells them apart."""
    values = np.random.RandomState(0).standard_normal((8, 8))
    xr.Dataset({"sq": (("p", "q"), values)}).to_zarr(tmp_path / "sq.zarr", zarr_format=3, consolidated=False)
    old = quiet_fit(streamem.GaussianMixture(n_components=1, covariance_type="diag", max_iter=2), values)
    first, second = tmp_path / "s1.zarr", tmp_path / "s2.zarr"
    write_stats(accumulate(old, tmp_path / "sq.zarr", variable="sq", sample_dim="p", rows="0:4"), first)
    write_stats(accumulate(old, tmp_path / "sq.zarr", variable="sq", sample_dim="q", rows="4:8"), second)
    with pytest.raises(ValueError, match="different data") as info:
        reduce_stats(old, [first, second])
    assert "'p'" in str(info.value) and "'q'" in str(info.value)


def test_reduce_accepts_one_variable_with_the_default_sample_dim_spelt_out(X, stores, tmp_path):
    group = _two_variable_group(tmp_path / "g.zarr", X)
    old = streamem.load(stores["model"])
    first, second = tmp_path / "s1.zarr", tmp_path / "s2.zarr"
    ds = accumulate(old, group, variable="a", rows="0:1000")
    assert (ds.attrs["data_variable"], ds.attrs["data_sample_dim"]) == ("a", "t")
    write_stats(ds, first)
    write_stats(accumulate(old, group, variable="a", sample_dim="t", rows=f"1000:{N_ROWS}"), second)
    new = reduce_stats(old, [first, second])
    ref = sklearn_fit(X, n_components=3, weights_init=old.weights_, means_init=old.means_,
                      precisions_init=old.precisions_, max_iter=1, tol=0)  # fmt: skip
    assert_allclose(new.means_, ref.means_, rtol=1e-10)
    assert_allclose(new.covariances_, ref.covariances_, rtol=1e-10)
    assert_allclose(new.lower_bound_, ref.lower_bound_, rtol=1e-10)


# ------------------------------------------- item 6: fit_predict and missing chunks
def test_fit_predict_reads_missing_chunks_as_fit_did(X_filled, stores):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    model = streamem.GaussianMixture(n_components=3, tol=0, max_iter=3, **inits("full"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = model.fit_predict(stores["holey"], missing_chunks="fill")
    ref = sklearn_fit(X_filled, n_components=3, tol=0, max_iter=3, **inits("full"))
    assert_allclose(model.means_, ref.means_, rtol=1e-8)
    # Lazy labels read the store when computed: with the fit's missing_chunks, not the default.
    assert_array_equal(labels.compute(), sklearn_from(model).predict(X_filled))


# ------------------------------------------------ item 8: --missing-chunks
def test_without_missing_chunks_the_error_names_the_flag(stores, scheduler_flags):
    # On a cluster: the error is raised on a worker and reaches the command through distributed.
    proc = cli_main("score", stores["model"], stores["holey"], *scheduler_flags, "--quiet")
    check_usage_error(proc, "c/3/0", "--missing-chunks fill")


def test_score_and_predict_take_missing_chunks(X_filled, stores, tmp_path, scheduler_flags):
    sk = sklearn_from(streamem.load(stores["model"]))
    proc = check_ok(cli_main("score", stores["model"], stores["holey"], "--missing-chunks", "fill", *scheduler_flags, "--quiet"))
    values = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert_allclose(float(values["mean log-likelihood"]), sk.score(X_filled), rtol=1e-10)
    out = tmp_path / "pred.zarr"
    check_ok(cli_main("predict", stores["model"], stores["holey"], "--out", out, "--score", "--missing-chunks", "fill", *NO_CLUSTER, "--quiet"))
    ds = xr.open_zarr(out, consolidated=False)
    assert_array_equal(ds["labels"].values, sk.predict(X_filled))
    assert_allclose(ds["log_likelihood"].values, sk.score_samples(X_filled), rtol=1e-10)


def test_fit_takes_missing_chunks_as_flag_and_yaml_key(X_filled, stores, tmp_path):
    npy = save_npy_inits(tmp_path, "full")
    ref = sklearn_fit(X_filled, n_components=3, tol=0, max_iter=3, **inits("full"))
    flags = [f for name, path in npy.items() for f in ("--" + name.replace("_", "-"), path)]
    out = tmp_path / "flag.zarr"
    check_ok(cli_main("fit", stores["holey"], "--out", out, "--n-components", 3, "--tol", 0, "--max-iter", 3, *flags,
                 "--missing-chunks", "fill", *NO_CLUSTER, "--quiet"))  # fmt: skip
    assert_allclose(streamem.load(out).means_, ref.means_, rtol=1e-8)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"n_components": 3, "tol": 0, "max_iter": 3, "missing_chunks": "fill", "workers": 0, **npy}))
    out = tmp_path / "yaml.zarr"
    check_ok(cli_main("fit", "--config", cfg, stores["holey"], "--out", out, "--quiet"))
    assert_allclose(streamem.load(out).means_, ref.means_, rtol=1e-8)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"missing_chunks": "zero"}))
    check_usage_error(cli_main("fit", "--config", bad, stores["holey"], "--out", tmp_path / "x.zarr"), "missing_chunks", "zero")


def test_update_accumulate_and_plot_take_missing_chunks(stores, tmp_path):
    import matplotlib.image

    # References: the same commands on a complete store holding the filled values.
    ref_model = streamem.load(stores["model"])
    quiet_update = streamem.load(stores["model"])
    quiet_update.update(stores["filled"])
    out = tmp_path / "updated.zarr"
    check_ok(cli_main("update", stores["model"], stores["holey"], "--out", out, "--missing-chunks", "fill", *NO_CLUSTER, "--quiet"))
    updated = streamem.load(out)
    assert_allclose(updated.means_, quiet_update.means_, rtol=1e-10)
    assert updated.n_rows_seen_ == quiet_update.n_rows_seen_

    out = tmp_path / "s.zarr"
    check_ok(cli_main("accumulate", stores["model"], stores["holey"], "--rows", "600:1500", "--out", out,
                 "--missing-chunks", "fill", *NO_CLUSTER, "--quiet"))  # fmt: skip
    expected = accumulate(ref_model, stores["filled"], rows="600:1500")
    got = xr.open_zarr(out, consolidated=False)
    for name in expected.data_vars:
        assert_allclose(got[name].values, expected[name].values, rtol=1e-12, err_msg=name)

    pictures = {}
    for name in ("holey", "filled"):
        pictures[name] = tmp_path / f"{name}.png"
        extra = ("--missing-chunks", "fill") if name == "holey" else ()
        check_ok(cli_main("plot", stores["model"], "--out", pictures[name], "--data", stores[name], "--n-points", 500, *extra, "--quiet"))
    assert_array_equal(matplotlib.image.imread(pictures["holey"]), matplotlib.image.imread(pictures["filled"]))


# ------------------------------------------------ item 9: checkpoint and --out paths
def _run(command: str, stores: dict, *extra) -> subprocess.CompletedProcess:
    """``fit`` or ``update`` on the complete store, with ``extra`` arguments; not --quiet (a started cluster prints a line)."""
    if command == "fit":
        return cli_main("fit", stores["filled"], "--n-components", 3, "--max-iter", 10, "--tol", 0, *LOCAL, *extra)
    return cli_main("update", stores["model"], stores["filled"], *LOCAL, *extra)


@pytest.mark.parametrize("command", ["fit", "update"])
def test_checkpoint_under_a_file_is_refused_before_any_work(command, stores, tmp_path):
    (tmp_path / "plain").write_text("a file")
    ck = tmp_path / "plain" / "ck"
    proc = _run(command, stores, "--out", tmp_path / "out.zarr", "--checkpoint", ck)
    check_usage_error(proc, "--checkpoint", os.fspath(tmp_path / "plain"))
    assert sorted(os.listdir(tmp_path)) == ["plain"]


@pytest.mark.parametrize("command", ["fit", "update"])
def test_out_and_checkpoint_in_one_place_are_refused_before_any_work(command, stores, tmp_path):
    out = tmp_path / "ck"
    proc = _run(command, stores, "--out", out, "--checkpoint", os.fspath(out) + os.sep + ".", "--overwrite")
    check_usage_error(proc, "--out", "--checkpoint", os.fspath(out))
    # A checkpoint inside --out (or the other way round) would be removed with it, or make it foreign.
    proc = _run(command, stores, "--out", out, "--checkpoint", out / "inner")
    check_usage_error(proc, "--out", "--checkpoint")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["fit", "update", "predict", "accumulate"])
def test_out_or_checkpoint_at_the_data_is_refused_even_with_overwrite(command, stores, tmp_path):
    link = tmp_path / "data-link.zarr"
    os.symlink(stores["filled"], link)
    before = sorted(os.listdir(stores["filled"]))
    if command in ("fit", "update"):
        proc = _run(command, stores, "--out", link, "--overwrite")
        check_usage_error(proc, "--out", "data")
        proc = _run(command, stores, "--out", tmp_path / "out.zarr", "--checkpoint", link)
        check_usage_error(proc, "--checkpoint", "data")
    else:
        proc = cli_main(command, stores["model"], link, "--out", link, "--overwrite", *LOCAL)
        check_usage_error(proc, "--out", "data")
    assert sorted(os.listdir(stores["filled"])) == before
    assert streamem.load_data(stores["filled"]).n_samples == N_ROWS


def _as_other_user() -> list[str] | None:
    """A command prefix that runs without root (whose writes no permission bit stops), or None when there is none."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return None if setpriv is None else [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_read_only_checkpoint_is_refused_before_any_work(X_filled):
    prefix = _as_other_user()
    if prefix is None:
        pytest.skip("running as root without setpriv: no way to meet a directory we may not write")
    # Under /tmp itself: pytest's tmp_path is private to its user.
    root = tempfile.mkdtemp(prefix="streamem-ro-")
    try:
        data = _write_every_chunk(os.path.join(root, "data.zarr"), X_filled)
        ck = os.path.join(root, "ck")
        quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=2, **inits("full")), data, checkpoint=ck)
        states = sorted(os.listdir(ck))
        writable = os.path.join(root, "w")
        os.mkdir(writable)
        os.chmod(writable, 0o777)
        for path in (root, ck):
            os.chmod(path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        if not prefix:
            os.chmod(root, 0o555)
            os.chmod(ck, 0o555)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
        env["HOME"] = writable

        def run(*args) -> subprocess.CompletedProcess:
            cmd = [*prefix, sys.executable, "-m", "streamem.cli", "fit", data, "--n-components", "3", "--max-iter", "6",
                   "--tol", "0", "--workers", "1", *map(str, args)]  # fmt: skip
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)

        proc = run("--out", os.path.join(writable, "a.zarr"), "--checkpoint", ck, "--resume")
        check_usage_error(proc, "--checkpoint", ck, "not writable")
        assert sorted(os.listdir(ck)) == states
        proc = run("--out", os.path.join(writable, "b.zarr"), "--checkpoint", os.path.join(root, "new-ck"))
        check_usage_error(proc, "--checkpoint", os.path.join(root, "new-ck"))
        assert sorted(os.listdir(writable)) == []
    finally:
        os.chmod(root, 0o700)
        shutil.rmtree(root, ignore_errors=True)


def test_an_os_error_is_one_line_naming_the_path(stores, tmp_path):
    (tmp_path / "picture.png").mkdir()  # a directory where the picture should go
    proc = cli_main("plot", stores["model"], "--out", tmp_path / "picture.png", "--quiet")
    check_usage_error(proc, os.fspath(tmp_path / "picture.png"))


def test_a_checkpoint_may_hold_the_data_but_not_sit_inside_it(tmp_path):
    """As in the library, a checkpoint directory leaves entries not its own alone; nothing else may nest."""
    from streamem.cli import UsageError, check_distinct

    ck, out = tmp_path / "ck", tmp_path / "model.zarr"
    check_distinct(("--out", out), ("--checkpoint", ck), ("data", ck / "data.zarr"), may_hold=["--checkpoint"])
    check_distinct(("--out", ck / "model.zarr"), ("--checkpoint", ck), ("data", tmp_path / "d.zarr"), may_hold=["--checkpoint"])
    with pytest.raises(UsageError, match="--checkpoint: .* is inside the data"):
        check_distinct(("--out", out), ("--checkpoint", tmp_path / "d.zarr" / "ck"), ("data", tmp_path / "d.zarr"), may_hold=["--checkpoint"])
    with pytest.raises(UsageError, match="--out: .* holds the data"):
        check_distinct(("--out", tmp_path), ("data", tmp_path / "d.zarr"))
    # URLs are not local paths: never "the same" as one.
    check_distinct(("--out", tmp_path / "s3:" / "bucket"), ("data", "s3://bucket"))


def test_resume_without_checkpoint_is_refused_before_any_work(stores, tmp_path):
    proc = _run("fit", stores, "--out", tmp_path / "out.zarr", "--resume")
    check_usage_error(proc, "--resume", "--checkpoint")


def test_reduce_out_at_a_shard_is_refused_even_with_overwrite(stores, tmp_path):
    old = streamem.load(stores["model"])
    shard = tmp_path / "s.zarr"
    write_stats(accumulate(old, stores["filled"]), shard)
    before = sorted(os.listdir(shard))
    proc = cli_main("reduce", shard, "--model", stores["model"], "--out", os.fspath(shard) + os.sep, "--overwrite")
    check_usage_error(proc, "--out", "statistics store")
    assert sorted(os.listdir(shard)) == before
    # --out replacing --model is an iteration in place: allowed.
    model = tmp_path / "model.zarr"
    shutil.copytree(stores["model"], model)
    check_ok(cli_main("reduce", shard, "--model", model, "--out", model, "--overwrite", "--quiet"))
    assert streamem.load(model).n_iter_ == old.n_iter_ + 1
