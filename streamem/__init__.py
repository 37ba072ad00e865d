"""streamem: out-of-core, distributed EM for mixture models on Dask + Zarr."""

import logging

from streamem.data import load_data
from streamem.estimators import (
    BernoulliMixture,
    BinomialMixture,
    CategoricalMixture,
    GaussianMixture,
    MixtureEstimator,
    PoissonMixture,
)
from streamem.io import load_model as load

__version__ = "0.1.0"
__all__ = [
    "BernoulliMixture", "BinomialMixture", "CategoricalMixture", "GaussianMixture", "MixtureEstimator", "PoissonMixture",
    "load", "load_data", "__version__",
]  # fmt: skip

logging.getLogger("streamem").addHandler(logging.NullHandler())
