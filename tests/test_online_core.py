"""Online EM's building blocks: exact re-centring, the stepwise and incremental updates, the chain of chunk tasks."""

from __future__ import annotations

import numpy as np
import pytest
from _common import COVARIANCE_TYPES, make_data, make_inits

import streamem
from streamem.data import load_data
from streamem.em import DataPasses, EMRun, batch_em
from streamem.families.gaussian import GaussianFamily
from streamem.online import OnlineRun, OnlineSettings, batches_of_chunk, online_em, online_link


def _initial(covariance_type: str, X: np.ndarray):
    """The parameters scikit-learn's initialisation gives from make_inits (max_iter=0 fit)."""
    model = streamem.GaussianMixture(3, covariance_type=covariance_type, max_iter=0, **make_inits(covariance_type))
    return model.fit(X)._params()


def _exact_stats(X: np.ndarray, resp: np.ndarray, center: np.ndarray, covariance_type: str) -> dict:
    """Centred statistics in extended precision, straight from the definition."""
    Xl, rl, cl = X.astype(np.longdouble), resp.astype(np.longdouble), center.astype(np.longdouble)
    nk = rl.sum(axis=0)
    diff = Xl[None, :, :] - cl[:, None, :]  # (K, n, d)
    s1 = np.einsum("nk,knd->kd", rl, diff)
    if covariance_type in ("full", "tied"):
        s2 = np.einsum("nk,kni,knj->kij", rl, diff, diff)
        s2 = s2.sum(axis=0) if covariance_type == "tied" else s2
    else:
        s2 = np.einsum("nk,knd->kd", rl, diff**2)
    return {"nk": nk, "s1": s1, "s2": s2}


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_recentre_equals_statistics_computed_at_the_new_centre(covariance_type):
    rng = np.random.RandomState(1)
    offset = 1e5
    X = rng.standard_normal((300, 3)) * 0.01 + offset
    resp = rng.dirichlet(np.ones(3), size=300)
    old = offset + rng.standard_normal((3, 3)) * 0.02
    new = offset + rng.standard_normal((3, 3)) * 0.02
    family = GaussianFamily(covariance_type)
    stats = family.stats_from_resp(X, resp, old)
    moved = family.recentre(stats, old, new)
    exact = _exact_stats(X, resp, new, covariance_type)
    for name in ("nk", "s1", "s2"):
        scale = float(np.max(np.abs(exact[name])))
        np.testing.assert_allclose(moved[name], exact[name].astype(np.float64), rtol=0, atol=1e-9 * scale, err_msg=name)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_stepwise_one_batch_of_all_rows_with_unit_step_is_one_batch_iteration(covariance_type):
    X = make_data()
    params = _initial(covariance_type, X)
    family = GaussianFamily(covariance_type)
    passes = DataPasses(load_data(X, chunk_rows=len(X)), "threads")
    settings = OnlineSettings("stepwise", batch_size=len(X), step_offset=1.0, step_decay=0.7, shuffle=False)
    (run,) = online_em(passes, family, [EMRun(params)], settings, tol=0.0, max_iter=1, seed=0)
    (batch,) = batch_em(passes, family, [EMRun(params)], tol=0.0, max_iter=1)
    bounds = run.lower_bounds
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        np.testing.assert_allclose(getattr(run.params, name), getattr(batch.params, name), rtol=1e-12, atol=1e-13, err_msg=name)
    assert bounds == pytest.approx([batch.lower_bound], rel=1e-14)
    assert run.n_steps == 1


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_incremental_objective_never_decreases_over_passes(covariance_type):
    X = make_data()
    params = _initial(covariance_type, X)
    family = GaussianFamily(covariance_type)
    passes = DataPasses(load_data(X, chunk_rows=700), "threads")
    settings = OnlineSettings("incremental", batch_size=250)
    (run,) = online_em(passes, family, [EMRun(params)], settings, tol=0.0, max_iter=5, seed=0, monitor="exact")
    bounds = run.lower_bounds
    assert np.all(np.diff(bounds) >= -1e-12), bounds
    # It reaches the batch optimum: EM's fixed point from the same start.
    (batch,) = batch_em(passes, family, [EMRun(params)], tol=1e-12, max_iter=500)
    assert bounds[-1] == pytest.approx(batch.lower_bound, abs=1e-9)


