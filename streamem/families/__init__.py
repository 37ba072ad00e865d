"""Component families: per-chunk log-probabilities and statistics, M-steps.

A family knows nothing about Dask: it maps numpy blocks to
:class:`streamem.stats.SuffStats` and statistics to parameters.
"""

from streamem.families.gaussian import COVARIANCE_TYPES, GaussianFamily, GaussianParams

__all__ = ["COVARIANCE_TYPES", "GaussianFamily", "GaussianParams"]
