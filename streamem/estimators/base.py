"""The estimator core every mixture shares (scikit-learn keeps this in ``BaseMixture``).

Parameter checks, batch and online fits, ``n_init``, ``warm_start``,
predictions, scores, sampling, relabelling, save/load and checkpoints are
written here once, against the family protocol
(:mod:`streamem.families.base`). An estimator class is a thin layer: it
names its family (:meth:`MixtureEstimator._family`), its own parameters
and checks, and its initial-parameter arguments (``*_init``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import replace
from numbers import Integral, Real
from typing import Any, ClassVar, Iterator

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import _check_feature_names, check_is_fitted

from streamem.backend import array_module, check_finite, to_numpy
from streamem.checkpoint import (
    checkpoint_prior,
    checkpoint_exists,
    data_fingerprint,
    fit_settings,
    load_checkpoint,
    prepare_checkpoint,
    save_checkpoint,
)
from streamem.cluster import PERSIST_MODES, resolve_scheduler, should_persist
from streamem.data import InputData, align_features, check_n_samples, load_data
from streamem.em import DataPasses, EMRun, batch_em
from streamem.families.base import MixtureFamily
from streamem.init import DEFAULT_SAMPLE_SIZE, INIT_METHODS, draw_sample, initial_params
from streamem.online import ALGORITHMS, MONITORS, OnlineSettings, incremental_bytes, online_em, steps_for_rows
from streamem.stats import SuffStats

logger = logging.getLogger("streamem")

#: Estimator classes by name, for model files (see :func:`estimator_class`).
_ESTIMATORS: dict[str, type["MixtureEstimator"]] = {}


def estimator_class(name: str) -> type["MixtureEstimator"]:
    """The estimator class a model file names; a ValueError naming the known ones otherwise."""
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown model class {name!r}; known: {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[name]


#: The parameters every estimator has besides ``n_components`` (keyword-only), with their defaults.
COMMON_PARAMS: dict[str, Any] = {
    "tol": 1e-3,
    "max_iter": 100,
    "n_init": 1,
    "init_params": "kmeans",
    "weights_init": None,
    "random_state": None,
    "warm_start": False,
    "verbose": 0,
    "verbose_interval": 10,
    "client": None,
    "init_sample_size": DEFAULT_SAMPLE_SIZE,
    "persist": "auto",
    "algorithm": "batch",
    "batch_size": 1000,
    "step_decay": 0.51,
    "step_offset": 2.0,
    "step_size": None,
    "shuffle": True,
    "average": True,
    "monitor": "online",
    "learn_weights": True,
    "prior": None,
}

#: The docstring of the common parameters (estimators include it in theirs).
COMMON_PARAMS_DOC = """
    tol : float, default=1e-3
        Stop when the mean log-likelihood per sample (plus the log-prior
        per sample, with ``prior``) changes by less.
    max_iter : int, default=100
        EM iterations; for the online algorithms, passes over the data.
    n_init : int, default=1
        Number of initialisations; the best is kept. All runs share the
        data passes.
    init_params : {"kmeans", "k-means++", "random", "random_from_data"}, default="kmeans"
        Initial responsibilities, then one M-step. K-means and k-means++
        run on a uniform random sample of at most ``init_sample_size``
        rows drawn from every chunk.
    weights_init : array-like of shape (n_components,), optional
        Initial mixing weights.
    random_state : int, RandomState instance or None
    warm_start : bool, default=False
        Start from the previous fit's parameters (and online state).
    verbose : int, default=0
        Log one line per ``verbose_interval`` iterations at INFO level.
    verbose_interval : int, default=10
    client : distributed.Client, optional
        Run on this client; by default the active client, else local threads.
    init_sample_size : int, default=100000
        Rows k-means sees at most.
    persist : {"auto", "always", "never"}, default="auto"
        Keep the data in the workers' memory across iterations instead of
        re-reading every chunk in every pass. ``"auto"`` does so when the
        data take at most half the workers' memory (on the local scheduler:
        a quarter of the available memory, and never for numpy input).
    algorithm : {"batch", "stepwise", "incremental"}, default="batch"
        Batch EM (scikit-learn's), or online EM: stepwise (running averages
        of the statistics with decaying steps) or incremental (Neal &
        Hinton: each mini-batch's last statistics are replaced when it is
        revisited; memory: one set of statistics per mini-batch, held on
        the client; a configuration that would take more than a quarter of
        the available memory is refused). For the online algorithms
        ``max_iter`` counts passes over the data and ``tol`` applies to the
        change of the mean log-likelihood per pass (see ``monitor``).
    batch_size : int, default=1000
        Rows per mini-batch of the online algorithms, at most: each chunk is
        cut into ``ceil(rows / batch_size)`` mini-batches of nearly equal
        size (a mini-batch never spans chunks). A mini-batch of ``n`` rows
        counts as ``n / batch_size`` steps, so the weight each row gets does
        not depend on the storage chunking. What makes online EM converge
        is the number of M-steps, so mini-batches must be small: a
        chunk-sized one is far too large. Chosen with ``step_decay`` and
        ``average`` by ``scripts/bench/bench_online.py`` (README, "Online
        EM") on three 16-feature, K=8 sets (4M rows well separated, 4M
        overlapping, 400k in 4 chunks), from random and k-means starts.
    step_decay : float, default=0.51
        ``alpha`` in (0.5, 1] of stepwise EM's steps ``eta_t = (t +
        step_offset) ** -alpha``: smaller takes larger steps and forgets old
        mini-batches faster. With ``average`` (Polyak-Ruppert), steps should
        decay as slowly as the theory allows: they make the progress, the
        average removes their noise. In the benchmark, 1,000 rows and 0.51
        with averaging were within 1e-3 nats/sample of (or above) the batch
        EM optimum after one pass on both 4M sets and after three on the
        400k set; without averaging the noise of such steps kept stepwise
        2e-3 to 1e-2 below it, and with smaller steps (2,000 rows, 0.6 or 0.7) it
        stayed in a poorer optimum of the overlapping set, 5e-3 below.
    step_offset : float, default=2.0
        ``t0 >= 1`` in the steps above (1 makes the first step 1).
    step_size : float, optional
        A constant step in (0, 1] instead of the decaying ones: for drifting
        data, where old rows should be forgotten at a fixed rate.
    shuffle : bool, default=True
        Online passes visit the chunks in an order shuffled per pass (from
        ``random_state``) and the rows of a chunk in a shuffled order
        (stepwise) or its mini-batches in a shuffled order (incremental);
        False: storage order.
    average : bool, default=True
        Stepwise EM: each pass ends at the M-step of the running statistics
        averaged over the mini-batches of the pass's second half
        (Polyak-Ruppert averaging) and the next pass continues from there.
        The running statistics follow the last mini-batches, so their noise
        grows as steps get larger; the average keeps large steps (which
        move fast, and out of poor optima) without that noise.
        :meth:`partial_fit` and :meth:`update` do not average: they follow
        the rows they are given.
    monitor : {"online", "exact"}, default="online"
        The mean log-likelihood an online pass reports: "online" averages
        every mini-batch's log-likelihood under the parameters of its
        E-step (free, but the parameters change during the pass, so it is
        not the batch objective); "exact" computes the log-likelihood of all
        rows under the parameters at the end of the pass (one more pass).
    learn_weights : bool, default=True
        False keeps the mixing weights at ``weights_init`` (equal weights
        if it is not given) through the fit.
    prior : None, "default" or dict, default=None
        None: maximum likelihood. Otherwise MAP-EM: the M-step maximises
        the expected log-likelihood plus the log-prior, and the monitored
        objective (``lower_bound_``) is the mean log-likelihood plus the
        log-prior divided by the number of rows. ``"default"`` takes the
        family's data-driven hyperparameters, computed from the sample the
        initialisation draws (``init_sample_size`` rows; a sample is drawn
        for it when the initialisation needs none) and kept in ``prior_``;
        a dict gives them (keys: see the family, e.g.
        :meth:`streamem.families.GaussianFamily.default_prior`). Every
        family takes ``weight_concentration``, a symmetric Dirichlet on the
        weights.
