"""scikit-learn's estimator checks (DESIGN.md §5: check_estimator runs in the tests).

Every check sklearn generates for ``streamem.GaussianMixture()`` runs as its
own test and must pass; no check is declared as an expected failure.

Checks that do not run, and why:

* ``check_array_api_input`` -- skipped by scikit-learn itself (it raises
  SkipTest "SCIPY_ARRAY_API is not set: not checking array_api input"
  unless the environment variable SCIPY_ARRAY_API=1 is set before scipy is
  imported). streamem converts every input to a dask array of numpy blocks,
  so the array API path does not apply anyway.
"""

from __future__ import annotations

import pytest
from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks

import streamem

#: Checks scikit-learn is allowed to skip, with the reason it gives.
ALLOWED_SKIPS = {"check_array_api_input": "SCIPY_ARRAY_API is not set"}


@parametrize_with_checks([streamem.GaussianMixture()])
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def test_check_estimator_reports_no_failure():
    """The same through check_estimator: nothing fails, and only the listed checks are skipped."""
    results = check_estimator(streamem.GaussianMixture(), on_fail=None, on_skip=None)
    assert len(results) > 30
    failed = {r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"}
    assert failed == {}
    skipped = {r["check_name"]: str(r["exception"]) for r in results if r["status"] == "skipped"}
    assert set(skipped) <= set(ALLOWED_SKIPS), skipped
    for name, reason in skipped.items():
        assert ALLOWED_SKIPS[name] in reason


@pytest.mark.parametrize("name", ["n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params",
                                  "weights_init", "means_init", "precisions_init", "random_state", "warm_start",
                                  "verbose", "verbose_interval"])
def test_same_parameter_names_and_defaults_as_sklearn(name):
    """A user can swap the import: scikit-learn's parameters exist with the same defaults."""
    from sklearn.mixture import GaussianMixture as Sk

    ours, theirs = streamem.GaussianMixture().get_params(), Sk().get_params()
    assert name in ours
    assert ours[name] == theirs[name]


# --------------------------------------- issue 13: clone with a live client
@pytest.fixture(scope="module")
def client(cluster):
    """A real distributed.Client on conftest's shared LocalCluster (bound to loopback)."""
    from distributed import Client

    with Client(cluster) as c:
        yield c


def test_clone_shares_the_client_and_copies_the_rest(client):
    import numpy as np
    from numpy.testing import assert_array_equal
    from sklearn.base import clone

    means = np.array([[0.0, 1.0], [2.0, 3.0]])
    model = streamem.GaussianMixture(n_components=2, client=client, means_init=means, tol=1e-4, random_state=3)
    copy = clone(model)
    assert type(copy) is streamem.GaussianMixture and copy is not model
    assert copy.client is client
    params, copied = model.get_params(deep=False), copy.get_params(deep=False)
    assert set(params) == set(copied)
    for name, value in params.items():
        if name != "means_init":
            assert copied[name] == value, name
    # As scikit-learn does: array parameters are copied, not shared.
    assert copy.means_init is not means
    assert_array_equal(copy.means_init, means)
    # Without a client, the same as scikit-learn's own clone.
    plain = clone(streamem.GaussianMixture(n_components=4, means_init=means))
    assert plain.client is None and plain.n_components == 4 and plain.means_init is not means


def test_grid_search_and_cross_val_score_with_a_client(client):
    import numpy as np
    from numpy.testing import assert_allclose
    from sklearn.model_selection import GridSearchCV, KFold, cross_val_score

    from workflow_helpers import mixture_sample, sklearn_from

    X = mixture_sample(600, seed=5)  # three well separated components
    search = GridSearchCV(
        streamem.GaussianMixture(client=client, max_iter=20, random_state=0), {"n_components": [2, 3]}, cv=2
    ).fit(X)
    assert search.best_params_ == {"n_components": 3}
    best = search.best_estimator_
    assert best.client is client and best.n_components == 3
    # The refitted model's score is scikit-learn's mean log-likelihood with its parameters.
    assert_allclose(best.score(X), sklearn_from(best).score(X), rtol=1e-10)
    scores = cross_val_score(streamem.GaussianMixture(n_components=3, client=client, max_iter=20, random_state=0), X, cv=KFold(2))
    assert scores.shape == (2,) and np.isfinite(scores).all()
    # Each fold scores the held-out half; the two halves of a well separated mixture score alike.
    assert_allclose(scores[0], scores[1], rtol=0.1)