def test_incremental_replaces_each_blocks_statistics():
    """After a pass, the running sum equals the sum of the blocks' kept statistics, block by block."""
    X = make_data()
    family = GaussianFamily("full")
    passes = DataPasses(load_data(X, chunk_rows=1000), "threads")
    settings = OnlineSettings("incremental", batch_size=300)
    run = OnlineRun(_initial("full", X), total_rows=len(X))
    for pass_seed in (3, 4):  # two passes: the second replaces every block's statistics
        (run,) = passes.chain(online_link, [run], family, settings, pass_seed)
    blocks = [(stats, centre) for chunk in run.blocks.values() for stats, centre in chunk.values()]
    assert len(blocks) == sum(-(-c // 300) for c in (1000, 1000, 1000, 1000, 500))
    total = None
    for stats, centre in blocks:
        moved = family.recentre(stats, centre, run.center)
        total = moved if total is None else total + moved
    for name in ("nk", "s1", "s2"):
        np.testing.assert_allclose(total[name], run.stats[name], rtol=1e-9, atol=1e-9)
    assert total.n == len(X)


def test_stepwise_reaches_batch_optimum_on_well_separated_data():
    rng = np.random.RandomState(5)
    means = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]])
    labels = rng.randint(4, size=40_000)
    X = means[labels] + rng.standard_normal((40_000, 2))
    family = GaussianFamily("full")
    params = _start(X, means + 1.0)
    passes = DataPasses(load_data(X, chunk_rows=10_000), "threads")
    settings = OnlineSettings("stepwise", batch_size=500)
    (run,) = online_em(passes, family, [EMRun(params)], settings, tol=0.0, max_iter=3, seed=0, monitor="exact")
    bounds = run.lower_bounds
    (batch,) = batch_em(passes, family, [EMRun(params)], tol=1e-10, max_iter=300)
    assert batch.lower_bound - bounds[-1] < 1e-3
    assert batch.lower_bound - bounds[-1] > -1e-9  # the batch optimum is a (local) maximum


def _start(X: np.ndarray, means: np.ndarray):
    from streamem.families.gaussian import GaussianParams

    K, d = means.shape
    cov = np.tile(np.eye(d), (K, 1, 1))
    return GaussianParams(np.full(K, 1.0 / K), means, cov, GaussianFamily("full").precision_cholesky(cov))


@pytest.mark.parametrize("algorithm", ["stepwise", "incremental"])
def test_mini_batches_cover_every_row_once(algorithm):
    settings = OnlineSettings(algorithm, batch_size=7)
    batches = batches_of_chunk(50, settings, chunk=3, pass_seed=11)
    rows = np.concatenate([rows for _, rows in batches])
    assert sorted(rows.tolist()) == list(range(50))
    assert max(len(r) for _, r in batches) <= 7 and len(batches) == 8
    assert sorted(i for i, _ in batches) == list(range(8))
    unshuffled = batches_of_chunk(50, OnlineSettings(algorithm, batch_size=7, shuffle=False), chunk=3, pass_seed=11)
    assert np.concatenate([r for _, r in unshuffled]).tolist() == list(range(50))


def test_non_finite_rows_are_reported_by_global_row():
    X = make_data()
    X[2345, 1] = np.nan
    passes = DataPasses(load_data(X, chunk_rows=(500, 900, 300, 1200, 650, 400, 550)[0]), "threads")
    settings = OnlineSettings("stepwise", batch_size=100)
    with pytest.raises(ValueError, match="rows 2345 to 2345"):
        online_em(passes, GaussianFamily("full"), [EMRun(_initial("full", make_data()))], settings, tol=0.0, max_iter=1, seed=0)


