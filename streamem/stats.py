"""Additive sufficient statistics.

Every model's E-step over a block of rows produces a :class:`SuffStats`; the
statistics of a union of blocks are the sum of the blocks' statistics. Batch
EM sums them over all chunks and map-reduce jobs write them to disk and add
them later; stepwise EM averages them with weights and incremental EM
subtracts a mini-batch's old statistics before adding its new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass
class SuffStats:
    """Named float64 arrays that add element-wise.

    Besides the model's own statistics, every instance carries ``n`` (rows
    seen) and ``loglik`` (sum of per-row log-likelihoods under the parameters
    of the E-step), so one data pass gives both the M-step input and the EM
    lower bound.
    """

    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __add__(self, other: "SuffStats") -> "SuffStats":
        if self.arrays.keys() != other.arrays.keys():
            raise ValueError(f"cannot add statistics with fields {sorted(self.arrays)} and {sorted(other.arrays)}")
        return SuffStats({k: v + other.arrays[k] for k, v in self.arrays.items()})

    def __sub__(self, other: "SuffStats") -> "SuffStats":
        return self + other * -1.0

    def __mul__(self, factor: float) -> "SuffStats":
        """Every array times ``factor`` (stepwise EM's weighted averages)."""
        return SuffStats({k: v * factor for k, v in self.arrays.items()})

    @property
    def n(self) -> float:
        return float(self.arrays["n"])

    @property
    def loglik(self) -> float:
        return float(self.arrays["loglik"])


def sum_in_order(parts: Iterable[SuffStats]) -> SuffStats:
    """Sum statistics left to right (the order fixes the rounding)."""
    parts = iter(parts)
    total = next(parts)
    for part in parts:
        total = total + part
    return total
