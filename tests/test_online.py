"""Online EM through the public API: GaussianMixture(algorithm=...), partial_fit, saved online state, `streamem update`."""

from __future__ import annotations

import os
import shutil
import warnings

import dask.array as da
import numpy as np
import pytest
from _common import COVARIANCE_TYPES, make_data, make_inits
from conftest import write_zarr
from sklearn.exceptions import ConvergenceWarning

import streamem
from streamem.cli import main

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _fit(X, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return streamem.GaussianMixture(3, random_state=0, **params).fit(X)


def _params(model) -> dict:
    return {name: getattr(model, name) for name in ("weights_", "means_", "covariances_", "precisions_cholesky_")}


def _assert_same(a, b, rtol=1e-12):
    for name, value in _params(a).items():
        np.testing.assert_allclose(value, getattr(b, name), rtol=rtol, atol=rtol, err_msg=name)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_partial_fit_over_chunks_in_order_equals_one_stepwise_pass(covariance_type, tmp_path):
    X = make_data()
    path = write_zarr(tmp_path / "x.zarr", X, (700, 3))
    inits = make_inits(covariance_type)
    # partial_fit follows its rows and does not average (it cannot know where a pass ends)
    whole = _fit(path, covariance_type=covariance_type, algorithm="stepwise", batch_size=200, shuffle=False, average=False,
                 max_iter=1, **inits)
    parts = streamem.GaussianMixture(3, covariance_type=covariance_type, batch_size=200, random_state=0, **inits)
    for start in range(0, len(X), 700):
        assert parts.partial_fit(X[start : start + 700]) is parts
    _assert_same(parts, whole)
    assert parts.n_steps_ == pytest.approx(whole.n_steps_) and whole.n_steps_ == pytest.approx(len(X) / 200)  # rows / batch_size
    assert parts.n_features_in_ == 3


def test_partial_fit_first_call_initialises_by_kmeans_on_its_rows():
    X = make_data()
    first = X[:1500]
    model = streamem.GaussianMixture(3, random_state=0, max_iter=0, batch_size=100_000, step_offset=1.0)
    model.partial_fit(first)
    # One mini-batch of all rows with a unit step is one batch iteration from the same k-means start.
    reference = _fit(first, max_iter=1, init_params="kmeans")
    _assert_same(model, reference, rtol=1e-10)


def test_partial_fit_refuses_another_number_of_features():
    X = make_data()
    model = streamem.GaussianMixture(3, random_state=0).partial_fit(X)
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMixture is expecting 3 features"):
        model.partial_fit(X[:, :2])


def test_partial_fit_continues_a_batch_fit_weighing_the_new_rows_by_their_share():
    X = make_data()
    model = _fit(X[:4000], batch_size=100)
    steps = model.n_steps_
    # The next step weighs one mini-batch as its share of the rows seen.
    assert (steps + model.step_offset) ** -model.step_decay == pytest.approx(100 / 4000, rel=0.05)
    before = model.means_.copy()
    model.partial_fit(X[4000:])
    assert model.n_steps_ == pytest.approx(steps + 500 / 100)
    np.testing.assert_allclose(model.means_, before, atol=0.05)  # the new rows move the model a little only


@pytest.mark.parametrize("algorithm", ["stepwise", "incremental"])
def test_online_fit_does_not_depend_on_the_number_of_workers(algorithm, cluster, tmp_path):
    from distributed import Client

    X = make_data()
    path = write_zarr(tmp_path / "x.zarr", X, (700, 3))
    params = dict(algorithm=algorithm, batch_size=150, max_iter=2, tol=0.0)
    local = _fit(path, **params)
    with Client(cluster) as client:
        distributed = _fit(path, client=client, **params)
        persisted = _fit(path, client=client, persist="always", **params)
    _assert_same(local, distributed, rtol=0)
    _assert_same(local, persisted, rtol=0)
    assert local.lower_bounds_ == distributed.lower_bounds_


def test_stepwise_gets_close_to_the_batch_optimum_in_three_passes():
    rng = np.random.RandomState(5)
    means = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]])
    X = means[rng.randint(4, size=40_000)] + rng.standard_normal((40_000, 2))
    X = da.from_array(X, chunks=10_000)
    common = dict(n_components=4, random_state=0, means_init=means + 1.0)
    batch = streamem.GaussianMixture(tol=1e-10, max_iter=500, **common).fit(X)
    stepwise = streamem.GaussianMixture(algorithm="stepwise", batch_size=500, max_iter=3, tol=0.0, monitor="exact", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        stepwise.fit(X)
    assert len(stepwise.lower_bounds_) == 3
    assert batch.score(X) - stepwise.score(X) < 1e-3
    assert stepwise.lower_bound_ == pytest.approx(stepwise.score(X), abs=1e-12)  # "exact" is the true objective


def test_incremental_memory_beyond_the_machine_is_refused():
    X = da.zeros((10**9, 64), chunks=(10**6, 64))
    model = streamem.GaussianMixture(8, algorithm="incremental", batch_size=10)
    with pytest.raises(ValueError, match="algorithm='incremental' keeps one set of statistics per mini-batch"):
        model.fit(X)


@pytest.mark.parametrize(
    "params, name",
    [
        (dict(algorithm="online"), "algorithm"),
        (dict(batch_size=0), "batch_size"),
        (dict(step_decay=0.5), "step_decay"),
        (dict(step_decay=1.5), "step_decay"),
        (dict(step_offset=0.5), "step_offset"),
        (dict(step_size=0.0), "step_size"),
        (dict(step_size=2.0), "step_size"),
        (dict(shuffle="yes"), "shuffle"),
        (dict(monitor="true"), "monitor"),
    ],
)
def test_bad_online_settings_are_refused(params, name):
    with pytest.raises(ValueError, match=name):
        streamem.GaussianMixture(2, **params).fit(make_data())


def test_online_state_is_saved_and_loaded(tmp_path):
    X = make_data()
    model = _fit(X, algorithm="stepwise", batch_size=300, max_iter=2)
    model.save(tmp_path / "m.zarr")
    loaded = streamem.load(tmp_path / "m.zarr")
    assert loaded.n_steps_ == model.n_steps_ and loaded.algorithm == "stepwise"
    for key in ("nk", "s1", "s2"):
        np.testing.assert_array_equal(loaded.online_stats_[key], model.online_stats_[key])
    np.testing.assert_array_equal(loaded.online_center_, model.online_center_)
    # Continuing the loaded model equals continuing the fitted one.
    _assert_same(loaded.partial_fit(X[:1000]), model.partial_fit(X[:1000]), rtol=0)


def test_online_checkpoint_resumes_to_the_same_fit(tmp_path):
    X = make_data()
    params = dict(algorithm="stepwise", batch_size=300, tol=0.0)
    full = _fit(X, max_iter=4, **params)
    ckpt = tmp_path / "ckpt"
    resumed = streamem.GaussianMixture(3, random_state=0, max_iter=2, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        resumed.fit(X, checkpoint=ckpt)  # stops after 2 passes, its state saved
        resumed.set_params(max_iter=4).fit(X, checkpoint=ckpt, resume=True)
    assert resumed.n_iter_ == 4 and resumed.n_steps_ == full.n_steps_
    assert resumed.lower_bounds_ == full.lower_bounds_
    _assert_same(resumed, full, rtol=0)


def test_a_model_saved_before_online_em_loads_and_updates(tmp_path):
    old = streamem.load(os.path.join(FIXTURES, "model_before_online.zarr"))
    assert getattr(old, "online_stats_", None) is None and old.algorithm == "batch"
    X = make_data(seed=7)
    before = old.score(X)
    old.partial_fit(X)
    assert old.n_steps_ > 0 and old.online_stats_ is not None
    assert abs(old.score(X) - before) < 0.05  # same distribution: it stays near its optimum
    path = write_zarr(tmp_path / "new.zarr", X, (1000, 3))
    shutil.copytree(os.path.join(FIXTURES, "model_before_online.zarr"), tmp_path / "old.zarr")
    assert main(["update", str(tmp_path / "old.zarr"), path, "--out", str(tmp_path / "new_model.zarr"), "--quiet", "--workers", "1"]) == 0
    assert streamem.load(tmp_path / "new_model.zarr").n_steps_ > 0


def test_update_moves_the_model_toward_shifted_rows_and_keeps_labels(tmp_path):
    X = make_data()
    model = _fit(X, batch_size=500)
    model.save(tmp_path / "m.zarr")
    shifted = make_data(n=3000, seed=11) + 0.7
    path = write_zarr(tmp_path / "shifted.zarr", shifted, (1000, 3))
    out = {}
    for name, extra in (("schedule", []), ("constant", ["--step-size", "0.2"])):
        out[name] = str(tmp_path / f"{name}.zarr")
        argv = ["update", str(tmp_path / "m.zarr"), path, "--out", out[name], "--quiet", "--workers", "1", "--batch-size", "500", *extra]
        assert main(argv) == 0
    old = streamem.load(tmp_path / "m.zarr")
    for name, path_out in out.items():
        new = streamem.load(path_out)
        assert new.score(shifted) > old.score(shifted), name
        # Component k is still component k: each mean moved less than the distance between components.
        assert np.all(np.linalg.norm(new.means_ - old.means_, axis=1) < 2.0), name
    constant, schedule = streamem.load(out["constant"]), streamem.load(out["schedule"])
    assert constant.score(shifted) > schedule.score(shifted)  # a large constant step follows new data further


def test_update_of_rows_from_the_same_distribution_ends_near_a_batch_refit_on_all_rows():
    X = make_data(n=20_000, seed=3)
    old, new = X[:16_000], X[16_000:]
    model = _fit(old, batch_size=500, tol=1e-8, max_iter=300)
    refit = _fit(X, batch_size=500, tol=1e-8, max_iter=300, means_init=model.means_)
    updated = _fit(old, batch_size=500, tol=1e-8, max_iter=300).update(new)
    assert updated.n_rows_seen_ == 20_000 and updated.algorithm == "batch"  # settings restored
    gap = refit.score(X) - updated.score(X)
    assert 0 <= gap < 2e-4, gap
    # The stepwise schedule (default alpha=0.51) weighs the new rows far beyond their share: further off.
    scheduled = _fit(old, batch_size=500, tol=1e-8, max_iter=300).partial_fit(new)
    assert refit.score(X) - scheduled.score(X) > gap


def test_update_refuses_an_existing_output_before_any_work(tmp_path, capsys):
    X = make_data()
    _fit(X).save(tmp_path / "m.zarr")
    path = write_zarr(tmp_path / "x.zarr", X, (1000, 3))
    (tmp_path / "exists.zarr").mkdir()
    assert main(["update", str(tmp_path / "m.zarr"), path, "--out", str(tmp_path / "exists.zarr"), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


def test_nightly_script_in_update_mode_reads_only_the_new_rows(tmp_path):
    import subprocess

    from workflow_helpers import check_ok, mixture_sample, nightly_bin

    bin_dir, wrapper, calls = nightly_bin(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = write_zarr(tmp_path / "first.zarr", mixture_sample(6000, seed=80), (2000, 3))
    new_rows = write_zarr(tmp_path / "new.zarr", mixture_sample(2000, seed=81), (1000, 3))

    def run(day: str, data: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, STREAMEM=str(wrapper), FAKE_DATE=day, N_COMPONENTS="3", MODE="update",
                   PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
        return subprocess.run(["bash", os.path.join(repo, "scripts", "nightly_refit.sh"), data, str(models)],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # fmt: skip

    check_ok(run("2024-03-01", first))
    day1 = streamem.load(models / "current.zarr")
    assert day1.algorithm == "stepwise" and day1.n_steps_ > 0
    check_ok(run("2024-03-02", new_rows))
    day2 = streamem.load(models / "current.zarr")
    assert os.readlink(models / "current.zarr") == "model-2024-03-02.zarr"
    commands = calls.read_text().splitlines()
    assert commands[0].startswith("fit ") and "--algorithm stepwise" in commands[0]
    update = next(c for c in commands if c.startswith("update "))
    assert f"update {models / 'current.zarr'} {new_rows} " in update
    assert day2.fit_data_["shape"] == [2000, 3]  # it read the new rows only
    assert day1.n_rows_seen_ == 6000 and day2.n_rows_seen_ == 8000
    assert day2.n_steps_ == pytest.approx(6000 / 1000 - 2 + 2000 / 1000)  # a running average from 6000 rows, then 2000 rows (batch_size 1000)
    assert np.all(np.linalg.norm(day2.means_ - day1.means_, axis=1) < 0.5)  # labels kept
    assert not (models / "ckpt-2024-03-02").exists()


@pytest.mark.parametrize("algorithm", ["stepwise", "incremental"])
def test_online_n_init_runs_share_the_passes_and_keep_the_best(algorithm):
    X = make_data()
    params = dict(algorithm=algorithm, batch_size=400, max_iter=2, tol=0.0, init_params="random")
    one = _fit(X, n_init=1, **params)
    two = _fit(X, n_init=2, **params)
    assert two.n_data_passes_ == one.n_data_passes_  # both runs in the same passes
    # The first run is the same run in both fits, up to rounding (the random start within one sample is
    # scikit-learn's draw, whose statistics are summed in another order when two runs share a pass).
    assert two.lower_bound_ >= one.lower_bound_ - 1e-12
    if abs(two.lower_bound_ - one.lower_bound_) < 1e-12:
        _assert_same(two, one, rtol=1e-12)


def test_online_float32_estep_stays_close_to_float64():
    X = make_data() + 1e4  # far from the origin: the statistics are centred, so float32 loses little
    params = dict(algorithm="stepwise", batch_size=300, max_iter=2, tol=0.0, means_init=make_inits("full", offset=1e4)["means_init"])
    f64 = _fit(X, **params)
    f32 = _fit(X, dtype="float32", **params)
    np.testing.assert_allclose(f32.means_, f64.means_, rtol=0, atol=1e-3)
    np.testing.assert_allclose(f32.covariances_, f64.covariances_, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("chunk_rows", [4000, 500, 100])
def test_update_weighs_new_rows_by_their_share_whatever_the_chunking(chunk_rows):
    X = make_data(n=20_000, seed=4)
    model = _fit(X[:16_000], tol=1e-8, max_iter=300)
    shifted = X[16_000:] + 1.0
    moved = _fit(X[:16_000], tol=1e-8, max_iter=300).update(da.from_array(shifted, chunks=(chunk_rows, 3)))
    # 4,000 of 20,000 rows moved by +1: the means move by about a fifth.
    assert np.mean(moved.means_ - model.means_) == pytest.approx(0.2, abs=0.04)
    assert moved.n_rows_seen_ == 20_000


def test_permute_components_reorders_the_online_state():
    X = make_data()
    model = _fit(X, algorithm="stepwise", batch_size=300, max_iter=2)
    order = [2, 0, 1]
    reference = _fit(X, algorithm="stepwise", batch_size=300, max_iter=2).partial_fit(X[:900])
    permuted = model.permute_components(order).partial_fit(X[:900])
    np.testing.assert_allclose(permuted.means_, reference.means_[order], rtol=1e-12)


def test_rows_seen_of_old_models_warm_starts_and_multi_pass_updates():
    old = streamem.load(os.path.join(FIXTURES, "model_before_online.zarr"))
    old.set_params(batch_size=100)
    old.update(make_data(n=1500, seed=9))
    assert old.n_rows_seen_ == 4500 + 1500
    refit = streamem.GaussianMixture(3, random_state=0, warm_start=True)
    X = make_data()
    for _ in range(3):
        _fit(X) and refit.fit(X)
    assert refit.n_rows_seen_ == len(X)  # a re-fit of the same rows learns from them once
    twice = _fit(X).update(make_data(n=1000, seed=10), passes=2)
    assert twice.n_rows_seen_ == len(X) + 2000  # each pass counts the new rows again


def test_a_failed_update_changes_nothing():
    X = make_data()
    model = _fit(X, algorithm="stepwise", batch_size=300)
    before = {name: value for name, value in vars(model).items() if name.endswith("_")}
    with pytest.raises(ValueError, match="features"):
        model.update(X[:, :2])
    after = {name: value for name, value in vars(model).items() if name.endswith("_")}
    assert before.keys() == after.keys()
    assert all(after[k] is before[k] for k in before)


def test_continued_incremental_fit_does_not_restart_from_one_mini_batch():
    X = make_data()
    batch = _fit(X, tol=1e-10, max_iter=500)
    optimum = batch.score(X)
    continued = _fit(X, tol=1e-10, max_iter=500)
    continued.set_params(algorithm="incremental", batch_size=20, warm_start=True, max_iter=1).fit(X)
    assert optimum - continued.score(X) < 1e-6  # it stays at the optimum it started from
    fresh = _fit(X, algorithm="incremental", batch_size=2, max_iter=1)
    assert fresh.weights_.min() > 0.1  # no collapse onto one component from tiny first sums


def test_persisted_local_online_pass_reads_each_chunk_once():
    X = make_data()
    reads = []

    def counted(block):
        reads.append(len(block))
        return block

    data = da.from_array(X, chunks=(300, 3)).map_blocks(counted, dtype=X.dtype)
    _fit(data, algorithm="stepwise", batch_size=100, max_iter=3, persist="always", tol=0.0)
    assert len([r for r in reads if r]) == 15  # (dask calls it once on an empty block for its meta) read once when persisted; the initialisation and the 3 passes read no chunk again


def test_update_without_a_cluster_equals_the_update_on_one(tmp_path, capsys):
    """--workers 0 runs in this process on Dask's threads; the online result does not depend on where it runs."""
    X = make_data()
    _fit(X, batch_size=500).save(tmp_path / "m.zarr")
    path = write_zarr(tmp_path / "new.zarr", make_data(n=3000, seed=11) + 0.3, (1000, 3))
    outs = {}
    for workers in ("0", "1"):
        outs[workers] = str(tmp_path / f"w{workers}.zarr")
        argv = ["update", str(tmp_path / "m.zarr"), path, "--out", outs[workers], "--workers", workers, "--batch-size", "500"]
        assert main(argv) == 0
    assert "no cluster" in capsys.readouterr().err
    _assert_same(streamem.load(outs["0"]), streamem.load(outs["1"]))
    assert main(["update", str(tmp_path / "m.zarr"), path, "--out", str(tmp_path / "bad.zarr"), "--quiet", "--workers", "-1"]) == 2
    assert "--workers: must be at least 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad.zarr")