def _numpy_stepwise_pass(X, params, batch_size, step_decay, step_offset, chunk_rows, average, reg=1e-6):
    """One stepwise pass in storage order with uncentred statistics, written from the definitions (full covariances).

    With ``average``, the pass ends at the M-step of the running statistics averaged (weighted by rows) over the
    mini-batches that end in the second half of the pass.
    """
    from scipy.stats import multivariate_normal

    w, mu, cov = params.weights, params.means, params.covariances
    s0 = w / w.sum()  # the starting parameters weigh as one row of data
    s1 = s0[:, None] * mu
    s2 = s0[:, None, None] * (cov - reg * np.eye(X.shape[1]) + np.einsum("ki,kj->kij", mu, mu))
    avg, avg_rows, t, done = None, 0.0, 0.0, 0
    for start in range(0, len(X), chunk_rows):
        chunk = X[start : start + chunk_rows]
        for rows in np.array_split(np.arange(len(chunk)), -(-len(chunk) // batch_size)):
            Xb = chunk[rows]
            dens = np.stack([w[k] * multivariate_normal(mu[k], cov[k]).pdf(Xb) for k in range(len(w))], axis=1)
            r = dens / dens.sum(axis=1, keepdims=True)
            eta = 1.0 - (1.0 - (t + step_offset) ** -step_decay) ** (len(Xb) / batch_size)
            s0 = (1 - eta) * s0 + eta * r.mean(axis=0)
            s1 = (1 - eta) * s1 + eta * (r.T @ Xb) / len(Xb)
            s2 = (1 - eta) * s2 + eta * np.einsum("nk,ni,nj->kij", r, Xb, Xb) / len(Xb)
            t += len(Xb) / batch_size
            done += len(Xb)
            if average and done > len(X) / 2:
                new = (s0, s1, s2)
                avg = new if avg is None else tuple((a * avg_rows + b * len(Xb)) / (avg_rows + len(Xb)) for a, b in zip(avg, new))
                avg_rows += len(Xb)
            w, mu = s0, s1 / s0[:, None]
            cov = s2 / s0[:, None, None] - np.einsum("ki,kj->kij", mu, mu) + reg * np.eye(X.shape[1])
    if average:
        s0, s1, s2 = avg
        w, mu = s0, s1 / s0[:, None]
        cov = s2 / s0[:, None, None] - np.einsum("ki,kj->kij", mu, mu) + reg * np.eye(X.shape[1])
    return w, mu, cov


@pytest.mark.parametrize("average", [False, True])
def test_stepwise_pass_and_its_average_equal_a_numpy_reference(average):
    X = make_data()[:2100]
    params = _initial("full", X)
    family = GaussianFamily("full")
    passes = DataPasses(load_data(X, chunk_rows=700), "threads")
    settings = OnlineSettings("stepwise", batch_size=160, step_decay=0.6, step_offset=2.0, shuffle=False, average=average)
    (run,) = online_em(passes, family, [EMRun(params)], settings, tol=0.0, max_iter=1, seed=0)
    weights, means, covariances = _numpy_stepwise_pass(X, params, 160, 0.6, 2.0, 700, average)
    np.testing.assert_allclose(run.params.weights, weights, rtol=1e-9)
    np.testing.assert_allclose(run.params.means, means, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(run.params.covariances, covariances, rtol=1e-8, atol=1e-9)


def test_averaged_pass_is_less_noisy_than_the_last_mini_batch():
    """Large steps follow the last mini-batches; their average over the second half is closer to the batch optimum."""
    X = make_data()
    params = _initial("full", X)
    family = GaussianFamily("full")
    passes = DataPasses(load_data(X, chunk_rows=700), "threads")
    (optimum,) = batch_em(passes, family, [EMRun(params)], tol=1e-10, max_iter=500)

    def gap(average: bool) -> float:
        settings = OnlineSettings("stepwise", batch_size=50, step_decay=0.51, shuffle=True, average=average)
        (run,) = online_em(passes, family, [EMRun(params)], settings, tol=0.0, max_iter=2, seed=3)
        return optimum.lower_bound - float(family.e_step(X, run.params)[0].mean())

    assert gap(True) < 0.5 * gap(False)
