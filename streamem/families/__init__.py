"""Component families: per-chunk log-probabilities and statistics, M-steps.

A family knows nothing about Dask: it maps numpy blocks to
:class:`streamem.stats.SuffStats` and statistics to parameters. The
protocol a new family implements: :mod:`streamem.families.base`.
"""

from streamem.families.base import MixtureFamily, MixtureParams, family_names, register_family
from streamem.families.discrete import BernoulliFamily, BinomialFamily, CategoricalFamily, PoissonFamily
from streamem.families.gaussian import COVARIANCE_TYPES, GaussianFamily, GaussianParams

__all__ = [
    "COVARIANCE_TYPES", "BernoulliFamily", "BinomialFamily", "CategoricalFamily", "GaussianFamily", "GaussianParams",
    "MixtureFamily", "MixtureParams", "PoissonFamily", "family_names", "register_family",
]  # fmt: skip
