"""Where ``GaussianMixture`` lived before the estimator core (:mod:`streamem.estimators`): kept for imports."""

from streamem.estimators.gaussian import GaussianMixture

__all__ = ["GaussianMixture"]
