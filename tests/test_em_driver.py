"""The batch EM driver loop: its stopping rule, and settings refused before any work."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import streamem
from streamem.data import load_data
from streamem.em import DataPasses, EMRun, batch_em
from streamem.stats import SuffStats


@dataclass
class _Step:
    """Parameters of the scripted family: just the position in the sequence."""

    index: int
    means: np.ndarray


class _ScriptedFamily:
    """A family whose mean log-likelihood at step i is ``bounds[i]``, whatever the data.

    It drives the real DataPasses and batch_em; only the statistics are scripted, so
    the stopping rule can be tested on a sequence constructed by hand.
    """

    def __init__(self, bounds: list[float]):
        self.bounds = bounds

    def chunk_stats(self, X: np.ndarray, params: _Step) -> SuffStats:
        n = float(len(X))
        return SuffStats({"n": np.float64(n), "loglik": np.float64(self.bounds[params.index] * n)})

    def m_step(self, stats: SuffStats, center: np.ndarray) -> _Step:
        return _Step(self._index + 1, center)

    # The rest of the family protocol the driver uses (streamem.families.base.MixtureFamily).
    def check_data(self, X: np.ndarray, offset: int) -> None:
        pass

    def log_prior(self, params: _Step) -> float:
        return 0.0

    def center(self, params: _Step) -> np.ndarray:
        return params.means

    def run(self, passes: DataPasses, tol: float, max_iter: int) -> EMRun:
        run = EMRun(_Step(0, np.zeros((1, 1))))
        self._index = 0

        def track(iteration: int, runs: list[EMRun]) -> None:
            self._index = runs[0].params.index

        batch_em(passes, self, [run], tol=tol, max_iter=max_iter, callback=track)
        return run


def _passes() -> DataPasses:
    # Values in binary fractions: every mean is exact, so "change == tol" is exact.
    X = np.ones((64, 1))
    return DataPasses(load_data(X, chunk_rows=16), "sync")


def test_stops_only_when_change_is_strictly_below_tol():
    # Changes: 0.5, 0.25 (== tol: go on, as scikit-learn's `abs(change) < tol`), 0.125 (< tol: stop).
    family = _ScriptedFamily([-2.0, -1.5, -1.25, -1.125, -1.0625, -1.0])
    run = family.run(_passes(), tol=0.25, max_iter=10)
    assert run.lower_bounds == [-2.0, -1.5, -1.25, -1.125]
    assert run.converged and run.n_iter == 4


def test_change_equal_to_tol_is_not_convergence():
    family = _ScriptedFamily([-2.0, -1.75, -1.5, -1.25, -1.0])
    run = family.run(_passes(), tol=0.25, max_iter=4)
    assert not run.converged and run.n_iter == 4


def test_decrease_counts_by_absolute_change():
    # A drop larger than tol is not convergence; a small drop is.
    family = _ScriptedFamily([-1.0, -1.5, -1.625, -1.6])
    run = family.run(_passes(), tol=0.25, max_iter=10)
    assert run.lower_bounds == [-1.0, -1.5, -1.625]
    assert run.converged and run.n_iter == 3


def test_max_iter_zero_runs_no_iteration():
    family = _ScriptedFamily([-1.0])
    run = family.run(_passes(), tol=0.25, max_iter=0)
    assert run.lower_bounds == [] and run.n_iter == 0 and not run.converged


@pytest.mark.parametrize("size", [1, 4])
def test_init_sample_smaller_than_n_components_is_refused(size):
    X = np.random.RandomState(0).standard_normal((10_000, 2))
    model = streamem.GaussianMixture(n_components=5, init_sample_size=size)
    with pytest.raises(ValueError, match=rf"init_sample_size={size} must be >= n_components=5"):
        model.fit(X)
