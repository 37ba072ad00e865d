"""The family protocol: what a component distribution implements to get every algorithm.

A family maps numpy blocks of rows to additive statistics and statistics to
parameters; it knows nothing about Dask, files or estimators. The estimator
core (:mod:`streamem.estimators.base`), batch and online EM, the
initialisations, predictions, checkpoints, model files, map-reduce and the
command line work through these methods only. A new distribution is a frozen
dataclass subclassing :class:`MixtureFamily` (its settings are fields: it is
pickled to the workers, and :meth:`MixtureFamily.with_settings` copies it),
decorated with :func:`register_family`, implementing (K components, d
features, n rows):

``name``, ``param_names``
    The family's name in model files, checkpoints and on the command line,
    and the names of its parameter arrays besides ``weights`` (the
    estimator's learned attributes are these names with a trailing ``_``).
:meth:`~MixtureFamily.component_log_prob`
    ``log p(x_i | component k)`` of a block, shape (n, K).
:meth:`~MixtureFamily.component_stats`
    The family's additive statistics of a block given responsibilities
    (n, K), a dict of float64 arrays; :meth:`~MixtureFamily.stats_from_resp`
    adds ``n``, ``loglik`` and ``nk`` (the responsibilities summed per
    component).
:meth:`~MixtureFamily.m_step_components`
    The component parameters from summed statistics (the posterior mode,
    with the prior's pseudo-counts, when there is a prior).
:meth:`~MixtureFamily.stats_of_params`
    One row's worth of statistics whose M-step gives the parameters back:
    online EM starts from them.
:meth:`~MixtureFamily.n_component_parameters`, :meth:`~MixtureFamily.sample_component`
    Free parameters per component (BIC/AIC) and draws from one component.

and where the defaults do not fit: :meth:`~MixtureFamily.check_data` (the
values the family accepts), :meth:`~MixtureFamily.log_prior`,
:meth:`~MixtureFamily.default_prior` and :meth:`~MixtureFamily.prior_keys`
(MAP estimation), :meth:`~MixtureFamily.param_dims` and
:meth:`~MixtureFamily.stat_dims` (dimension names in model files and
checkpoints), :meth:`~MixtureFamily.stats_floats` (incremental EM's memory
check), and :meth:`~MixtureFamily.center` / :meth:`~MixtureFamily.recentre`
for statistics accumulated centred at parameters of the E-step (Gaussian).

Shared by every family: the E-step (log-weights plus
``component_log_prob``, log-sum-exp, responsibilities), the statistics of a
chunk, and the weights' M-step (maximum likelihood, a symmetric Dirichlet
prior, or weights kept fixed with ``learn_weights=False``). docs/families.md
describes what the core does with each method, and a complete example (an
exponential mixture, about 50 lines with its estimator).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
from scipy.special import gammaln, logsumexp

from streamem.backend import to_numpy
from streamem.stats import SuffStats

#: scikit-learn's guard against empty components, added to every count.
EPS10 = 10 * np.finfo(np.float64).eps
#: The per-row outputs :meth:`MixtureFamily.row_outputs` can give.
ROW_OUTPUTS = ("log_prob", "labels", "resp", "loglik")

_FAMILIES: dict[str, type["MixtureFamily"]] = {}


def register_family(cls: type["MixtureFamily"]) -> type["MixtureFamily"]:
    """Class decorator: make a family known by its ``name`` (model files and ``--family`` use it)."""
    _FAMILIES[cls.name] = cls
    return cls


def family_names() -> tuple[str, ...]:
    """The names of the registered families, sorted."""
    return tuple(sorted(_FAMILIES))


class MixtureParams(SimpleNamespace):
    """Parameters of a mixture: ``weights`` (K,) and the family's arrays, as attributes."""


