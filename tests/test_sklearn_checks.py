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
