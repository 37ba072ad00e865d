"""The ``streamem`` command line (issue 4, items 2, 3, 5, 7 and 8).

Commands run through :func:`streamem.cli.main` in process (``cli_main``: no
interpreter start per command) without a cluster (``--workers 0``), except
where the process is the point (the nightly script runs the real command);
the checks made before any work keep ``--workers 1``, so that a cluster
started too early would print its dashboard line. Results are compared with
the library run in process, with scikit-learn, or with closed forms.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
import zarr
from numpy.testing import assert_allclose, assert_array_equal

import streamem
from streamem.matching import match_components
from workflow_helpers import (
    COVARIANCE_TYPES,
    REPO,
    assert_same_params,
    check_ok,
    check_usage_error,
    cli_main,
    inits,
    mixture_sample,
    nightly_bin,
    quiet_fit,
    save_npy_inits,
    sklearn_fit,
    sklearn_from,
    write_zarr,
)

N_ROWS = 4500
CHUNK_ROWS = 700  # 6 chunks of 700 and one of 300
LOCAL = ("--workers", 1, "--threads-per-worker", 1)
NO_CLUSTER = ("--workers", 0)


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(N_ROWS, seed=51, spread=0.6)


@pytest.fixture(scope="module")
def data_path(X, tmp_path_factory) -> str:
    return write_zarr(tmp_path_factory.mktemp("cli-data") / "data.zarr", X, CHUNK_ROWS)


@pytest.fixture(scope="module")
def model_path(X, tmp_path_factory) -> str:
    """A full-covariance model fitted in process and saved."""
    model = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=8, **inits("full")), X)
    path = tmp_path_factory.mktemp("cli-model") / "model.zarr"
    model.save(path)
    return str(path)


# ------------------------------------------------------------------------ fit
def test_fit_flags_give_the_library_model(data_path, tmp_path):
    settings = dict(
        n_components=3, covariance_type="tied", tol=0.0, max_iter=6, reg_covar=1e-3, n_init=2,
        init_params="k-means++", random_state=7, init_sample_size=2000,
    )  # fmt: skip
    flags = []
    for name, value in settings.items():
        flags += ["--" + name.replace("_", "-"), value]
    out = tmp_path / "model.zarr"
    check_ok(cli_main("fit", data_path, "--out", out, *flags, *NO_CLUSTER, "--quiet"))

    reference = quiet_fit(streamem.GaussianMixture(**settings), data_path)
    model = streamem.load(out)
    assert_same_params(model, reference, 1e-10)
    for name, value in settings.items():
        assert model.get_params()[name] == value, name
    assert model.fit_data_["source"] == data_path

    info = check_ok(cli_main("info", out)).stdout
    assert "3 components" in info and "'tied'" in info
    assert f"iterations: {reference.n_iter_}" in info and "converged: False" in info
    assert f"{reference.lower_bound_:.10g}" in info
    assert data_path in info


def test_fit_config_file_and_flags_override_it(X, data_path, tmp_path):
    npy = save_npy_inits(tmp_path, "full")
    config = {
        "n_components": 3,
        "covariance_type": "full",
        "tol": 0,  # an int where a float is expected is fine
        "max_iter": 2,
        **npy,
        "workers": 0,
    }
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "model.zarr"
    proc = check_ok(cli_main("fit", "--config", cfg, data_path, "--out", out, "--max-iter", 5, "--quiet"))
    assert proc.stderr == "", f"--quiet printed on stderr:\n{proc.stderr}"

    model = streamem.load(out)
    assert model.n_iter_ == 5 and len(model.lower_bounds_) == 5
    assert model.tol == 0 and model.max_iter == 5
    ref = sklearn_fit(X, n_components=3, covariance_type="full", tol=0, max_iter=5, **inits("full"))
    assert_same_params(model, ref, 1e-8)


@pytest.mark.parametrize(
    "text, key",
    [
        ("n_components: 3\nn_component: 3\n", "n_component"),
        ('n_components: "three"\n', "n_components"),
    ],
    ids=["unknown-key", "wrong-type"],
)
def test_bad_config_exits_2_with_one_line(data_path, tmp_path, text, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    proc = cli_main("fit", "--config", cfg, data_path, "--out", tmp_path / "m.zarr")
    line = check_usage_error(proc, repr(key))
    assert "config" in line
    assert not (tmp_path / "m.zarr").exists()


def test_missing_argument_exits_2(data_path):
    proc = cli_main("fit", data_path, "--n-components", 3)  # no --out
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--out" in proc.stderr


def test_missing_data_path_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "no-such-data.zarr"
    proc = cli_main("fit", missing, "--out", tmp_path / "m.zarr", "--n-components", 3)
    check_usage_error(proc, "no-such-data.zarr")


def test_unreachable_scheduler_is_named(data_path, tmp_path):
    proc = cli_main("fit", data_path, "--out", tmp_path / "m.zarr", "--n-components", 3, "--scheduler", "tcp://127.0.0.1:9", "--scheduler-timeout", 2)
    assert proc.returncode != 0
    assert "127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.zarr").exists()


# -------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["local.yaml", "slurm.yaml", "pbs.yaml"])
def test_shipped_configs_are_valid(name):
    from streamem.cli import CLUSTER_OPTIONS, FIT_OPTIONS, load_config

    path = os.path.join(REPO, "configs", name)
    config = load_config(path)
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    assert config == raw and config  # nothing dropped or invented
    known = {o.name for o in FIT_OPTIONS + CLUSTER_OPTIONS} | {"cluster"}
    assert set(config) <= known
    if name != "local.yaml":
        assert config["cluster"]["kind"] == name.split(".")[0]


def test_slurm_config_renders_a_job_script():
    from dask.utils import parse_bytes

    from streamem.cli import jobqueue_cluster, load_config

    path = os.path.join(REPO, "configs", "slurm.yaml")
    section = dict(load_config(path)["cluster"])
    expected = dict(section)
    section.update(interface="lo", jobs=0)  # loopback, and no job submitted
    section.pop("log_directory", None)
    cluster = jobqueue_cluster(section)
    try:
        script = cluster.job_script()
        assert type(cluster).__name__ == "SLURMCluster"
        assert len(cluster.workers) == 0
    finally:
        cluster.close()
    gib = math.ceil(parse_bytes(expected["memory"]) / 2**30)
    assert f"#SBATCH --mem={gib}G" in script
    assert f"#SBATCH --cpus-per-task={expected['cores']}" in script
    assert f"#SBATCH -p {expected['queue']}" in script
    assert f"#SBATCH -A {expected['account']}" in script
    assert f"#SBATCH -t {expected['walltime']}" in script


# -------------------------------------------------------------------- predict
def test_predict_writes_labels_proba_and_loglik_with_the_input_chunks(X, data_path, model_path, tmp_path):
    out = tmp_path / "pred.zarr"
    check_ok(cli_main("predict", model_path, data_path, "--out", out, "--proba", "--score", *NO_CLUSTER, "--quiet"))
    model = streamem.load(model_path)
    ds = xr.open_zarr(out, consolidated=False)
    assert set(ds.data_vars) == {"labels", "proba", "log_likelihood"}
    assert ds["proba"].dims[1] == "component" and len(ds["proba"].dims) == 2
    assert ds["labels"].dims == ds["log_likelihood"].dims == ds["proba"].dims[:1]
    assert_array_equal(ds["labels"].values, model.predict(X))
    assert_allclose(ds["proba"].values, model.predict_proba(X), rtol=1e-12, atol=1e-15)
    assert_allclose(ds["log_likelihood"].values, model.score_samples(X), rtol=1e-12)
    # Independent of streamem's numerics: scikit-learn with the same parameters.
    assert_array_equal(ds["labels"].values, sklearn_from(model).predict(X))
    assert_allclose(ds["log_likelihood"].values, sklearn_from(model).score_samples(X), rtol=1e-10)
    # The output is chunked like the input: one chunk per input row chunk.
    group = zarr.open_group(out, mode="r")
    assert group["labels"].chunks == (CHUNK_ROWS,)
    assert group["log_likelihood"].chunks == (CHUNK_ROWS,)
    assert group["proba"].chunks == (CHUNK_ROWS, 3)
    assert ds["labels"].chunks[0] == streamem.load_data(data_path).array.chunks[0]


def test_predict_xarray_dataset_keeps_the_time_coordinate(X, model_path, tmp_path):
    times = pd.date_range("2024-05-01", periods=N_ROWS, freq="10s")
    station = np.arange(N_ROWS) % 7
    # Stored (band, time): the sample dimension is not the first one, so --sample-dim matters.
    ds_in = xr.Dataset(
        {"obs": (("band", "time"), X.T.copy()), "other": (("time",), np.zeros(N_ROWS))},
        coords={"time": times, "station": (("time",), station)},
    ).chunk({"time": 900})
    data = tmp_path / "obs.zarr"
    ds_in.to_zarr(data, zarr_format=3, consolidated=False)
    out = tmp_path / "pred.zarr"
    check_ok(cli_main("predict", model_path, data, "--variable", "obs", "--sample-dim", "time", "--out", out, "--proba", *NO_CLUSTER, "--quiet"))

    model = streamem.load(model_path)
    ds = xr.open_zarr(out, consolidated=False)
    assert ds["labels"].dims == ("time",)
    assert ds["proba"].dims == ("time", "component")
    assert_array_equal(ds["time"].values, times.values)
    assert_array_equal(ds["station"].values, station)
    assert_array_equal(ds["labels"].values, model.predict(X))
    assert_allclose(ds["proba"].values, model.predict_proba(X), rtol=1e-12, atol=1e-15)
    assert zarr.open_group(out, mode="r")["labels"].chunks == (900,)


# ---------------------------------------------------------------------- score
def test_score_prints_mean_loglik_bic_aic(X, data_path, model_path):
    proc = check_ok(cli_main("score", model_path, data_path, *NO_CLUSTER, "--quiet"))
    values = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    sk = sklearn_from(streamem.load(model_path))
    assert int(values["rows"]) == N_ROWS
    assert_allclose(float(values["mean log-likelihood"]), sk.score(X), rtol=1e-9)
    assert_allclose(float(values["BIC"]), sk.bic(X), rtol=1e-9)
    assert_allclose(float(values["AIC"]), sk.aic(X), rtol=1e-9)


# ------------------------------------------------------------------- generate
def test_generate_shape_chunks_dtype_and_overwrite(tmp_path):
    out = tmp_path / "gen.zarr"
    check_ok(cli_main("generate", out, "--n-samples", 5000, "--n-features", 4, "--n-components", 3, "--chunk-rows", 1200, "--dtype", "float32", "--seed", 3, "--quiet"))
    arr = zarr.open_array(out, mode="r")
    assert arr.shape == (5000, 4) and arr.chunks == (1200, 4) and arr.dtype == np.float32
    values = arr[...]
    assert np.isfinite(values).all() and np.unique(values[:, 0]).size > 4000
    # Drawn from the mixture recorded in the attributes: the sample mean is near sum_k w_k mu_k.
    weights, means = np.asarray(arr.attrs["weights"]), np.asarray(arr.attrs["means"])
    assert weights.shape == (3,) and means.shape == (3, 4)
    assert_allclose(values.mean(axis=0), weights @ means, atol=0.2)

    again = cli_main("generate", out, "--n-samples", 100, "--n-features", 2, "--quiet")
    check_usage_error(again, "overwrite")
    assert zarr.open_array(out, mode="r").shape == (5000, 4)

    check_ok(cli_main("generate", out, "--n-samples", 3000, "--n-features", 2, "--n-components", 2, "--chunk-rows", 1000, "--overwrite", "--quiet"))
    arr = zarr.open_array(out, mode="r")
    assert arr.shape == (3000, 2) and arr.chunks == (1000, 2) and arr.dtype == np.float64
    assert sorted(os.listdir(tmp_path)) == ["gen.zarr"]


# ----------------------------------------------------------------------- plot
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_png_wider_with_data(data_path, model_path, tmp_path):
    import matplotlib.image

    curve, scatter = tmp_path / "curve.png", tmp_path / "scatter.png"
    check_ok(cli_main("plot", model_path, "--out", curve, "--quiet"))
    check_ok(cli_main("plot", model_path, "--out", scatter, "--data", data_path, "--n-points", 800, "--quiet"))
    shapes = []
    for path in (curve, scatter):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100
        assert image.std() > 0  # not a blank canvas
        shapes.append(image.shape)
    assert shapes[1][1] > shapes[0][1], f"with --data the figure should be wider: {shapes}"


# ------------------------------------------------------- labels across re-fits
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_match_components_undoes_a_permutation(X, covariance_type):
    model = quiet_fit(streamem.GaussianMixture(n_components=3, covariance_type=covariance_type, tol=0, max_iter=5, **inits(covariance_type)), X)
    assert_array_equal(match_components(model, model), [0, 1, 2])
    for order in ([2, 0, 1], [1, 0, 2], [2, 1, 0]):
        permuted = copy.deepcopy(model).permute_components(order)
        # permuted's component j is model's order[j]: matching maps model's k to permuted's inverse(order)[k].
        perm = match_components(model, permuted)
        assert_array_equal(perm, np.argsort(order))
        restored = copy.deepcopy(permuted).permute_components(perm)
        for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
            assert_array_equal(getattr(restored, name), getattr(model, name), err_msg=name)
        assert_array_equal(restored.predict(X), model.predict(X))


def test_match_components_refuses_other_shapes(X):
    three = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=2, random_state=0), X)
    two = quiet_fit(streamem.GaussianMixture(n_components=2, tol=0, max_iter=2, random_state=0), X)
    with pytest.raises(ValueError):
        match_components(three, two)


def test_fit_init_from_keeps_component_labels(tmp_path):
    old_data = mixture_sample(6000, seed=61)
    new_data = mixture_sample(6000, seed=62)
    new_path = write_zarr(tmp_path / "new.zarr", new_data, 1500)
    old = quiet_fit(streamem.GaussianMixture(n_components=3, random_state=0, tol=1e-6), old_data)
    order = [2, 0, 1]
    relabelled = copy.deepcopy(old).permute_components(order)
    assert np.linalg.norm(relabelled.means_ - old.means_, axis=1).min() > 1.0  # every component moved
    relabelled.save(tmp_path / "old.zarr")

    out = tmp_path / "refit.zarr"
    check_ok(cli_main("fit", new_path, "--init-from", tmp_path / "old.zarr", "--out", out, "--tol", 1e-6, "--max-iter", 50, *NO_CLUSTER, "--quiet"))
    refit = streamem.load(out)
    assert refit.n_components == 3 and refit.covariance_type == "full"
    # Component k of the new model is component k of the (relabelled) old one, refitted on new rows.
    assert_allclose(refit.means_, relabelled.means_, atol=0.15)
    assert_allclose(refit.weights_, relabelled.weights_, atol=0.03)
    assert_array_equal(match_components(relabelled, refit), [0, 1, 2])
    # And it is the fit started from the old parameters (not a fresh k-means start).
    reference = quiet_fit(
        streamem.GaussianMixture(
            n_components=3, tol=1e-6, max_iter=50,
            weights_init=relabelled.weights_, means_init=relabelled.means_, precisions_init=relabelled.precisions_,
        ),  # fmt: skip
        new_path,
    )
    assert_same_params(refit, reference, 1e-10)
    assert refit.fit_data_["source"] == new_path


# ---------------------------------------------------------------- nightly job
def test_nightly_refit_script_twice(tmp_path):
    # The script names the model after today's date: pretend two days pass.
    bin_dir, wrapper, calls = nightly_bin(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"tol": 1e-6, "max_iter": 60, "workers": 0}))
    days = ("2024-03-01", "2024-03-02")
    data = [write_zarr(tmp_path / f"data-{day}.zarr", mixture_sample(4000, seed=70 + i), 1000) for i, day in enumerate(days)]

    def run(day: str, data_path: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, STREAMEM=str(wrapper), FAKE_DATE=day, N_COMPONENTS="3", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return subprocess.run(
            ["bash", os.path.join(REPO, "scripts", "nightly_refit.sh"), data_path, str(models), str(config)],
            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
        )  # fmt: skip

    current = models / "current.zarr"
    first = check_ok(run(days[0], data[0]))
    assert current.is_symlink() and os.readlink(current) == f"model-{days[0]}.zarr"
    day1 = streamem.load(current)
    assert "3 components" in first.stdout
    assert not (models / f"ckpt-{days[0]}").exists()
    # Day 1 is a fresh fit: n_components from the environment, random_state 0, the config's tol and max_iter.
    reference1 = quiet_fit(streamem.GaussianMixture(n_components=3, random_state=0, tol=1e-6, max_iter=60), data[0])
    assert_same_params(day1, reference1, 1e-10)

    second = check_ok(run(days[1], data[1]))
    assert current.is_symlink() and os.readlink(current) == f"model-{days[1]}.zarr"
    assert (models / f"model-{days[0]}.zarr").is_dir()  # yesterday's model is kept
    assert not (models / f"ckpt-{days[1]}").exists()
    assert "3 components" in second.stdout
    fits = [line for line in calls.read_text().splitlines() if line.startswith("fit ")]
    assert len(fits) == 2 and "--init-from" not in fits[0]
    assert f"--init-from {current}" in fits[1]

    day2 = streamem.load(current)
    assert day2.fit_data_["source"] == data[1]
    # Warm start from day 1 and the same labels: component k is still component k.
    assert_allclose(day2.means_, day1.means_, atol=0.15)
    assert_array_equal(match_components(day1, day2), [0, 1, 2])
    reference2 = quiet_fit(
        streamem.GaussianMixture(
            n_components=3, tol=1e-6, max_iter=60,
            weights_init=day1.weights_, means_init=day1.means_, precisions_init=day1.precisions_,
        ),  # fmt: skip
        data[1],
    )
    reference2.permute_components(match_components(day1, reference2))
    assert_same_params(day2, reference2, 1e-10)
    assert sorted(os.listdir(models)) == ["current.zarr", f"model-{days[0]}.zarr", f"model-{days[1]}.zarr"]


# ------------------------------------------- issue 13: --out checked up front
def _write_feature_time_store(path, X: np.ndarray, chunk_rows: int) -> str:
    """``X`` as variable ``obs`` of an xarray Dataset in Zarr, stored with dims (feature, time)."""
    times = pd.date_range("2024-05-01", periods=len(X), freq="10s")
    ds = xr.Dataset({"obs": (("feature", "time"), X.T.copy())}, coords={"time": times}).chunk({"time": chunk_rows})
    ds.to_zarr(path, zarr_format=3, consolidated=False)
    return os.fspath(path)


def _command_writing(command: str, out, data_path: str, model_path: str, tmp_path) -> tuple:
    """Arguments of ``command`` writing ``out``; everything else valid (reduce gets a shard that does not exist)."""
    return {
        "fit": ("fit", data_path, "--out", out, "--n-components", 3, "--max-iter", 200, "--tol", 0, *LOCAL),
        "predict": ("predict", model_path, data_path, "--out", out, "--proba", *LOCAL),
        "accumulate": ("accumulate", model_path, data_path, "--out", out, *LOCAL),
        # The missing shard would be named if reduce read its shards before checking --out.
        "reduce": ("reduce", tmp_path / "no-such-shard.zarr", "--model", model_path, "--out", out),
    }[command]


@pytest.mark.parametrize("command", ["fit", "predict", "accumulate", "reduce"])
def test_out_in_a_missing_directory_is_refused_before_any_work(command, data_path, model_path, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.zarr"
    # Not --quiet: a started cluster would print its dashboard line, a second line on stderr.
    proc = cli_main(*_command_writing(command, out, data_path, model_path, tmp_path))
    line = check_usage_error(proc, "--out", os.fspath(tmp_path / "no"), "does not exist")
    assert "no-such-shard" not in line
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", ["fit", "predict", "accumulate", "reduce"])
def test_existing_out_is_refused_before_any_work_without_overwrite(command, data_path, model_path, tmp_path):
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "keep").write_text("old")
    proc = cli_main(*_command_writing(command, out, data_path, model_path, tmp_path))
    check_usage_error(proc, "--out", os.fspath(out), "--overwrite")
    assert os.listdir(out) == ["keep"] and sorted(os.listdir(tmp_path)) == ["out.zarr"]


@pytest.mark.parametrize("command", ["fit", "predict", "accumulate", "reduce"])
def test_out_under_a_file_is_refused_before_any_work(command, data_path, model_path, tmp_path):
    (tmp_path / "plain").write_text("a file, not a directory")
    proc = cli_main(*_command_writing(command, tmp_path / "plain" / "out.zarr", data_path, model_path, tmp_path))
    check_usage_error(proc, "--out", os.fspath(tmp_path / "plain"), "not a directory")


def test_check_out_refuses_a_directory_without_write_permission(tmp_path):
    from streamem.cli import UsageError, check_out

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who may write anywhere (root)")
        with pytest.raises(UsageError, match="not writable"):
            check_out(locked / "out.zarr", overwrite=False)
    finally:
        locked.chmod(0o700)
    check_out(locked / "out.zarr", overwrite=False)  # writable again: no error


# -------------------------------- issue 13: (feature, time) stores everywhere
def test_plot_takes_a_feature_time_store_with_sample_dim(X, data_path, model_path, tmp_path):
    import matplotlib.image

    store = _write_feature_time_store(tmp_path / "obs.zarr", X, 900)
    from_rows, from_store = tmp_path / "rows.png", tmp_path / "store.png"
    check_ok(cli_main("plot", model_path, "--out", from_rows, "--data", data_path, "--n-points", 600, "--quiet"))
    check_ok(cli_main("plot", model_path, "--out", from_store, "--data", store, "--variable", "obs", "--sample-dim", "time",
                 "--n-points", 600, "--quiet"))  # fmt: skip
    # The same rows are drawn (the sample is by global row index), so the same picture.
    assert_array_equal(matplotlib.image.imread(from_store), matplotlib.image.imread(from_rows))
    # Without --sample-dim the first dimension (feature) is taken as samples: 3 "rows" of 4500 features.
    proc = cli_main("plot", model_path, "--out", tmp_path / "bad.png", "--data", store, "--variable", "obs", "--quiet")
    check_usage_error(proc, "4500 features", "3")


# ------------------------------ issue 13: score and predict validate features
@pytest.mark.parametrize("command", ["score", "predict"])
def test_data_with_another_feature_count_exits_2_naming_the_counts(command, X, model_path, tmp_path):
    two = write_zarr(tmp_path / "two.zarr", np.ascontiguousarray(X[:, :2]), CHUNK_ROWS)
    extra = ("--out", tmp_path / "pred.zarr") if command == "predict" else ()
    proc = cli_main(command, model_path, two, *extra, *LOCAL, "--quiet")
    check_usage_error(proc, "2 features", "expecting 3 features")
    assert not (tmp_path / "pred.zarr").exists()


def test_score_of_a_feature_time_store_with_sample_dim(X, model_path, tmp_path):
    store = _write_feature_time_store(tmp_path / "obs.zarr", X, 900)
    proc = check_ok(cli_main("score", model_path, store, "--variable", "obs", "--sample-dim", "time", *NO_CLUSTER, "--quiet"))
    values = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert int(values["rows"]) == N_ROWS
    assert_allclose(float(values["mean log-likelihood"]), sklearn_from(streamem.load(model_path)).score(X), rtol=1e-9)


def test_predict_and_score_align_a_stored_feature_coordinate(X, tmp_path):
    """A store holding the fitted features in another column order is predicted by label, not by position."""
    names = ["u", "v", "w"]
    fitted_on = xr.DataArray(X, dims=("time", "band"), coords={"band": names})
    model = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=4, **inits("full")), fitted_on)
    model.save(tmp_path / "model.zarr")
    order = [2, 0, 1]
    shuffled = xr.Dataset({"obs": (("band", "time"), X[:, order].T.copy())}, coords={"band": [names[i] for i in order]})
    shuffled.chunk({"time": 1000}).to_zarr(tmp_path / "obs.zarr", zarr_format=3, consolidated=False)
    where = ("--variable", "obs", "--sample-dim", "time", *NO_CLUSTER, "--quiet")

    out = tmp_path / "pred.zarr"
    check_ok(cli_main("predict", tmp_path / "model.zarr", tmp_path / "obs.zarr", "--out", out, "--score", *where))
    ds = xr.open_zarr(out, consolidated=False)
    sk = sklearn_from(model)
    assert_array_equal(ds["labels"].values, sk.predict(X))
    assert_allclose(ds["log_likelihood"].values, sk.score_samples(X), rtol=1e-10)
    proc = check_ok(cli_main("score", tmp_path / "model.zarr", tmp_path / "obs.zarr", *where))
    values = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert_allclose(float(values["mean log-likelihood"]), sk.score(X), rtol=1e-9)