"""

#: The docstring of the learned attributes every estimator has.
COMMON_ATTRIBUTES_DOC = """
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood per sample at the E-step of the last iteration
        of the best run (plus the log-prior per sample with ``prior``).
    lower_bounds_ : list of float
        The same after every iteration of the best run.
    n_features_in_ : int
    feature_names_in_ : ndarray
        Only when fitted on a pandas DataFrame with string column names.
    feature_coord_ : ndarray or None
        The feature coordinate of an xarray input, when it had one.
    fit_data_ : dict
        Provenance of the training data: source, shape, row chunks, dtype.
    n_data_passes_ : int
        Passes over the data the last fit made (initialisation included).
    tasks_per_pass_ : int
        Dask tasks in the graph of the last pass (chunk reads included).
    prior_ : dict or None
        The prior's hyperparameters the fit used.
    n_steps_ : float
        Online EM's step counter ``t``: rows processed by online EM in units
        of ``batch_size`` (a mini-batch of ``n`` rows counts as ``n /
        batch_size`` steps), or after a batch fit the count at which one
        more mini-batch of the same data gets weight ``batch_size /
        n_samples`` (see :meth:`partial_fit`).
    online_stats_ : dict of ndarray
        The statistics online EM continues from, per row (the family's
        statistics), centred at ``online_center_`` for centred families.
        Saved in model files.
    online_center_ : ndarray or None
    n_rows_seen_ : int
        Rows the model has learnt from: those of the last fit, plus those
        of every later :meth:`partial_fit` or :meth:`update`.
