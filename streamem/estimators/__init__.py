"""Mixture estimators: one core (:mod:`streamem.estimators.base`) and a thin class per family."""

from streamem.estimators.base import MixtureEstimator, estimator_class
from streamem.estimators.discrete import BernoulliMixture, BinomialMixture, CategoricalMixture, PoissonMixture
from streamem.estimators.gaussian import GaussianMixture

__all__ = [
    "BernoulliMixture", "BinomialMixture", "CategoricalMixture", "GaussianMixture", "MixtureEstimator", "PoissonMixture",
    "estimator_class",
]  # fmt: skip
