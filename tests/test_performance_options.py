"""dtype="float32", persist modes, the progress bar, shared passes for n_init."""

from __future__ import annotations

import time
import warnings

import dask.array as da
import numpy as np
import pytest
from _common import COVARIANCE_TYPES, make_data, make_inits
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import streamem


def _fit(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return streamem.GaussianMixture(n_components=3, tol=0, max_iter=15, **kw).fit(X)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_float32_estep_matches_float64(covariance_type, offset):
    # 40k rows so that single-precision rounding has room to show.
    X = make_data(n=40_000, offset=offset)
    inits = make_inits(covariance_type, offset=offset)
    f64 = _fit(X, covariance_type=covariance_type, **inits)
    f32 = _fit(X, covariance_type=covariance_type, dtype="float32", **inits)
    # The reference is scikit-learn on the centred data (it loses precision at a 1e6 offset).
    sk = SkGaussianMixture(3, covariance_type=covariance_type, tol=0, max_iter=15, **make_inits(covariance_type))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(X - offset)
    assert abs(f32.lower_bound_ - sk.lower_bound_) < 1e-6
    assert abs(f64.lower_bound_ - sk.lower_bound_) < 1e-9
    np.testing.assert_allclose(f32.means_ - offset, sk.means_, atol=1e-5)
    np.testing.assert_allclose(f32.covariances_, sk.covariances_, rtol=1e-4, atol=1e-6)


def test_float32_predictions_are_float64_probabilities():
    X = make_data(n=2000)
    m = _fit(X, dtype="float32", **make_inits("full"))
    proba = m.predict_proba(X)
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("persist", ["always", "never", "auto"])
def test_persist_modes_give_the_same_model(zarr_path, persist):
    reference = _fit(make_data(), persist="never", **make_inits("full"))
    m = _fit(zarr_path, persist=persist, **make_inits("full"))
    np.testing.assert_allclose(m.means_, reference.means_, rtol=1e-12)
    assert m.lower_bounds_ == pytest.approx(reference.lower_bounds_, rel=1e-12)


def test_persist_on_a_cluster_reads_the_store_once(cluster, zarr_path):
    from distributed import Client

    with Client(cluster) as client:
        m = _fit(zarr_path, persist="always", client=client, **make_inits("diag"), covariance_type="diag")
        # After the fit nothing stays pinned on the workers (release is asynchronous).
        deadline = time.monotonic() + 10
        while client.who_has() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.who_has()
    ref = _fit(zarr_path, persist="never", **make_inits("diag"), covariance_type="diag")
    np.testing.assert_allclose(m.means_, ref.means_, rtol=1e-12)


def test_bad_persist_and_dtype_are_refused(X):
    with pytest.raises(ValueError, match="persist must be one of"):
        streamem.GaussianMixture(3, persist="sometimes").fit(X)
    with pytest.raises(ValueError, match="dtype must be"):
        streamem.GaussianMixture(3, dtype="float16").fit(X)


@pytest.mark.parametrize("on_cluster", [False, True])
def test_progress_bar_does_not_change_the_result(capsys, cluster, X, on_cluster):
    from distributed import Client

    dX = da.from_array(np.array(X), chunks=(700, 3))
    ref = _fit(dX, **make_inits("full"))
    if on_cluster:
        with Client(cluster) as client:
            m = streamem.GaussianMixture(3, tol=0, max_iter=15, client=client, **make_inits("full"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                m.fit(dX, progress=True)
    else:
        m = streamem.GaussianMixture(3, tol=0, max_iter=15, **make_inits("full"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.fit(dX, progress=True)
    assert "chunk" in capsys.readouterr().err  # tqdm wrote its bar
    np.testing.assert_allclose(m.means_, ref.means_, rtol=1e-12)


def test_restarts_share_passes(zarr_path):
    one = _fit(zarr_path, n_init=1, random_state=0, init_params="kmeans")
    four = _fit(zarr_path, n_init=4, random_state=0, init_params="kmeans")
    # Sample pass + initial-statistics pass + one pass per iteration, whatever n_init.
    assert one.n_data_passes_ == four.n_data_passes_ == 2 + 15
    assert one.tasks_per_pass_ == four.tasks_per_pass_


def test_fit_predict_accepts_fit_only_keywords(tmp_path):
    X = make_data(n=2000)
    labels = streamem.GaussianMixture(3, random_state=0).fit_predict(X, checkpoint=tmp_path / "ckpt")
    reference = SkGaussianMixture(3, random_state=0).fit(X)
    # Same default k-means init on the whole data: same labels up to numbering.
    assert labels.shape == (2000,)
    agreement = max(np.mean(labels == perm[reference.predict(X)]) for perm in _permutations(3))
    assert agreement > 0.999


def _permutations(k):
    import itertools

    return [np.array(p) for p in itertools.permutations(range(k))]


def test_a_large_payload_is_one_shared_task_with_the_same_result(monkeypatch, cluster, zarr_path):
    """On a cluster, parameters too big to copy into every chunk task travel as one task; the fit is unchanged."""
    from distributed import Client

    from streamem import em

    with Client(cluster, set_as_default=False) as client:
        small = _fit(zarr_path, client=client, **make_inits("full"))
        monkeypatch.setattr(em, "EMBED_PAYLOAD_BYTES", 0)
        large = _fit(zarr_path, client=client, **make_inits("full"))
    assert large.tasks_per_pass_ == small.tasks_per_pass_ + 1
    assert large.lower_bounds_ == small.lower_bounds_
    np.testing.assert_array_equal(large.means_, small.means_)


def test_chunk_groups_follow_the_workers_and_their_threads():
    from streamem.em import _chunk_groups

    homes = ["a"] * 10 + ["b"] * 3 + [None] * 2
    assert _chunk_groups(homes, {"a": 1, "b": 1}) == [(0, 8), (8, 10), (10, 13), (13, 14), (14, 15)]
    # A worker with 4 threads gets at least 4 tasks for its 10 chunks.
    assert _chunk_groups(homes, {"a": 4, "b": 1})[:4] == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_persist_without_workers_leaves_placement_to_the_scheduler():
    from streamem.cluster import persist_spread

    class NoWorkersYet:
        def nthreads(self):
            return {}

        def compute(self, blocks, **kw):
            assert not kw
            return [f"future-{b}" for b in blocks]

    futures, homes, threads = persist_spread(NoWorkersYet(), [0, 1, 2])
    assert futures == ["future-0", "future-1", "future-2"] and homes == [None] * 3 and threads == {}
