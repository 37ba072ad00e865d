"""Keep component labels stable across re-fits by matching components."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def match_components(reference: Any, model: Any) -> np.ndarray:
    """The permutation ``perm`` such that ``model``'s component ``perm[k]`` matches ``reference``'s ``k``.

    Components are paired by minimum total symmetric KL divergence (Hungarian
    algorithm), as the family defines it (``family.divergence``). Both
    models must be of the same family, number of components and features.
    """
    family = reference._family()
    a, b = reference._params(), model._params()
    shapes = [tuple(np.shape(v) for v in family.param_arrays(p).values()) for p in (a, b)]
    if type(model._family()) is not type(family) or shapes[0] != shapes[1]:
        raise ValueError(f"cannot match a {type(model).__name__} with parameters of shapes {shapes[1]} to a "
                         f"{type(reference).__name__} with {shapes[0]}")  # fmt: skip
    rows, cols = linear_sum_assignment(family.divergence(a, b))
    return cols[np.argsort(rows)]
