"""streamem: out-of-core, distributed EM for mixture models on Dask + Zarr."""

import logging

from streamem.data import load_data
from streamem.io import load_model as load
from streamem.mixture import GaussianMixture

__version__ = "0.1.0"
__all__ = ["GaussianMixture", "load", "load_data", "__version__"]

logging.getLogger("streamem").addHandler(logging.NullHandler())