@dataclass(frozen=True, eq=False, kw_only=True)
class MixtureFamily:
    """Base class of component families (see the module docstring for the protocol).

    Parameters
    ----------
    prior : dict, optional
        MAP hyperparameters (``None``: maximum likelihood). ``"weight_concentration"``
        is the symmetric Dirichlet's alpha for the weights; the family reads its own keys.
    fixed_weights : ndarray, optional
        Keep the mixing weights at these values instead of learning them.
    """

    name: ClassVar[str] = ""
    param_names: ClassVar[tuple[str, ...]] = ()
    prior: dict | None = None
    fixed_weights: np.ndarray | None = field(default=None, repr=False)

    # ---------------------------------------------------------- to implement
    def component_log_prob(self, X: np.ndarray, params: MixtureParams) -> np.ndarray:
        """``log p(x_i | k)`` for every row and component, shape (n, K)."""
        raise NotImplementedError

    def stats_from_resp(self, X: Any, resp: Any, center: Any = None, *, loglik: float = 0.0) -> SuffStats:
        """Statistics of rows ``X`` with responsibilities ``resp`` (n, K).

        Subclasses implement :meth:`component_stats`; ``center`` matters only
        to families whose statistics are centred (Gaussian).
        """
        X, resp = to_numpy(X), to_numpy(resp)
        arrays = self.component_stats(X, resp)
        return SuffStats({"n": np.float64(len(X)), "loglik": np.float64(loglik), "nk": resp.sum(axis=0), **arrays})

    def component_stats(self, X: np.ndarray, resp: np.ndarray) -> dict[str, np.ndarray]:
        """The family's own additive statistics (``nk`` is added for it)."""
        raise NotImplementedError

    def m_step_components(self, stats: SuffStats) -> dict[str, np.ndarray]:
        """The component parameters (``param_names``) from summed statistics."""
        raise NotImplementedError

    def stats_of_params(self, params: MixtureParams) -> SuffStats:
        """Statistics of one row's worth of data whose M-step gives ``params``."""
        raise NotImplementedError

    def n_component_parameters(self, n_features: int) -> int:
        """Free parameters of one component."""
        raise NotImplementedError

    def param_dims(self, name: str) -> tuple[str, ...]:
        """Dimension names of parameter ``name`` in a model file."""
        return ("component",) if name == "weights" else ("component", "feature")

    def stat_dims(self, name: str) -> tuple[str, ...]:
        """Dimension names of statistic ``name`` (online state in model files and checkpoints)."""
        return {"n": (), "loglik": (), "nk": ("component",)}.get(name, ("component", "feature"))

    def sample_component(self, params: MixtureParams, k: int, n: int, rng: np.random.RandomState) -> np.ndarray:
        """``n`` rows drawn from component ``k``."""
        raise NotImplementedError

    def check_data(self, X: np.ndarray, offset: int = 0) -> None:
        """Refuse values the family cannot model (ValueError naming the rule, the value and its row)."""

    def divergence(self, a: Any, b: Any) -> np.ndarray:
        """Symmetrised Kullback-Leibler divergence between the components of ``a`` and of ``b``, shape (K_a, K_b).

        Used to keep component labels across re-fits (:mod:`streamem.matching`).
        """
        raise NotImplementedError(f"the {self.name!r} family does not define a divergence between components")

    def log_prior(self, params: MixtureParams) -> float:
        """Log-density of the prior at ``params`` (up to a constant); 0 without a prior."""
        return self._weights_log_prior(params.weights)

    # -------------------------------------------------------- shared parts
    def make_params(self, **arrays: np.ndarray) -> MixtureParams:
        return MixtureParams(**arrays)

    def param_arrays(self, params: Any) -> dict[str, np.ndarray]:
        """``weights`` and the family's parameter arrays, by name."""
        return {name: getattr(params, name) for name in ("weights", *self.param_names)}

    def center(self, params: Any) -> np.ndarray | None:
        """Where the statistics of an E-step under ``params`` are centred (None: they are not)."""
        return None

    def recentre(self, stats: SuffStats, old: Any, new: Any) -> SuffStats:
        """The same statistics centred at ``new`` instead of ``old`` (uncentred: unchanged)."""
        return stats

    def log_prob(self, X: Any, params: Any) -> np.ndarray:
        """Weighted log joint ``log w_k + log p(x | k)``, shape (n, K)."""
        with np.errstate(divide="ignore"):
            log_w = np.log(params.weights)
        return self.component_log_prob(to_numpy(X), params) + log_w

    def e_step(self, X: Any, params: Any) -> tuple[Any, Any]:
        """Per-row log-likelihood (n,) and responsibilities (n, K)."""
        return self.row_outputs(X, params, "loglik", "resp")

    def row_outputs(self, X: Any, params: Any, *names: str) -> tuple[Any, ...]:
        """Per-row outputs of ``X``: any of ``log_prob``, ``labels``, ``resp``, ``loglik``."""
        unknown = [name for name in names if name not in ROW_OUTPUTS]
        if unknown:
            raise ValueError(f"names must be among {ROW_OUTPUTS}, got {unknown}")
        log_joint = self.log_prob(X, params)
        loglik = logsumexp(log_joint, axis=1) if len(log_joint) else np.zeros(0)
        with np.errstate(invalid="ignore"):
            resp = np.exp(log_joint - loglik[:, None]) if ("resp" in names) else None
        outs = {"log_prob": log_joint, "labels": log_joint.argmax(axis=1) if len(log_joint) else np.zeros(0, np.int64),
                "resp": resp, "loglik": loglik}  # fmt: skip
        return tuple(outs[name] for name in names)

    def chunk_stats(self, X: Any, params: Any) -> SuffStats:
        """E-step of one block: its statistics and its log-likelihood sum."""
        X = to_numpy(X)
        loglik, resp = self.e_step(X, params)
        return self.stats_from_resp(X, resp, self.center(params), loglik=float(loglik.sum()))

    def m_step(self, stats: SuffStats, center: Any = None) -> Any:
        """New parameters from summed statistics."""
        return self.make_params(weights=self.m_step_weights(stats["nk"]), **self.m_step_components(stats))

    def init_params(self, stats: SuffStats, center: Any, n_samples: int) -> Any:
        """Initial parameters from initial responsibilities (scikit-learn's ``_initialize``).

        Weights are ``nk / n_samples``, not renormalised, as scikit-learn does.
        """
        params = self.m_step(stats, center)
        params.weights = self.m_step_weights(stats["nk"], initial=n_samples)
        return params

    def m_step_weights(self, counts: np.ndarray, initial: int | None = None) -> np.ndarray:
        """Mixing weights from component counts: kept fixed, MAP under the Dirichlet prior, or ML."""
        if self.fixed_weights is not None:
            return np.asarray(self.fixed_weights, dtype=np.float64).copy()
        nk = counts + EPS10
        if initial is not None:
            return nk / initial
        alpha = self._weight_concentration()
        if alpha != 1.0:
            nk = np.maximum(nk + (alpha - 1.0), EPS10)
        return nk / nk.sum()

    def stats_floats(self, n_components: int, n_features: int) -> int:
        """Floats in one set of statistics and its centre (incremental EM keeps one per mini-batch)."""
        return 2 + n_components * (1 + n_features)

    def n_parameters(self, n_components: int, n_features: int) -> int:
        """Free parameters of the mixture (for BIC/AIC)."""
        free_weights = 0 if self.fixed_weights is not None else n_components - 1
        return int(n_components * self.n_component_parameters(n_features) + free_weights)

    def sample(self, params: Any, n_samples: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
        """``n_samples`` rows and their components (scikit-learn's algorithm: multinomial counts, then draws)."""
        counts = rng.multinomial(n_samples, params.weights / params.weights.sum())
        draws = [self.sample_component(params, k, int(n), rng) for k, n in enumerate(counts)]
        y = np.concatenate([np.full(n, k, dtype=int) for k, n in enumerate(counts)])
        return np.vstack(draws), y

    def permute(self, params: Any, order: np.ndarray) -> Any:
        """The same parameters with components in ``order``."""
        arrays = {name: value[order] if "component" in self.param_dims(name) else value
                  for name, value in self.param_arrays(params).items()}  # fmt: skip
        return self.make_params(**arrays)

    def permute_stats(self, stats: dict[str, np.ndarray], order: np.ndarray) -> dict[str, np.ndarray]:
        return {name: value[order] if "component" in self.stat_dims(name) else value for name, value in stats.items()}

    def with_settings(self, **changes: Any) -> "MixtureFamily":
        return replace(self, **changes)

    # ----------------------------------------------------------- the prior
    def _weight_concentration(self) -> float:
        return float((self.prior or {}).get("weight_concentration", 1.0))

    def _weights_log_prior(self, weights: np.ndarray) -> float:
        alpha = self._weight_concentration()
        if self.fixed_weights is not None or alpha == 1.0:
            return 0.0
        return float((alpha - 1.0) * np.log(np.maximum(weights, 1e-300)).sum() + gammaln(alpha * len(weights)) - len(weights) * gammaln(alpha))

    def default_prior(self, n_components: int, sample: np.ndarray) -> dict:
        """Data-driven default hyperparameters (``prior="default"``), from a sample of rows."""
        return {"weight_concentration": 2.0}

    def prior_keys(self) -> tuple[str, ...]:
        """The hyperparameters ``prior=`` may hold."""
        return tuple(self.prior_spec(1))

    def prior_spec(self, n_features: int) -> dict[str, tuple[tuple[int, ...], float]]:
        """Each hyperparameter's shape and the least value it may take (inclusive)."""
        return {"weight_concentration": ((), 1.0)}

    def check_prior(self, prior: dict, n_features: int) -> None:
        """Refuse hyperparameters of the wrong shape or outside their domain, naming the key."""
        for key, (shape, low) in self.prior_spec(n_features).items():
            if key not in prior:
                continue
            value = np.asarray(prior[key], dtype=np.float64)
            if value.shape != shape:
                raise ValueError(f"prior[{key!r}] must have shape {shape} for {n_features} features, got {value.shape}")
            if not np.all(value >= low):
                raise ValueError(f"prior[{key!r}] must be >= {low:g}, got min {value.min():g}")


class DataError(ValueError):
    """Data a family cannot model; ``row`` is the global row of the first offending value.

    A data pass reports the error of the lowest row among its chunks, whatever
    order the chunks ran in.
    """

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row

    def __reduce__(self) -> tuple:  # raised on a worker, re-raised on the client
        return (type(self), (self.args[0], self.row))


def check_integer_values(X: np.ndarray, offset: int, family: str, low: float, high: Any, rule: str) -> None:
    """Refuse values of ``X`` that are not integers in [low, high] (``high`` per feature or scalar), naming the first."""
    high = np.broadcast_to(np.asarray(high, dtype=np.float64), X.shape[1:]) if X.ndim == 2 else high
    with np.errstate(invalid="ignore"):
        bad = ~((X >= low) & (X <= high) & (np.floor(X) == X))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{family}: {rule}; got {X[row, col].item()!r} in row {offset + row}, feature {col}", offset + row)
