"""streamem: out-of-core, distributed EM for mixture models on Dask + Zarr.

The public names are imported on first use (PEP 562): ``import streamem``
alone does not import Dask, xarray or scikit-learn, so the command line can
answer a Ctrl-C during its imports with one line (:mod:`streamem._entry`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
#: Public name -> (module, attribute).
_PUBLIC = {
    **{name: ("streamem.estimators", name) for name in (
        "BernoulliMixture", "BinomialMixture", "CategoricalMixture", "GaussianMixture", "MixtureEstimator", "PoissonMixture",
    )},
    "load": ("streamem.io", "load_model"),
    "load_data": ("streamem.data", "load_data"),
}  # fmt: skip
__all__ = [*_PUBLIC, "__version__"]

logging.getLogger("streamem").addHandler(logging.NullHandler())

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    """A public name or a submodule (``streamem.families``), imported on first use."""
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name]
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        module, attribute = f"{__name__}.{name}", None
    else:
        raise AttributeError(f"module 'streamem' has no attribute {name!r}")
    # Only the module asked for: ``from streamem import storage`` inside a submodule must not import the estimators
    # (a circular import). streamem.io.load_model registers the built-in estimator classes itself.
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