"""


class MixtureEstimator(DensityMixin, BaseEstimator):
    """Base class of the mixture estimators: everything but the family.

    A subclass sets ``family_class`` (a :class:`~streamem.families.base.MixtureFamily`),
    defines ``__init__(self, n_components=1, *, <its own parameters>, **common)``
    storing its own parameters and passing ``common`` on, and overrides
    :meth:`_family_settings` (the family's own settings), and where needed
    :meth:`_check_family_parameters`, :meth:`_user_params` and
    :meth:`_set_derived`. ``_init_arrays`` maps parameter names to the
    ``*_init`` arguments that give them. Subclasses are registered by name
    for :func:`streamem.load`, and their ``__init__`` signature is extended
    with the common parameters, so scikit-learn's ``get_params``,
    ``set_params`` and ``clone`` see every parameter.
    """

    family_class: ClassVar[type[MixtureFamily]] = MixtureFamily
    _init_arrays: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and cls.family_class is not MixtureFamily:
            _ESTIMATORS[cls.__name__] = cls
        if "__init__" not in cls.__dict__:  # inherits a signature extended already
            return
        own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind != p.VAR_KEYWORD]
        common = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value) for name, value in COMMON_PARAMS.items()]
        cls.__init__.__signature__ = inspect.Signature(own + common)

    def __init__(self, n_components: int = 1, **common: Any):
        unknown = sorted(set(common) - set(COMMON_PARAMS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {unknown}")
        self.n_components = n_components
        for name, default in COMMON_PARAMS.items():
            setattr(self, name, common.get(name, default))

    def __sklearn_clone__(self) -> "MixtureEstimator":
        """scikit-learn's ``clone``, except that the clone shares ``client``.

        A ``distributed.Client`` holds connections and asyncio tasks: it
        cannot be deep-copied, and clones made by ``GridSearchCV`` or
        ``cross_val_score`` should run on the same cluster. Every other
        parameter is cloned as scikit-learn does.
        """
        if self.client is None:
            return super().__sklearn_clone__()
        without = copy.copy(self)  # shallow: self keeps its client
        without.client = None
        return without.__sklearn_clone__().set_params(client=self.client)

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        X: Any,
        y: Any = None,
        *,
        variable: str | None = None,
        sample_dim: str | None = None,
        missing_chunks: str = "raise",
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> "MixtureEstimator":
        """Fit the mixture by batch or online EM (``algorithm``).

        Parameters
        ----------
        X : array-like, dask array, zarr.Array, path, URL, zarr store or xarray object
            Data of shape (n_samples, n_features); see :func:`streamem.data.load_data`.
        y : ignored
        variable : str, optional
            The variable of a Zarr group or xarray Dataset holding the data.
        sample_dim : str, optional
            The sample dimension of an xarray input (default: the first).
        missing_chunks : {"raise", "fill"}, default="raise"
            A chunk file missing from a Zarr store is an error naming the
            array and the chunk's rows; ``"fill"`` reads it as the array's
            fill value instead (stores sparse by design). The prediction
            methods take the same keyword, and ``variable``/``sample_dim``.
        checkpoint : str or os.PathLike, optional
            A directory (or a URL such as ``s3://bucket/prefix``) where the
            state of the fit is saved after every iteration of batch EM or
            pass of online EM (see :mod:`streamem.checkpoint`).
        resume : bool, default=False
            Continue from ``checkpoint`` if it holds a state; a state made for
            other data or other settings is refused with a ValueError.
        progress : bool, default=False
            Show a progress bar over the chunks of every pass.
        storage_options : dict, optional
            Options of the fsspec backend for every URL of the call (the
            data's and the checkpoint's): endpoint, region, credentials (see
            :mod:`streamem.storage`). Never written anywhere. The prediction
            methods take it too.

        Returns
        -------
        self
        """
        self._check_parameters()
        continuing = self.warm_start and hasattr(self, "converged_")
        if continuing:
            self.n_rows_seen_ = self._rows_seen()  # before fit_data_ names the new data
            data = self._load(X, variable, sample_dim, reset=False, missing_chunks=missing_chunks, storage_options=storage_options)
            self._record_fit_data(data)
        else:
            data = self._load(X, variable, sample_dim, reset=True, missing_chunks=missing_chunks, storage_options=storage_options)
        check_n_samples(data, self.n_components)
        self._check_online_memory(data)
        self._check_initial_parameters(data.n_features)
        if resume and checkpoint is None:
            raise ValueError("resume=True needs checkpoint= naming the checkpoint directory")
        family = self._family(fitted=continuing)
        scheduler = resolve_scheduler(self.client)
        if checkpoint is not None:
            settings, fingerprint = fit_settings(self), data_fingerprint(data, scheduler)
            prepare_checkpoint(checkpoint, storage_options)  # a directory it may not use is refused before any work
        runs = None
        start_iter = 0
        if resume and checkpoint_exists(checkpoint, storage_options):
            # Refuse a wrong checkpoint before any work starts on the cluster.
            saved, start_iter = load_checkpoint(checkpoint, settings, fingerprint, storage_options)
            family = family.with_settings(prior=checkpoint_prior(checkpoint, storage_options))  # "default": the hyperparameters the fit computed
            runs = [_run_from_arrays(family, *state) for state in saved]
        persist = should_persist(self.persist, data.array.nbytes, data.kind == "numpy", scheduler)
        passes = DataPasses(data, scheduler, progress=progress, persist=persist)

        def save_state(iteration: int, runs: list[EMRun]) -> None:
            save_checkpoint(checkpoint, runs, iteration, family, settings, fingerprint, storage_options)

        rng = check_random_state(self.random_state)
        try:  # the workers let go of persisted chunks however the fit ends
            if runs is None and continuing:
                runs = [self._current_run()]
            elif runs is None:
                family, starts = self._initial_runs(passes, family, rng)
                runs = [EMRun(params) for params in starts]
            common = dict(tol=self.tol, max_iter=self.max_iter, start_iter=start_iter, log_every=self.verbose_interval)
            callback = save_state if checkpoint is not None else None
            with self._logging():
                if self.algorithm == "batch":
                    batch_em(passes, family, runs, callback=callback, **common)
                else:
                    seed = _shuffle_seed(self.random_state)
                    # The rows the running averages stand for (a prior weighs against them): this fit's, and in
                    # an update the rows seen before it; a warm-started re-fit of the same rows learns them once.
                    rows = float(data.n_samples + getattr(self, "_rows_before_update", 0))
                    online_em(passes, family, runs, replace(self._online_settings(), rows=rows), seed=seed, monitor=self.monitor, callback=callback, **common)
        finally:
            passes.close()

        # scikit-learn keeps the first run with the highest final lower bound.
        best = max(range(len(runs)), key=lambda i: (runs[i].lower_bound, -i))
        run = runs[best]
        if not run.converged and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init parameters, "
                "or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
            )
        self._set_params(family, run.params)
        self.converged_ = bool(run.converged)
        self.n_iter_ = int(run.n_iter)
        self.lower_bound_ = float(run.lower_bound)
        self.lower_bounds_ = list(run.lower_bounds)
        self.n_data_passes_ = passes.n_passes
        self.tasks_per_pass_ = passes.tasks_per_pass
        self._set_online_state(run, data.n_samples, batch=self.algorithm == "batch")
        self.n_rows_seen_ = data.n_samples
        return self

    def partial_fit(
        self,
        X: Any,
        y: Any = None,
        *,
        variable: str | None = None,
        sample_dim: str | None = None,
        missing_chunks: str = "raise",
        progress: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> "MixtureEstimator":
        """One stepwise EM pass over the rows of ``X``, in their order, in mini-batches of ``batch_size``.

        The first call (on an unfitted model) initialises from the given
        ``*_init`` arrays or by ``init_params`` on this call's rows (one
        run: ``n_init`` does not apply). Later calls, and calls after
        :meth:`fit` or on a loaded model, continue from the model's online
        state (``online_stats_``, ``n_steps_``): the step counter and the
        running statistics carry over from call to call, so calls over the
        chunks of a data set in order equal one stepwise pass with
        ``shuffle=False``. A model without online state (saved by an older
        streamem) continues as if after a batch fit on the rows it was
        fitted on (``fit_data_``). ``step_size`` makes the steps constant.

        Parameters
        ----------
        X, variable, sample_dim, missing_chunks, progress, storage_options
            As for :meth:`fit`.
        y : ignored

        Returns
        -------
        self
        """
        self._check_parameters()
        first = not hasattr(self, "weights_")
        seen = 0 if first else self._rows_seen()
        data = self._load(X, variable, sample_dim, reset=first, missing_chunks=missing_chunks, storage_options=storage_options)
        if not first:
            self.n_rows_seen_ = seen  # before fit_data_ names the new data
            self._record_fit_data(data)
        family = self._family(fitted=not first)
        scheduler = resolve_scheduler(self.client)
        passes = DataPasses(data, scheduler, progress=progress)
        settings = replace(self._online_settings(), algorithm="stepwise", shuffle=False, average=False, rows=float(seen + data.n_samples))
        rng = check_random_state(self.random_state)
        try:
            if first:
                check_n_samples(data, self.n_components)
                self._check_initial_parameters(data.n_features)
                family, starts = self._initial_runs(passes, family, rng, n_runs=1)
                run = EMRun(starts[0])
                previous: list[float] = []
            else:
                run, previous = self._current_run(), list(self.lower_bounds_)
            with self._logging():
                online_em(passes, family, [run], settings, tol=0.0, max_iter=1, seed=0, log_every=self.verbose_interval)
        finally:
            passes.close()
        self._set_params(family, run.params)
        self.converged_ = False
        self.n_iter_ = len(previous) + 1
        self.lower_bound_ = float(run.lower_bound)
        self.lower_bounds_ = previous + [self.lower_bound_]
        self.n_data_passes_ = passes.n_passes
        self.tasks_per_pass_ = passes.tasks_per_pass
        self._set_online_state(run, data.n_samples)
        self.n_rows_seen_ = seen + data.n_samples
        return self

    def update(
        self,
        X: Any,
        *,
        step_size: float | None = None,
        passes: int = 1,
        variable: str | None = None,
        sample_dim: str | None = None,
        missing_chunks: str = "raise",
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> "MixtureEstimator":
        """Fold new rows into the fitted model by stepwise EM, reading only them.

        What a scheduled job does with the rows that arrived since the last
        run. Component ``k`` stays component ``k`` (the fit continues from
        the model's parameters and online state). By default every
        mini-batch of ``b`` rows gets step ``b / (rows seen so far)``: a
        running average over all rows the model has learnt from
        (``n_rows_seen_``), right for data from a fixed distribution, where
        it ends near a batch re-fit on all rows. ``step_size`` (or the
        estimator's ``step_size``) gives a constant step instead, for
        drifting data: old rows are forgotten at that rate. The mini-batches
        are shuffled as in :meth:`fit` (``shuffle``, ``random_state``).

        Parameters
        ----------
        X, variable, sample_dim, missing_chunks, checkpoint, resume, progress, storage_options
            As for :meth:`fit`: the new rows only.
        step_size : float, optional
            A constant step in (0, 1].
        passes : int, default=1
            Passes over the new rows (each pass counts them again as seen).

        Returns
        -------
        self
        """
        check_is_fitted(self)
        _check_int("passes", passes, 1)
        settings = self.get_params()
        learned = {name: value for name, value in vars(self).items() if name.endswith("_")}
        seen = self._rows_seen()
        step_size = self.step_size if step_size is None else step_size
        try:
            self.set_params(**self._update_params(step_size, passes))
            if step_size is None:
                self._check_parameters()
                self.n_steps_ = steps_for_rows(seen, self._online_settings())
            self._rows_before_update = seen
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0: a fixed number of passes
                self.fit(X, variable=variable, sample_dim=sample_dim, missing_chunks=missing_chunks,
                         checkpoint=checkpoint, resume=resume, progress=progress, storage_options=storage_options)  # fmt: skip
        except BaseException:
            for name in [name for name in vars(self) if name.endswith("_")]:  # a failed update changes nothing
                delattr(self, name)
            vars(self).update(learned)
            raise
        finally:
            vars(self).pop("_rows_before_update", None)
            self.set_params(**settings)
        self.n_rows_seen_ = seen + passes * self.fit_data_["shape"][0]
        return self

    def fit_predict(self, X: Any, y: Any = None, **kwargs: Any) -> Any:
        """Fit (``kwargs`` as for :meth:`fit`), then return the most likely component of every row.

        The labels read ``X`` as the fit did: every keyword of :meth:`fit`
        that describes the data (``variable``, ``sample_dim``,
        ``missing_chunks``) is passed on to :meth:`predict`.
        """
        import inspect

        self.fit(X, **kwargs)
        # The prediction methods take exactly the data keywords of _load_fitted: pass on all of them, so a
        # keyword added there cannot be forgotten here (lazy labels read the data again when computed).
        reading = inspect.signature(self._load_fitted).parameters
        return self.predict(X, **{name: value for name, value in kwargs.items() if name in reading and name != "X"})

    # -------------------------------------------------------------- predict
    def predict(self, X: Any, **kwargs: Any) -> Any:
        """Most likely component of every row (lazy for dask/zarr/xarray input)."""
        data = self._load_fitted(X, **kwargs)
        out = data.array.map_blocks(_block_labels, self._family(), self._params(), dtype=np.int64, drop_axis=1)
        return data.wrap_rows(out)

    def predict_proba(self, X: Any, **kwargs: Any) -> Any:
        """Posterior probability of each component for every row, shape (n_samples, n_components)."""
        data = self._load_fitted(X, **kwargs)
        out = data.array.map_blocks(
            _block_proba,
            self._family(),
            self._params(),
            dtype=np.float64,
            chunks=(data.array.chunks[0], (self.n_components,)),
        )
        return data.wrap_rows(out, "component")

    def score_samples(self, X: Any, **kwargs: Any) -> Any:
        """Log-likelihood of every row under the model."""
        data = self._load_fitted(X, **kwargs)
        out = data.array.map_blocks(_block_loglik, self._family(), self._params(), dtype=np.float64, drop_axis=1)
        return data.wrap_rows(out)

    def score(self, X: Any, y: Any = None, **kwargs: Any) -> float:
        """Mean log-likelihood per row (one data pass)."""
        data = self._load_fitted(X, **kwargs)
        return self._total_loglik(data) / data.n_samples

    def bic(self, X: Any, **kwargs: Any) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        data = self._load_fitted(X, **kwargs)
        n_params = self._family().n_parameters(self.n_components, self.n_features_in_)
        return -2.0 * self._total_loglik(data) + n_params * np.log(data.n_samples)

    def aic(self, X: Any, **kwargs: Any) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        data = self._load_fitted(X, **kwargs)
        n_params = self._family().n_parameters(self.n_components, self.n_features_in_)
        return -2.0 * self._total_loglik(data) + 2.0 * n_params

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n_samples`` rows from the fitted model (scikit-learn's algorithm).

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,)
            The component of every row.
        """
        check_is_fitted(self)
        if not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        return self._family().sample(self._params(), n_samples, check_random_state(self.random_state))

    def permute_components(self, order: Any) -> "MixtureEstimator":
        """Relabel components so that new component ``k`` is old component ``order[k]``.

        Returns
        -------
        self
        """
        check_is_fitted(self)
        order = np.asarray(order)
        if sorted(order.tolist()) != list(range(self.n_components)):
            raise ValueError(f"order must be a permutation of range({self.n_components}), got {order.tolist()}")
        family = self._family()
        self._set_params(family, family.permute(self._params(), order))
        if getattr(self, "online_stats_", None) is not None:  # the online state follows its components
            self.online_stats_ = family.permute_stats(self.online_stats_, order)
            if self.online_center_ is not None:
                self.online_center_ = self.online_center_[order]
        if self.learn_weights is False and self.weights_init is not None:
            self.weights_init = np.asarray(self.weights_init)[order]
        return self

    def save(self, path: Any, *, overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> None:
        """Save the fitted model as an xarray Dataset in a Zarr store.

        The store is written under a temporary name and renamed into place;
        at a URL or in a zarr store object it is written with its root
        metadata last, so it appears complete or not at all (see
        :mod:`streamem.storage`).

        Parameters
        ----------
        path : str, os.PathLike, URL or zarr store
        overwrite : bool, default=False
            Replace an existing store; otherwise an existing path is an error.
        storage_options : dict, optional
            Options of a URL's fsspec backend (never written into the file).
        """
        from streamem.io import save_model

        save_model(self, path, overwrite=overwrite, storage_options=storage_options)

    # -------------------------------------------------------------- helpers
    def _family_settings(self) -> dict[str, Any]:
        """The family's own settings (a subclass's parameters)."""
        return {}

    def _family(self, fitted: bool = True) -> MixtureFamily:
        """The family with this estimator's settings (``fitted``: with the prior the fit used)."""
        if isinstance(self.prior, str):  # "default": the hyperparameters the fit computed, once fitted
            prior = getattr(self, "prior_", None) if fitted and hasattr(self, "weights_") else None
        else:
            prior = self.prior
        fixed = None
        if self.learn_weights is False:
            fixed = np.full(self.n_components, 1.0 / self.n_components) if self.weights_init is None else np.asarray(self.weights_init, float)
        return self.family_class(**self._family_settings(), prior=prior, fixed_weights=fixed)

    def _params(self) -> Any:
        names = ("weights", *self.family_class.param_names)
        return self._family().make_params(**{name: getattr(self, f"{name}_") for name in names})

    def _set_params(self, family: MixtureFamily, params: Any) -> None:
        for name, value in family.param_arrays(params).items():
            setattr(self, f"{name}_", value)
        self.prior_ = family.prior
        self._set_derived(family)

    def _set_derived(self, family: MixtureFamily) -> None:
        """Learned attributes computed from the parameters (Gaussian: ``precisions_``)."""

    def _update_params(self, step_size: float | None, passes: int) -> dict[str, Any]:
        """The settings :meth:`update` fits with (also what its checkpoints record)."""
        params = dict(algorithm="stepwise", warm_start=True, max_iter=passes, tol=0.0, step_size=step_size, average=False)
        if step_size is None:  # a running average: eta = 1 / (t + t0) with t + t0 = rows seen / batch_size
            params["step_decay"] = 1.0
        return params

    def _online_settings(self) -> OnlineSettings:
        algorithm = "stepwise" if self.algorithm == "batch" else self.algorithm
        return OnlineSettings(
            algorithm, int(self.batch_size), float(self.step_decay), float(self.step_offset),
            None if self.step_size is None else float(self.step_size), bool(self.shuffle),
            average=algorithm == "stepwise" and bool(self.average),
        )  # fmt: skip

    def _rows_seen(self) -> int:
        """Rows learnt from; for a model saved before this was kept, the rows of its fit."""
        seen = getattr(self, "n_rows_seen_", None)
        return int(seen) if seen is not None else int(getattr(self, "fit_data_", {}).get("shape", [0])[0])

    def _current_run(self) -> EMRun:
        """The fitted model as a run to continue: parameters and online state."""
        run = EMRun(self._params(), lower_bound=self.lower_bound_)
        state = getattr(self, "online_stats_", None)
        if state is not None:
            run.stats = SuffStats({"n": np.float64(1.0), "loglik": np.float64(0.0), **state})
            run.center, run.n_steps = self.online_center_, float(self.n_steps_)
        else:  # a model saved before online EM: as if after a batch fit on its data
            run.n_steps = steps_for_rows(self._rows_seen(), self._online_settings())
        return run

    def _set_online_state(self, run: EMRun, n_samples: int, *, batch: bool = False) -> None:
        """Keep what online EM continues from: statistics per row, their centre, the step counter.

        After batch EM (``batch``) the counter is set so that one more
        mini-batch of the same data would weigh its share of the rows.
        """
        if run.stats is None or run.stats.n <= 0:
            self.online_stats_, self.online_center_ = None, None
            self.n_steps_ = float(run.n_steps)
            return
        per_row = run.stats * (1.0 / run.stats.n)
        self.online_stats_ = {name: value for name, value in per_row.arrays.items() if name not in ("n", "loglik")}
        self.online_center_ = None if run.center is None else np.asarray(run.center, dtype=np.float64)
        if batch:
            self.n_steps_ = steps_for_rows(n_samples, self._online_settings())
        else:
            self.n_steps_ = float(run.n_steps)

    def _check_online_memory(self, data: InputData) -> None:
        """Refuse an incremental configuration whose per-mini-batch statistics would not fit."""
        if self.algorithm != "incremental":
            return
        import psutil

        floats = self._family().stats_floats(self.n_components, data.n_features)
        need = self.n_init * incremental_bytes(data.array.chunks[0], int(self.batch_size), floats)
        have = psutil.virtual_memory().available
        if need > have / 4:
            raise ValueError(
                f"algorithm='incremental' keeps one set of statistics per mini-batch: with batch_size={self.batch_size} "
                f"and n_init={self.n_init} that is {need / 2**30:.2f} GiB, more than a quarter of the available memory "
                f"({have / 2**30:.1f} GiB); increase batch_size or use algorithm='stepwise'"
            )

    def _record_fit_data(self, data: InputData) -> None:
        self.fit_data_ = {
            "source": data.source,
            "shape": list(data.array.shape),
            "row_chunks": [int(c) for c in data.array.chunks[0]],
            "dtype": str(data.array.dtype),
        }

    def _load(
        self,
        X: Any,
        variable: str | None,
        sample_dim: str | None,
        *,
        reset: bool,
        missing_chunks: str = "raise",
        storage_options: dict[str, Any] | None = None,
    ) -> InputData:
        """Load ``X`` (see :func:`streamem.data.load_data`); at fit record its features, after fit check them.

        After fit, xarray input with a feature coordinate has its columns put
        in the order seen at fit (other labels are refused); other input is
        taken in position order. DataFrame column names are scikit-learn's
        business, for every kind of input: a refit on input without names
        forgets the old ones.
        """
        data = load_data(X, variable=variable, sample_dim=sample_dim, missing_chunks=missing_chunks, storage_options=storage_options)
        _check_feature_names(self, X, reset=reset)
        if reset:
            self.n_features_in_ = data.n_features
            self.feature_coord_ = data.feature_coord
            self._record_fit_data(data)
            return data
        data = align_features(data, getattr(self, "feature_coord_", None))
        if data.n_features != self.n_features_in_:
            raise ValueError(
                f"X has {data.n_features} features, but {type(self).__name__} "
                f"is expecting {self.n_features_in_} features as input"
            )
        return data

    def _load_fitted(
        self,
        X: Any,
        variable: str | None = None,
        sample_dim: str | None = None,
        missing_chunks: str = "raise",
        storage_options: dict[str, Any] | None = None,
    ) -> InputData:
        """The input of a prediction method; its keywords are those of :meth:`fit` that describe the data."""
        check_is_fitted(self)
        return self._load(X, variable, sample_dim, reset=False, missing_chunks=missing_chunks, storage_options=storage_options)

    def _total_loglik(self, data: InputData) -> float:
        passes = DataPasses(data, "threads" if data.kind == "numpy" else resolve_scheduler(self.client))
        return float(passes.run(_block_loglik_sum, (self._family(), self._params()), _add_floats))

    def _initial_runs(
        self, passes: DataPasses, family: MixtureFamily, rng: np.random.RandomState, n_runs: int | None = None
    ) -> tuple[MixtureFamily, list[Any]]:
        """The family (with the default prior resolved) and the initial parameters of ``n_runs`` runs (default ``n_init``)."""
        n_runs = self.n_init if n_runs is None else n_runs
        if not isinstance(self.prior, str):
            given = self._user_params(family, None)
            runs = [copy.copy(given) for _ in range(n_runs)] if given is not None else initial_params(
                passes, family, self.n_components, self.init_params, rng, n_runs, self.init_sample_size)
            return family, [self._user_params(family, params) for params in runs]
        # prior="default": hyperparameters from the sample the initialisation draws
        chosen: list[MixtureFamily] = []

        def family_of_sample(sample: np.ndarray) -> MixtureFamily:
            chosen.append(family.with_settings(prior=family.default_prior(self.n_components, sample)))
            return chosen[-1]

        given = self._user_params(family, None)
        if given is not None or self.init_params == "random_from_data":  # no sample drawn: one of its own seed
            seed = np.random.RandomState(_shuffle_seed(self.random_state))
            family_of_sample(draw_sample(passes, self.init_sample_size, seed, family.check_data))
        if given is not None:
            return chosen[0], [copy.copy(given) for _ in range(n_runs)]
        runs = initial_params(passes, chosen[0] if chosen else family, self.n_components, self.init_params, rng, n_runs,
                              self.init_sample_size, None if chosen else family_of_sample)  # fmt: skip
        return chosen[0], [self._user_params(chosen[0], params) for params in runs]

    def _user_params(self, family: MixtureFamily, params: Any) -> Any:
        """Parameters with the user-given ``*_init`` arrays put in.

        With ``params=None``: complete parameters when every ``*_init`` is
        given (no initialisation pass is needed), else None.
        """
        given = {name: getattr(self, arg) for name, arg in {"weights": "weights_init", **self._init_arrays}.items()}
        if params is None:
            if any(v is None for v in given.values()):
                return None
            return family.make_params(**{name: np.asarray(v, dtype=np.float64) for name, v in given.items()})
        for name, value in given.items():
            if value is not None:
                setattr(params, name, np.asarray(value, dtype=np.float64))
        return params

    @contextmanager
    def _logging(self) -> Iterator[None]:
        """With ``verbose``, show the driver's INFO lines (on stderr unless logging is configured)."""
        if not self.verbose:
            yield
            return
        configured = [h for h in logger.handlers if not isinstance(h, logging.NullHandler)] or logging.getLogger().handlers
        handler = None
        if not configured:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("streamem: %(message)s"))
            logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            if handler is not None:
                logger.removeHandler(handler)
            logger.setLevel(level)

    # ----------------------------------------------------------- validation
    def _check_parameters(self) -> None:
        _check_int("n_components", self.n_components, 1)
        _check_int("n_init", self.n_init, 1)
        _check_int("max_iter", self.max_iter, 0)
        _check_int("verbose_interval", self.verbose_interval, 1)
        _check_int("init_sample_size", self.init_sample_size, 1)
        if self.init_sample_size < self.n_components:
            raise ValueError(
                f"init_sample_size={self.init_sample_size!r} must be >= n_components={self.n_components!r}: "
                "the initialisation needs at least one sampled row per component"
            )
        _check_real("tol", self.tol, 0.0)
        _check_random_state(self.random_state)
        if self.persist not in PERSIST_MODES:
            raise ValueError(f"persist must be one of {PERSIST_MODES}, got {self.persist!r}")
        if self.init_params not in INIT_METHODS:
            raise ValueError(f"init_params must be one of {INIT_METHODS}, got {self.init_params!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")
        _check_int("batch_size", self.batch_size, 1)
        if isinstance(self.step_decay, bool) or not isinstance(self.step_decay, Real) or not 0.5 < self.step_decay <= 1.0:
            raise ValueError(f"step_decay must be a number in (0.5, 1], got {self.step_decay!r}")
        _check_real("step_offset", self.step_offset, 1.0)
        if self.step_size is not None and (
            isinstance(self.step_size, bool) or not isinstance(self.step_size, Real) or not 0.0 < self.step_size <= 1.0
        ):
            raise ValueError(f"step_size must be None or a number in (0, 1], got {self.step_size!r}")
        for name in ("shuffle", "average", "learn_weights"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_prior()
        self._check_family_parameters()

    def _check_prior(self) -> None:
        if self.prior is None or self.prior == "default":
            return
        allowed = self._family(fitted=False).prior_keys()
        if not isinstance(self.prior, dict):
            raise ValueError(f"prior must be None, 'default' or a dict of hyperparameters {allowed}, got {self.prior!r}")
        unknown = sorted(set(self.prior) - set(allowed))
        missing = sorted(set(allowed) - set(self.prior) - {"weight_concentration"})
        if unknown or missing:
            raise ValueError(f"prior: unknown keys {unknown}, missing keys {missing}; a {type(self).__name__} prior holds {allowed}")
        for key, value in self.prior.items():
            arr = np.asarray(value, dtype=np.float64) if not isinstance(value, str) else np.array(np.nan)
            if not np.isfinite(arr).all():
                raise ValueError(f"prior[{key!r}] must be finite numbers, got {value!r}")
        alpha = self.prior.get("weight_concentration", 1.0)
        if not alpha >= 1.0:
            raise ValueError(f"prior['weight_concentration'] must be >= 1 (1: no prior on the weights), got {alpha!r}")

    def _check_family_parameters(self) -> None:
        """A subclass's checks of its own parameters."""

    def _check_initial_parameters(self, n_features: int) -> None:
        K = self.n_components
        if self.weights_init is not None:
            w = _as_shape("weights_init", self.weights_init, (K,))
            if np.any(w < 0) or np.any(w > 1):
                raise ValueError(f"weights_init must lie in [0, 1], got min {w.min()}, max {w.max()}")
            if not np.isclose(w.sum(), 1.0, rtol=0, atol=1e-8):
                raise ValueError(f"weights_init must sum to 1, got {w.sum():.10g}")
        if isinstance(self.prior, dict):
            self._family(fitted=False).check_prior(self.prior, n_features)
        self._check_family_init(n_features)

    def _check_family_init(self, n_features: int) -> None:
        """A subclass's checks of its ``*_init`` arrays."""


def _shuffle_seed(random_state: Any) -> int:
    """The seed of online EM's shuffles: the same for the same int ``random_state``, whatever the initialisation drew."""
    return int(check_random_state(random_state).randint(2**31 - 1))


def _run_from_arrays(
    family: MixtureFamily, arrays: dict[str, np.ndarray], lower_bound: float, lower_bounds: list[float], n_iter: int, converged: bool
) -> EMRun:
    """A run from a checkpoint's arrays (online state included when it was saved)."""
    params = family.make_params(**{name: arrays[name] for name in ("weights", *family.param_names)})
    run = EMRun(params, lower_bound, lower_bounds, n_iter, converged)
    online = {name[len("online_"):]: value for name, value in arrays.items() if name.startswith("online_") and name != "online_center"}
    if online:
        run.stats = SuffStats({"n": np.float64(1.0), "loglik": np.float64(0.0), **online})
        run.center, run.n_steps = arrays.get("online_center"), float(arrays["n_steps"])
    return run


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_real(name: str, value: Any, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")


def _check_random_state(value: Any) -> None:
    """What ``check_random_state`` takes, refused here before any work rather than when the fit first draws."""
    if value is None or isinstance(value, np.random.RandomState):
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < 2**32:
        raise ValueError(f"random_state must be None, an int in [0, 2**32 - 1] or a numpy RandomState, got {value!r}")


def _as_shape(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


# Per-chunk functions for predictions: module level so that workers can unpickle them.
def _per_row(block: Any, family: MixtureFamily, params: Any, name: str, block_info: dict | None = None) -> Any:
    """One per-row output of ``family.row_outputs`` (evaluated in slices); host results for host chunks."""
    offset = block_info[0]["array-location"][0][0] if block_info else 0
    check_finite(block, offset)
    family.check_data(block, offset)
    out = family.row_outputs(block, params, name)[0]
    return to_numpy(out) if array_module(block) is np else out


def _block_proba(block: Any, family: MixtureFamily, params: Any, block_info: dict | None = None) -> Any:
    return _per_row(block, family, params, "resp", block_info)


def _block_labels(block: Any, family: MixtureFamily, params: Any, block_info: dict | None = None) -> Any:
    return _per_row(block, family, params, "labels", block_info)


def _block_loglik(block: Any, family: MixtureFamily, params: Any, block_info: dict | None = None) -> Any:
    return _per_row(block, family, params, "loglik", block_info)


def _block_loglik_sum(block: Any, offset: int, payload: tuple[MixtureFamily, Any]) -> float:
    family, params = payload
    return float(_per_row(block, family, params, "loglik", {0: {"array-location": [(offset, offset + len(block))]}}).sum())


def _add_floats(a: float, b: float) -> float:
    return a + b
