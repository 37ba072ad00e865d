"""The ``streamem`` command line: fit, predict, score, info, generate, plot, accumulate, reduce.

Exit status: 0 on success, 2 on bad input or usage, or a path that cannot
be read or written (one line on stderr), 1 on anything unexpected (with a
traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np

logger = logging.getLogger("streamem")


class UsageError(Exception):
    """Bad input or usage: reported in one line, exit status 2."""


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Option:
    """One ``fit`` setting: a command-line flag and a YAML key of the same name.

    ``type`` is what a YAML value may be (a tuple: any of them); ``parse``
    reads the flag's text when that is not simply ``type(text)``. An
    ``estimator`` option is passed to the estimator of the chosen family,
    and only an estimator that has a parameter of that name takes it.
    """

    name: str
    type: type | tuple[type, ...]
    help: str
    choices: tuple[str, ...] | None = None
    estimator: bool = True  # passed to the family's estimator, e.g. PoissonMixture(...)
    parse: Callable[[str], Any] | None = None
    negatable: bool = False  # a bool flag with a --no- form (to turn off a default, or a config's true)


def _family_estimators() -> dict[str, type]:
    """The estimator class of every family, by family name (``--family``)."""
    import streamem.estimators as estimators

    classes = (getattr(estimators, name) for name in estimators.__all__)
    return {cls.family_class.name: cls for cls in classes
            if isinstance(cls, type) and issubclass(cls, estimators.MixtureEstimator) and cls.family_class.name}  # fmt: skip


#: ``--family`` choices and their estimators (streamem.estimators: one class per registered family).
FAMILY_ESTIMATORS = _family_estimators()
DEFAULT_FAMILY = "gaussian"


def _int_or_ints(text: str) -> int | list[int]:
    """``"10"`` or ``"8,10,8"`` (one per feature) as an int or a list of ints."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"expected an int or comma-separated ints (one per feature), got {text!r}") from None
    return values if "," in text else values[0]


def _read_prior(value: str | dict) -> str | dict:
    """``prior``: ``"default"``, a JSON/YAML file of hyperparameters, or (YAML) a mapping; lists become arrays."""
    import yaml

    if value == "default":
        return value
    if isinstance(value, str):
        try:
            with open(os.path.expanduser(value), encoding="utf-8") as fh:
                value = yaml.safe_load(fh)  # YAML reads JSON too
        except OSError as exc:
            raise ValueError(f"cannot read {value!r}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{value!r} is not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{value!r} is neither JSON nor YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be 'default' or a mapping of hyperparameters, got {value!r}")
    return {str(k): np.asarray(v, dtype=np.float64) if isinstance(v, list) else v for k, v in value.items()}


MISSING_CHUNKS_HELP = ("a chunk file missing from a Zarr store: an error (raise, the default), "
                       "or read as the array's fill value (fill; stores sparse by design)")
FIT_OPTIONS = (
    Option("family", str, f"component distribution (default {DEFAULT_FAMILY})", tuple(sorted(FAMILY_ESTIMATORS)), estimator=False),
    Option("n_components", int, "number of mixture components (default 1)"),
    Option("covariance_type", str, "gaussian: covariance type (default full)", ("full", "tied", "diag", "spherical")),
    Option("tol", float, "stop when the mean log-likelihood changes by less (default 1e-3)"),
    Option("reg_covar", float, "gaussian: added to covariance diagonals (default 1e-6)"),
    Option("max_iter", int, "maximum EM iterations (default 100)"),
    Option("n_init", int, "number of initialisations, the best is kept (default 1)"),
    Option("init_params", str, "initialisation (default kmeans)", ("kmeans", "k-means++", "random", "random_from_data")),
    Option("weights_init", str, ".npy file of initial weights (K,)"),
    Option("means_init", str, "gaussian: .npy file of initial means (K, d)"),
    Option("precisions_init", str, "gaussian: .npy file of initial precisions"),
    Option("probs_init", str, "bernoulli, binomial: .npy file of initial probabilities (K, d); categorical: (K, d, C)"),
    Option("rates_init", str, "poisson: .npy file of initial rates (K, d)"),
    Option("n_trials", (int, list), "binomial: trials per feature: an int, or comma-separated ints one per feature (default 1)",
           parse=_int_or_ints),
    Option("n_categories", (int, list), "categorical: categories per feature (codes 0..n-1): an int, or comma-separated "
           "ints one per feature (default 2)", parse=_int_or_ints),
    Option("learn_weights", bool, "learn the mixing weights (default); --no-learn-weights keeps them at --weights-init "
           "(equal weights without it)", negatable=True),
    Option("prior", (str, dict), "MAP estimation: 'default' (the family's data-driven hyperparameters) or a JSON/YAML "
           "file of hyperparameters (YAML config: also a mapping); default: maximum likelihood"),
    Option("random_state", int, "seed (default: none)"),
    Option("verbose_interval", int, "log every this many iterations (default 1 on the command line)"),
    Option("init_sample_size", int, "rows k-means sees at most (default 100000)"),
    Option("persist", str, "keep data in worker memory across iterations (default auto)", ("auto", "always", "never")),
    Option("device", str, "gaussian: where the E-step runs (default cpu; cuda needs CuPy)", ("cpu", "cuda")),
    Option("dtype", str, "gaussian: precision of the E-step arithmetic (default float64)", ("float64", "float32")),
    Option("algorithm", str, "batch EM, or online EM: stepwise or incremental (default batch)", ("batch", "stepwise", "incremental")),
    Option("batch_size", int, "rows per online mini-batch (default 1000)"),
    Option("step_decay", float, "stepwise steps (t + step_offset) ** -step_decay, in (0.5, 1] (default 0.51)"),
    Option("step_offset", float, "stepwise step offset, >= 1 (default 2)"),
    Option("step_size", float, "a constant online step in (0, 1] instead, for drifting data"),
    Option("average", bool, "stepwise: end each pass at the statistics averaged over its second half (default); "
           "--no-average: at the last mini-batch's", negatable=True),
    Option("monitor", str, "what an online pass reports (default online; exact costs a pass)", ("online", "exact")),
    Option("variable", str, "variable of a Zarr group / xarray Dataset holding the data", estimator=False),
    Option("sample_dim", str, "sample dimension of an xarray store (default: the first)", estimator=False),
    Option("missing_chunks", str, MISSING_CHUNKS_HELP, ("raise", "fill"), estimator=False),
    Option("checkpoint", str, "checkpoint directory, written after every M-step", estimator=False),
    Option("resume", bool, "continue from --checkpoint if it holds a state; --no-resume starts afresh (overriding a "
           "config's resume: true) and replaces the state there", estimator=False, negatable=True),
    Option("init_from", str, "start from this saved model; keep its component labels", estimator=False),
    Option("overwrite", bool, "replace an existing --out", estimator=False),
)
CLUSTER_OPTIONS = (
    Option("workers", int, "LocalCluster workers (default 2); 0: no cluster, Dask's threads in this process "
           "(starts at once: for small runs such as a nightly update)", estimator=False),
    Option("threads_per_worker", int, "threads per LocalCluster worker (default 1)", estimator=False),
    Option("memory_limit", str, "memory limit per LocalCluster worker, e.g. 4GiB (default auto)", estimator=False),
    Option("scheduler", str, "address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786", estimator=False),
    Option("scheduler_timeout", float, "seconds to wait for --scheduler (default 10)", estimator=False),
    Option("worker_timeout", float, "seconds to wait for workers to join, before and during the run "
           "(default 60; 600 with a cluster: section, whose jobs may queue)", estimator=False),
)
#: YAML keys allowed besides the options: a dask-jobqueue cluster section, the fsspec backend's options of URLs.
EXTRA_KEYS = {"cluster": dict, "storage_options": dict}
STORAGE_OPTION_HELP = ("an option of the fsspec backend of every URL given (s3://, gs://, https://, ...), repeatable; "
                       "KEY.SUB=VALUE sets a nested one (client_kwargs.endpoint_url=http://...); VALUE is a YAML "
                       "number, true/false/null, or else text. Never written or logged")  # fmt: skip
#: Text options whose YAML value may be a float, read as the flag's text (memory_limit: 0.5, a fraction of the memory).
_NUMBER_AS_TEXT = frozenset({"memory_limit"})
_NPY_OPTIONS = ("weights_init", "means_init", "precisions_init", "probs_init", "rates_init")


def load_config(path: str) -> dict[str, Any]:
    """Read a YAML run configuration; unknown keys and wrong types are errors naming the key.

    A value is converted to its option's type when that is exact: YAML 1.1
    reads ``1e-3`` (no dot) as text, which becomes the float 0.001; ``8.0``
    or ``"8"`` becomes the int 8 and ``0`` the float 0.0; an int is taken as
    text where text is expected (``variable: 2024``). A key without a value
    (``null``) is left unset: the option keeps its default.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise UsageError(f"--config: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # a binary file, or another encoding
        raise UsageError(f"--config: {path!r} is not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config: {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config: {path!r} must hold a mapping of settings, got {type(config).__name__}")
    known = {o.name: o for o in FIT_OPTIONS + CLUSTER_OPTIONS}
    settings: dict[str, Any] = {}
    for key, value in config.items():
        if key not in known and key not in EXTRA_KEYS:
            raise UsageError(f"--config: unknown key {key!r} in {path!r}; allowed: {sorted(known) + sorted(EXTRA_KEYS)}")
        if value is None:
            continue
        if key in EXTRA_KEYS:
            if not isinstance(value, EXTRA_KEYS[key]):
                raise UsageError(f"--config: key {key!r} must be a mapping, got {value!r}")
            settings[key] = value
            continue
        option = known[key]
        value = _yaml_value(option, value)
        if option.choices and value not in option.choices:
            raise UsageError(f"--config: key {key!r} must be one of {list(option.choices)}, got {value!r}")
        settings[key] = value
    return settings


def _yaml_value(option: Option, value: Any) -> Any:
    """A YAML ``value`` as ``option``'s type, where it converts exactly (see :func:`load_config`).

    Raises
    ------
    UsageError
        Naming the key, the type expected and the value given.
    """
    types = option.type if isinstance(option.type, tuple) else (option.type,)
    if option.name in _NUMBER_AS_TEXT and isinstance(value, float) and not isinstance(value, bool):
        return repr(value)  # memory_limit: 0.5 is the flag's --memory-limit 0.5 (a fraction), checked with it
    if isinstance(value, bool):  # YAML's true/false/yes/no: only for a bool option
        if bool in types:
            return value
    elif isinstance(value, types) and not (float in types and isinstance(value, int)):
        return value
    else:
        for kind in types:
            converted = _convert(kind, value, option.parse)
            if converted is not None:
                return converted
    hint = " (write a number such as 1.0e-3)" if float in types else " (a whole number)" if int in types else ""
    raise UsageError(f"--config: key {option.name!r} must be of type {_type_name(option.type)}, got {value!r}{hint}")


def _convert(kind: type, value: Any, parse: Callable[[str], Any] | None) -> Any:
    """``value`` (not a bool) as ``kind`` when that is exact, else None."""
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and parse is not None:
        with contextlib.suppress(ValueError):
            return parse(value)
        return None
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if kind is int and isinstance(value, (str, float)):
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value)
            if number.is_integer():
                return int(value) if isinstance(value, str) and value.strip().lstrip("+-").isdigit() else int(number)
    if kind is str and isinstance(value, int):
        return str(value)
    return None


def _type_name(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for o in options:
        flag = _flag(o.name)
        if o.type is bool:
            action = argparse.BooleanOptionalAction if o.negatable else "store_true"
            parser.add_argument(flag, action=action, default=None, help=o.help)
        else:
            # A parsed flag is read in merged_settings (its error is then one line, as for a YAML value);
            # a flag that may be of several types (a YAML prior: a name or a mapping) is text.
            kind = str if o.parse or isinstance(o.type, tuple) else o.type
            parser.add_argument(flag, type=kind, choices=o.choices, default=None, help=o.help, metavar=None if o.choices else o.name.upper())


def merged_settings(args: argparse.Namespace) -> dict[str, Any]:
    """YAML settings overridden by the flags that were given."""
    settings = load_config(args.config) if getattr(args, "config", None) else {}
    for o in FIT_OPTIONS + CLUSTER_OPTIONS:
        value = getattr(args, o.name, None)
        if value is not None and o.parse is not None:
            try:
                value = o.parse(value)
            except ValueError as exc:
                raise UsageError(f"{_flag(o.name)}: {exc}") from None
        if value is not None:
            settings[o.name] = value
    flags = storage_option_flags(getattr(args, "storage_option", None) or [])
    if flags or "storage_options" in settings:
        from streamem.storage import _merge

        settings["storage_options"] = _merge(settings.get("storage_options", {}), flags)
    check_cluster_settings(args, settings)
    return settings


def check_cluster_settings(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Refuse cluster settings Dask would take badly, before anything is loaded or started.

    Timeouts must be finite and positive (Dask reads ``nan`` as a unit
    "nans", and a LocalCluster starts before it fails); ``memory_limit`` is
    ``auto``, a byte count such as ``4GiB`` or a fraction of the machine's
    memory in [0, 1], as ``distributed`` reads it.

    Raises
    ------
    UsageError
        Naming the flag (or --config key), the value and what is allowed.
    """
    for name in ("worker_timeout", "scheduler_timeout"):
        value = settings.get(name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{_origin(args, name)}: must be a finite positive number of seconds, got {value!r}")
    limit = settings.get("memory_limit")
    if limit is not None:
        problem = _memory_limit_problem(limit)
        if problem is not None:
            raise UsageError(f"{_origin(args, 'memory_limit')}: {problem}")
    workers = settings.get("workers", 2)
    if workers < 0:
        raise UsageError(f"{_origin(args, 'workers')}: must be at least 0 (0: no cluster, threads in this process), got {workers}")
    threads = settings.get("threads_per_worker", 1)
    if threads < 1:
        raise UsageError(f"{_origin(args, 'threads_per_worker')}: must be at least 1, got {threads}")
    if "cluster" in settings and not settings.get("scheduler"):  # the section is used: its kind and jobs now, not at the start
        check_cluster_section(settings["cluster"], run=hasattr(args, "workers"))  # a command that starts a cluster


#: A worker's memory limit below this is a mistake (``--memory-limit 16`` meant 16 GiB): a worker needs more to import.
MIN_MEMORY_LIMIT = 64 * 2**20


def _memory_limit_problem(limit: str) -> str | None:
    """What is wrong with ``limit`` as ``distributed`` reads a memory limit (None: nothing): 'auto', a size (4GiB),
    a number of bytes of at least 64 MiB, or a fraction of the machine's memory in [0, 1] (0: no limit)."""
    from dask.utils import format_bytes, parse_bytes

    allowed = (f"expected 'auto', a size such as 4GiB or 500MB (at least {format_bytes(MIN_MEMORY_LIMIT)}), "
               f"or a fraction of this machine's memory (at most 1; 0: no limit), got {limit!r}")  # fmt: skip
    if limit == "auto":
        return None
    try:
        number = float(limit)
    except ValueError:
        try:
            number = parse_bytes(limit)
        except (ValueError, TypeError):
            return allowed
        if number < 0:
            return allowed
    else:
        if not (number >= 0 and math.isfinite(number)):
            return allowed
        if number <= 1:  # a fraction (0: no limit)
            return None
    if number < MIN_MEMORY_LIMIT:
        bare = isinstance(limit, str) and limit.strip().replace(".", "", 1).isdigit()  # 16: the unit forgotten
        hint = f"; for gigabytes write {limit.strip()}GiB" if bare else ""
        return (f"{limit!r} is {int(number)} bytes per worker, below the {format_bytes(MIN_MEMORY_LIMIT)} a worker "
                f"needs{hint} (or 'auto', or a fraction of this machine's memory: at most 1)")
    return None


def storage_option_flags(items: Sequence[str]) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` flags as a (nested, for dotted keys) mapping.

    Raises
    ------
    UsageError
        An item without ``=`` or with an empty key (the value is not shown: it may be a secret).
    """
    import yaml

    from streamem.storage import _SECRET_NAME

    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--storage-option: expected KEY=VALUE (KEY may be dotted: client_kwargs.region_name), got key {key!r}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        # Only plain scalars spelled as YAML writes them are converted ("007", "1_000", "0x1f" stay text);
        # secrets always stay text (a numeric password is still a string to the backend).
        if not isinstance(value, (bool, int, float, type(None))) or _yaml_spelling(value) != text.lower() or (
            _SECRET_NAME.search(key) and value is not None
        ):
            value = text
        *parents, last = key.split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--storage-option: {key!r} sets a key under {part!r}, which has a value")
        node[last] = value
    return options


def _yaml_spelling(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower()


def _origin(args: argparse.Namespace, name: str) -> str:
    """Where a setting came from, as the error names it: its flag, or its key in --config."""
    return _flag(name) if getattr(args, name, None) is not None else f"--config key {name!r}"


# ------------------------------------------------------------------- cluster
@contextlib.contextmanager
def dask_client(settings: dict[str, Any], quiet: bool) -> Iterator[Any]:
    """:func:`_dask_client`, leaving Dask's default scheduler as it was however the run ends.

    A client makes itself the default; a run ended by its cluster (workers
    restarted for memory) could leave that setting behind with no client,
    and every later Dask computation in the process failed.
    """
    import dask

    before = dask.config.get("scheduler", None)
    try:
        with _dask_client(settings, quiet) as client:
            yield client
    finally:
        if before is None:
            dask.config.config.pop("scheduler", None)
        else:
            dask.config.set(scheduler=before)


@contextlib.contextmanager
def _dask_client(settings: dict[str, Any], quiet: bool) -> Iterator[Any]:
    """A client for the run: ``--scheduler``, a jobqueue ``cluster:`` section, or a LocalCluster.

    Nothing waits for ever on a cluster: workers must join within
    ``worker_timeout`` seconds, a failed job submission ends the run at
    once, a cluster we start fails tasks that find no worker for that long,
    and workers that keep dying or being restarted for memory end the run.
    Each of these is a ``UsageError`` of one line naming the cause.
    """
    import dask
    from distributed import Client

    from streamem import cluster as clusters

    clusters.quiet_dask_logs(this_process=quiet)
    address = settings.get("scheduler")
    jobs = "cluster" in settings and not address
    timeout = settings.get("worker_timeout", clusters.JOB_WORKER_TIMEOUT if jobs else clusters.WORKER_TIMEOUT)
    if timeout <= 0:
        raise UsageError(f"--worker-timeout: must be a positive number of seconds, got {timeout:g}")
    if address:
        connect_timeout = settings.get("scheduler_timeout", 10.0)
        try:
            client = Client(address, timeout=connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"--scheduler: cannot reach {address!r} within {connect_timeout:g} s ({type(exc).__name__})") from None
        with client:
            _say(quiet, f"connected to {address}; dashboard: {client.dashboard_link}")
            try:
                with clusters.guarded_run(client, 1, timeout):
                    yield client
            except clusters.ClusterError as exc:
                raise UsageError(f"--scheduler {address}: {exc}") from None
            except KeyboardInterrupt:
                _quiet_shutdown()
                raise
        return
    # A scheduler we start fails tasks no worker could take for this long
    # (all workers gone, none coming back) instead of keeping them.
    with dask.config.set({"distributed.scheduler.no-workers-timeout": f"{timeout}s"}):
        if jobs:
            where = f"cluster ({settings['cluster'].get('kind')})"
            check_cluster_section(settings["cluster"], run=True)
            cluster = jobqueue_cluster(settings["cluster"])
            n_workers, failures = 1, getattr(cluster.job_cls, "failures", None)
        else:
            from streamem.cluster import local_cluster

            where = "local cluster"
            n_workers, failures = settings.get("workers", 2), None  # checked by check_cluster_settings
            if n_workers == 0:
                # Starting worker processes costs seconds (each imports numpy,
                # dask and streamem): more than a small run's whole work.
                _say(quiet, "no cluster: Dask's threaded scheduler in this process")
                yield None
                return
            try:
                with _interrupts_ignored():
                    cluster = local_cluster(
                        n_workers=n_workers,
                        threads_per_worker=settings.get("threads_per_worker", 1),
                        memory_limit=settings.get("memory_limit", "auto"),
                    )
            except (RuntimeError, OSError, TimeoutError) as exc:  # e.g. "Nanny failed to start."
                cause = f" ({str(exc.__cause__).splitlines()[0]})" if exc.__cause__ and str(exc.__cause__) else ""
                raise UsageError(f"{where}: its workers did not start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}{cause}") from None
    with cluster, Client(cluster) as client:
        _say(quiet, f"dashboard: {client.dashboard_link}")
        try:
            with clusters.guarded_run(client, n_workers, timeout, failures):
                yield client
        except clusters.ClusterError as exc:
            raise UsageError(f"{where}: {exc}") from None
        except KeyboardInterrupt:
            _quiet_shutdown()
            raise


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT while the LocalCluster's worker processes start: they inherit that and never see a Ctrl-C.

    A Ctrl-C at the terminal goes to every process of the foreground group;
    each worker would print a KeyboardInterrupt traceback. Ignored at their
    start (a disposition a new process keeps, where a handler or a blocked
    mask would not reach it), they leave the interrupt to this process,
    which stops them. A Ctrl-C during the start itself (a second or two)
    is ignored too.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _quiet_shutdown() -> None:
    """After a Ctrl-C: no log lines from the client's interrupted tasks and the cluster's shutdown (one line says it all)."""
    for name in ("asyncio", "distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


#: The ``cluster:`` section's kinds and dask-jobqueue's classes for them.
_JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}


def check_cluster_section(section: dict[str, Any], run: bool = False) -> None:
    """Refuse a ``cluster:`` section's ``kind`` or ``jobs`` before anything is loaded or made.

    ``run``: the section starts the run's cluster, which needs a job (``jobs: 0`` only makes one to scale by hand).

    Raises
    ------
    UsageError
        Naming the key, the value and what is allowed.
    """
    kind, jobs = section.get("kind"), section.get("jobs", 1)
    if kind not in _JOBQUEUE_CLASSES:
        raise UsageError(f"--config: cluster.kind must be one of {sorted(_JOBQUEUE_CLASSES)}, got {kind!r}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 0:
        raise UsageError(f"--config: cluster.jobs must be a whole number of batch jobs, got {jobs!r}")
    if run and jobs == 0:
        raise UsageError("--config: cluster.jobs must be at least 1 for a run, got 0")


def jobqueue_cluster(section: dict[str, Any]) -> Any:
    """A dask-jobqueue cluster from a config's ``cluster:`` section (``kind``, ``jobs``, and the cluster's own keywords).

    The cluster's job class records failed submissions (``job_cls.failures``)
    for :func:`dask_client` to report. A keyword the cluster refuses, or a
    cluster that cannot start (e.g. an ``interface`` this machine lacks),
    is a one-line ``UsageError``.
    """
    check_cluster_section(section)
    section = dict(section)
    kind = section.pop("kind", None)
    jobs = section.pop("jobs", 1)
    classes = _JOBQUEUE_CLASSES
    try:
        import dask_jobqueue
    except ImportError:
        raise UsageError("--config: a cluster section needs dask-jobqueue: pip install 'streamem[hpc]'") from None
    from streamem.cluster import reporting_job_class

    cls = getattr(dask_jobqueue, classes[kind])
    try:
        cluster = cls(job_cls=reporting_job_class(cls.job_cls), **section)
    except (TypeError, ValueError, RuntimeError, OSError) as exc:
        # e.g. "Cluster failed to start: 'ib0' is not a valid network interface. Valid ... are: [...]"
        lines = [line for line in str(exc).splitlines() if line.strip()]
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown:  # dask-jobqueue's own message goes on for lines, listing every keyword it passed on
            raise UsageError(f"--config: the cluster section ({kind}) has an unknown key {unknown.group(1)!r}, which "
                             f"dask-jobqueue's {classes[kind]} does not take (configs/slurm.yaml and configs/pbs.yaml show "
                             "the usual keys)") from None  # fmt: skip
        raise UsageError(f"--config: cluster section ({kind}): {lines[0] if lines else type(exc).__name__}") from None
    if jobs:
        cluster.scale(jobs=jobs)
    return cluster


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def check_out(
    path: str | os.PathLike,
    overwrite: bool,
    flag: str = "--out",
    storage_options: dict[str, Any] | None = None,
    *,
    formats: tuple[str, ...] | None = None,
    any_file: bool = False,
) -> None:
    """Refuse an output path that cannot be written, before any work starts.

    Parameters
    ----------
    path : str or os.PathLike
        Where the command will write: a local path or a URL.
    overwrite : bool
        Whether an existing ``path`` may be replaced.
    flag : str, default="--out"
        The option named in the error.
    storage_options : dict, optional
        The fsspec backend's options of a URL.
    formats : tuple of str, optional
        The ``format`` attributes of the stores ``overwrite`` may replace
        (default :data:`streamem.io.STREAMEM_FORMATS`), checked now as the
        writer checks them when it saves, after the work.
    any_file : bool, default=False
        Whatever is at ``path`` may be replaced (a picture, a report): no format check.

    Raises
    ------
    UsageError
        When ``path`` exists and ``overwrite`` is false, or holds something
        ``overwrite`` may not replace (not one of ``formats``), or its
        directory does not exist, is not a directory, or is not writable;
        for a URL, when a store is there and ``overwrite`` is false.
    OSError
        A URL whose endpoint or bucket cannot be reached (exit status 2 too).
    """
    from streamem import storage

    if storage.is_url(path):
        where = storage.describe(path)
        storage.check_bucket(path, storage_options, f"{flag} {where}")
        state, _ = storage.store_state(storage.open_store(path, storage_options), f"{flag} {where}")
        if state == "store" and not overwrite:
            raise UsageError(f"{flag}: {where!r} exists; pass --overwrite to replace it")
        if state == "foreign":
            raise UsageError(f"{flag}: {where!r} holds objects that are not a Zarr store; write elsewhere")
        if state == "store" and overwrite and not any_file:
            _check_replaceable(path, flag, storage_options, formats)
        return
    path = os.path.expanduser(os.fspath(path))  # as the writers spell it
    if os.path.lexists(path) and not overwrite:
        raise UsageError(f"{flag}: {path!r} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    nearest = parent
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise UsageError(f"{flag}: cannot write {path!r}: {nearest!r} is not a directory")
    if nearest != parent:
        raise UsageError(f"{flag}: cannot write {path!r}: directory {parent!r} does not exist")
    # Writing a store creates entries in the directory (a temporary name, then a rename).
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write {path!r}: directory {parent!r} is not writable")
    if overwrite and not any_file and os.path.lexists(path):
        _check_replaceable(path, flag, storage_options, formats)


def _check_replaceable(path: str | os.PathLike, flag: str, storage_options: dict[str, Any] | None,
                       formats: tuple[str, ...] | None) -> None:  # fmt: skip
    """``io.check_replaceable`` before the work (the writer checks again when it saves), naming ``flag``."""
    from streamem.io import STREAMEM_FORMATS, check_replaceable

    try:
        check_replaceable(path, storage_options, formats=formats or STREAMEM_FORMATS)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _real(path: str | os.PathLike) -> str:
    """One spelling of a location, to compare them: a local path with links, ``..`` and trailing separators resolved;
    a URL as a pseudo-path of its scheme, host and key (HTTP's user name, query and fragment dropped)."""
    from urllib.parse import urlsplit

    path = os.fspath(path)
    if "://" in path and not path.startswith("file://"):
        scheme, rest = path.split("://", 1)
        if scheme in ("http", "https"):
            parts = urlsplit(path)
            rest = parts.netloc.rsplit("@", 1)[-1] + parts.path
        return "/\0url/" + scheme.lower() + "/" + "/".join(part for part in rest.split("/") if part)
    return os.path.realpath(os.path.expanduser(path.removeprefix("file://")))


def check_distinct(
    *places: tuple[str, str | os.PathLike | None], may_hold: Sequence[str] = (), may_be: Sequence[str] = ()
) -> None:
    """Refuse two of ``places`` that are one location, or one inside the other, before any work.

    Writing ``--out`` (with ``--overwrite``) or a checkpoint into the data,
    or the data into them, destroys what is read; a checkpoint inside
    ``--out`` is removed when ``--out`` is replaced.

    Parameters
    ----------
    *places : tuple of (str, path or None)
        ``(name, path)`` pairs, the first named in the error; None is skipped.
    may_hold : sequence of str
        Names of places that may hold the others (a checkpoint directory
        leaves entries that are not its own alone), but not be inside them.
    may_be : sequence of str
        Names of places that may be another one (``update``'s model,
        replaced in place by ``--out``), but neither hold it nor be inside it.

    Raises
    ------
    UsageError
        Naming both places and how they overlap.
    """
    given = [(name, os.fspath(path), _real(path)) for name, path in places if path is not None]
    for i, (name_a, a, real_a) in enumerate(given):
        for name_b, b, real_b in given[i + 1:]:
            common = os.path.commonpath([real_a, real_b])
            if real_a == real_b:
                if name_a in may_be or name_b in may_be:
                    continue
                relation = "is"
            elif common == real_b and name_b not in may_hold:
                relation = "is inside"
            elif common == real_a and name_a not in may_hold:
                relation = "holds"
            else:
                continue
            raise UsageError(f"{name_a}: {a!r} {relation} the {name_b} {b!r}; give each its own place")


def check_checkpoint(settings: dict[str, Any]) -> str | None:
    """The ``--checkpoint`` directory, made ready (or refused) before the cluster starts; None without one.

    Creates the directory (and its marker) as the fit would, so that a
    place it cannot use (under a file, in a directory it may not write, a
    directory of other things) is refused now, not after the first
    iteration; and checks that a directory holding a state, which is
    written anew after every iteration, is writable.

    Raises
    ------
    UsageError
        ``--resume`` without ``--checkpoint``, or a directory that cannot be used.
    """
    from streamem.checkpoint import prepare_checkpoint
    from streamem.storage import describe

    path = settings.get("checkpoint")
    if path is None:
        if settings.get("resume"):
            raise UsageError("--resume needs --checkpoint naming the checkpoint directory")
        return None
    try:
        prepare_checkpoint(path, settings.get("storage_options"))
    except OSError as exc:
        raise UsageError(f"--checkpoint: cannot use {describe(path)!r}: {describe_os_error(exc)}") from None
    except ValueError as exc:
        raise UsageError(f"--checkpoint: {exc}") from None
    # For root only a read-only file system stops a write, and os.access reports that too.
    if "://" not in path and not os.access(os.path.expanduser(path), os.W_OK | os.X_OK):
        raise UsageError(f"--checkpoint: cannot write {path!r}: the directory is not writable")
    return path


PERFORMANCE_REPORT_HELP = ("write Dask's performance report of the run (task stream, worker profiles, bandwidth) to this HTML "
                           "file, replacing it, when the run succeeds; needs a cluster (not --workers 0) and bokeh")


def check_performance_report(args: argparse.Namespace, settings: dict[str, Any]) -> str | None:
    """The ``--performance-report`` file, refused before any work when it cannot be written; None without one.

    Raises
    ------
    UsageError
        No cluster to report on (``--workers 0``), bokeh missing (Dask
        draws the report with it), a directory that does not exist or is
        not writable, a directory at the path, or the path of the data,
        the model or ``--out``.
    """
    import importlib.util

    path = getattr(args, "performance_report", None)
    if path is None:
        return None
    if not settings.get("scheduler") and "cluster" not in settings and settings.get("workers", 2) == 0:
        raise UsageError("--performance-report needs a Dask cluster (its scheduler records the report); "
                         "with --workers 0 there is none: give --workers 1 or more, or --scheduler")  # fmt: skip
    if importlib.util.find_spec("bokeh") is None:
        raise UsageError("--performance-report needs bokeh, which draws Dask's report: pip install 'bokeh>=3.1'")
    if "://" in path and not path.startswith("file://"):
        raise UsageError("--performance-report: give a local file; Dask writes the report with plain file I/O")
    check_out(path, overwrite=True, flag="--performance-report", any_file=True)
    if os.path.isdir(os.path.expanduser(path)):
        raise UsageError(f"--performance-report: {path!r} is a directory; give a file name such as report.html")
    check_distinct(("--performance-report", path), ("--out", getattr(args, "out", None)), ("data", args.data),
                   ("model", getattr(args, "model", None)), ("--checkpoint", settings.get("checkpoint")),
                   ("--config", getattr(args, "config", None)), *_input_files(settings))  # fmt: skip
    return path


def _input_files(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """The files and stores a command reads besides its data and model, named as their flags:
    ``--init-from``, the ``--*-init`` .npy files and a ``--prior`` file (a report written there would replace them)."""
    names = ["init_from", *_NPY_OPTIONS]
    prior = settings.get("prior")
    if isinstance(prior, str) and prior != "default":
        names.append("prior")
    return [(_flag(name), settings[name]) for name in names if isinstance(settings.get(name), (str, os.PathLike))]


@contextlib.contextmanager
def performance_report_file(path: str | None, quiet: bool) -> Iterator[None]:
    """Dask's performance report of the block, written to ``path`` if the block succeeds (nothing without a path).

    The report goes to a temporary name in the same directory, renamed into
    place: ``path`` holds either what it held before or a complete report.
    A failed run writes none (its scheduler may be gone). Runs inside
    :func:`dask_client`, whose client the report asks.
    """
    if path is None:
        yield
        return
    from distributed import performance_report

    path = os.path.expanduser(path)
    # The temporary name ends as path does: Dask infers a compression (.gz, ...) from the suffix.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".partial-{os.getpid()}-{os.path.basename(path)}")
    report = performance_report(filename=tmp)
    report.__enter__()
    yield
    try:
        report.__exit__(None, None, None)
        os.replace(tmp, path)
    except OSError as exc:  # the run's result (the model, the predictions) matters more than its report
        print(f"streamem: warning: performance report not written: {describe_os_error(exc)}", file=sys.stderr)
        return
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _say(quiet, f"wrote performance report {path}")


def describe_os_error(exc: OSError) -> str:
    """An OSError in words, naming its path(s): ``'/data/x': Permission denied``."""
    if exc.filename is None:
        return str(exc) or type(exc).__name__
    names = repr(os.fspath(exc.filename)) + (f" -> {os.fspath(exc.filename2)!r}" if exc.filename2 is not None else "")
    return f"{names}: {exc.strerror or type(exc).__name__}"


def data_keywords(settings: dict[str, Any]) -> dict[str, Any]:
    """How to read the data: ``variable``, ``sample_dim`` and ``missing_chunks`` from flags or YAML."""
    return {
        "variable": settings.get("variable"),
        "sample_dim": settings.get("sample_dim"),
        "missing_chunks": settings.get("missing_chunks", "raise"),
        "storage_options": settings.get("storage_options"),
    }


# ------------------------------------------------------------------ commands
def cmd_fit(args: argparse.Namespace) -> None:
    import streamem
    from streamem.matching import match_components

    settings = merged_settings(args)
    options = settings.get("storage_options")
    check_out(args.out, bool(settings.get("overwrite")), storage_options=options)
    check_distinct(("--out", args.out), ("--checkpoint", settings.get("checkpoint")), ("data", args.data), may_hold=["--checkpoint"])
    # --out may replace the --init-from model (read before the fit starts), not be written inside it.
    check_distinct(("--out", args.out), ("--init-from", settings.get("init_from")), may_be=["--init-from"])
    # A checkpoint written inside the --init-from model would make that model a foreign Zarr hierarchy.
    check_distinct(("--checkpoint", settings.get("checkpoint")), ("--init-from", settings.get("init_from")), may_hold=["--checkpoint"])
    report = check_performance_report(args, settings)
    where = data_keywords(settings)
    data = streamem.load_data(args.data, **where)  # lazy: fail before the cluster starts
    old = streamem.load(settings["init_from"], storage_options=options) if settings.get("init_from") else None
    cls = fit_estimator_class(args, settings, old)
    kwargs = {o.name: settings[o.name] for o in FIT_OPTIONS if o.estimator and o.name in settings}
    for name in _NPY_OPTIONS:
        if name in kwargs:
            kwargs[name] = _load_npy(name, kwargs[name])
    if "prior" in kwargs:
        try:
            kwargs["prior"] = _read_prior(kwargs["prior"])
        except ValueError as exc:
            raise UsageError(f"{_origin(args, 'prior')}: {exc}") from None
    if old is not None:
        kwargs.update(start_from(old, cls, kwargs))
    kwargs.setdefault("verbose_interval", 1)
    model = cls(verbose=0 if args.quiet else 1, **kwargs)
    model._check_parameters()  # a bad setting is refused before the cluster starts
    check_fit_inputs(args, settings, model, data, old)
    checkpoint = check_checkpoint(settings)  # last: it creates the directory
    start = resume_point(settings, model, data)  # a checkpoint of another fit is refused now too
    if start is not None:
        from streamem.storage import describe

        _say(args.quiet, f"resumed from checkpoint {describe(checkpoint)} at iteration {start}")  # a URL without credentials
    progress = fit_progress(args, model, start)
    with dask_client(settings, args.quiet) as client, performance_report_file(report, args.quiet):
        model.set_params(client=client)
        tic = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if args.quiet else "default")
            model.fit(
                args.data,
                **where,
                checkpoint=checkpoint,
                resume=bool(settings.get("resume")),
                progress=progress,
            )
        seconds = time.perf_counter() - tic
    model.client = None
    if old is not None:  # components that swapped places during EM get their old labels back
        order = match_components(old, model)
        _say(args.quiet, describe_matching(old, model, order))
        model.permute_components(order)
    model.save(args.out, overwrite=bool(settings.get("overwrite")), storage_options=options)
    _say(args.quiet, f"fitted in {seconds:.1f} s: {model.n_iter_} iterations, converged={model.converged_}, "
         f"mean log-likelihood {model.lower_bound_:.6f}; saved {args.out}")


def check_fit_inputs(args: argparse.Namespace, settings: dict[str, Any], model: Any, data: Any, old: Any) -> None:
    """Refuse, before any cluster starts, what the fit would refuse on meeting the data (read lazily: shape only).

    Data with other features than the ``--init-from`` model, fewer rows
    than components, ``*_init`` arrays of another shape than the
    components and features need (naming the ``.npy`` file), a prior for
    other features, an incremental fit too large for memory.

    Raises
    ------
    UsageError, ValueError
        A ValueError is the library's, put in command-line words by :func:`cli_words`.
    """
    from streamem.data import check_n_samples

    if old is not None and old.n_features_in_ != data.n_features:
        raise UsageError(f"--init-from: the model {settings['init_from']!r} has {old.n_features_in_} features, "
                         f"the data {args.data!r} {data.n_features}")  # fmt: skip
    check_n_samples(data, model.n_components)
    try:
        model._check_initial_parameters(data.n_features)
    except ValueError as exc:
        shape = re.match(r"(\w+_init) must have shape (\(.*?\)), got (\(.*?\))", str(exc))
        if shape is None or shape[1] not in settings:
            raise
        raise UsageError(f"{_origin(args, shape[1])}: {settings[shape[1]]!r} holds an array of shape {shape[3]}, but "
                         f"{model.n_components} components and data of {data.n_features} features need shape {shape[2]}") from None  # fmt: skip
    model._check_online_memory(data)


def resume_point(settings: dict[str, Any], model: Any, data: Any) -> int | None:
    """The iteration a ``--resume`` fit continues from; None when it starts afresh (no ``--resume``, or no state yet).

    The checkpoint's state is checked against this fit (settings and data)
    now, before any cluster starts, as the fit will check it.

    Raises
    ------
    ValueError
        A checkpoint made for other data or settings (the fit's own refusal).
    """
    from streamem.checkpoint import checkpoint_exists, data_fingerprint, fit_settings, load_checkpoint

    path, options = settings.get("checkpoint"), settings.get("storage_options")
    if not settings.get("resume") or path is None or not checkpoint_exists(path, options):
        return None
    # The fingerprint reads the first and last rows only.
    _, iteration = load_checkpoint(path, fit_settings(model), data_fingerprint(data), options)
    return iteration


def fit_progress(args: argparse.Namespace, model: Any, start: int | None) -> Any:
    """What the fit's progress bars say (``initialisation pass 1/2``, ``iteration 3``, ``pass 2 (stepwise)``); False without bars."""
    from streamem.em import Progress

    if not _progress(args):
        return False
    return Progress(init_passes=None if start is not None else init_passes(model), first_pass=(start or 0) + 1)


def init_passes(model: Any) -> int:
    """How many data passes ``model``'s initialisation makes (as MixtureEstimator._initial_runs and streamem.init do).

    A sample pass where a sample is drawn (k-means, k-means++, random, and
    for ``prior="default"``'s hyperparameters) and a statistics pass (k-means,
    random), or a pass gathering ``random_from_data``'s rows; none when
    the ``*_init`` arrays make complete parameters (``--init-from``), but
    for the prior's sample.
    """
    default_prior = isinstance(model.prior, str)
    if model._user_params(model._family(fitted=False), None) is not None:  # complete initial parameters given
        return int(default_prior)
    return {"kmeans": 2, "random": 2, "k-means++": 1, "random_from_data": 1 + int(default_prior)}[model.init_params]


def describe_matching(old: Any, model: Any, order: np.ndarray) -> str:
    """How the fit's components were matched to the ``--init-from`` model's (``order`` from match_components).

    Names the total matching cost (the family's symmetric divergence, summed
    over matched pairs: 0 for a fit that did not move) and every component
    whose label changes.
    """
    cost = model._family().divergence(old._params(), model._params())
    total = float(sum(cost[k, j] for k, j in enumerate(order)))
    moved = [f"{j} -> {k}" for k, j in enumerate(order) if j != k]
    where = f"relabelled {', '.join(moved)} (fitted -> old label)" if moved else "none moved"
    return f"components matched to --init-from's by symmetric KL divergence: total cost {total:.4g}; {where}"


def _estimator_params(cls: type) -> set[str]:
    return set(cls().get_params(deep=False))


def fit_estimator_class(args: argparse.Namespace, settings: dict[str, Any], old: Any = None) -> type:
    """The estimator class of the fit's family; refuses options that family does not have.

    The family is ``--family`` (flag or YAML), else that of the ``--init-from``
    model, else Gaussian.

    Raises
    ------
    UsageError
        A family other than the ``--init-from`` model's, or an option (e.g.
        ``--covariance-type`` with ``--family poisson``) that the family's
        estimator has no parameter for: naming the option, the family and
        the families that take it.
    """
    old_family = None if old is None else old._family().name
    family = settings.get("family", old_family or DEFAULT_FAMILY)
    if old_family is not None and family != old_family:
        raise UsageError(f"--init-from: {settings['init_from']!r} is a {old_family} mixture; it cannot start --family {family}")
    if family not in FAMILY_ESTIMATORS:  # a YAML value is checked against the choices; this is the init-from model's
        raise UsageError(f"--family: no estimator for family {family!r}; known: {sorted(FAMILY_ESTIMATORS)}")
    cls = FAMILY_ESTIMATORS[family]
    own = _estimator_params(cls)
    for o in FIT_OPTIONS:
        if o.estimator and o.name in settings and o.name not in own:
            takers = [name for name, c in sorted(FAMILY_ESTIMATORS.items()) if o.name in _estimator_params(c)]
            raise UsageError(f"{_origin(args, o.name)} does not apply to --family {family} (only to {', '.join(takers)})")
    return cls


def family_setting_names(cls: type) -> list[str]:
    """An estimator's own settings: its parameters besides the common ones, ``n_components`` and the ``*_init`` arrays."""
    from streamem.estimators.base import COMMON_PARAMS

    return sorted(_estimator_params(cls) - set(COMMON_PARAMS) - set(_NPY_OPTIONS) - {"n_components"})


def start_from(old: Any, cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Settings and initial parameters of a fit that starts from the saved model ``old`` (``--init-from``).

    The old model's ``n_components``, ``tol`` and family settings (e.g.
    ``covariance_type``, ``n_trials``, ``n_categories``; not ``device``) are
    the defaults; its weights and parameter arrays become the ``*_init``
    arrays (Gaussian: means and precisions).

    Raises
    ------
    UsageError
        ``n_components`` or ``covariance_type`` other than the old model's.
    """
    params = _estimator_params(cls)
    family_settings = [name for name in family_setting_names(cls) if name != "device"]  # device: where this run computes
    out = {name: kwargs.get(name, getattr(old, name)) for name in ("n_components", "tol", *family_settings)}
    differ = [name for name in ("n_components", "covariance_type") if name in out and out[name] != getattr(old, name)]
    if differ:
        held = " and ".join(f"{_flag(name)} {getattr(old, name)}" for name in differ)
        asked = " and ".join(f"{_flag(name)} {out[name]}" for name in differ)
        raise UsageError(f"--init-from: the old model has {held}, but {asked} was asked for; "
                         "a fit from it keeps its components (leave the setting out)")  # fmt: skip
    for name in _NPY_OPTIONS:  # weights_init <- weights_, means_init <- means_, rates_init <- rates_, ...
        if name in params:
            out[name] = getattr(old, name.removesuffix("_init") + "_")
    return out


#: ``update`` settings: the online ones, the data's and the checkpoint's.
UPDATE_OPTIONS = ("batch_size", "step_size", "variable", "sample_dim", "missing_chunks", "checkpoint", "resume", "overwrite")


def cmd_update(args: argparse.Namespace) -> None:
    import streamem

    settings = merged_settings(args)
    overwrite = bool(settings.get("overwrite"))
    options = settings.get("storage_options")
    check_out(args.out, overwrite, storage_options=options)
    # --out may replace MODEL (an update in place), but not the data, nor be inside MODEL; nor may the checkpoint sit in either.
    places = (("--out", args.out), ("--checkpoint", settings.get("checkpoint")), ("data", args.data))
    check_distinct(*places, may_hold=["--checkpoint"])
    check_distinct(("--out", args.out), ("model", args.model), may_be=["model"])
    check_distinct(("--checkpoint", settings.get("checkpoint")), ("model", args.model), may_hold=["--checkpoint"])
    report = check_performance_report(args, settings)
    model = streamem.load(args.model, storage_options=options)
    where = data_keywords(settings)
    # Lazy, before the cluster starts: the model's own loading, so data with other features are refused now.
    data = model._load_fitted(args.data, **where)
    if args.passes < 1:
        raise UsageError(f"--passes must be >= 1, got {args.passes}")
    if "batch_size" in settings:
        model.set_params(batch_size=settings["batch_size"])
    check_update_settings(model, settings.get("step_size"))
    checkpoint = check_checkpoint(settings)  # last: it creates the directory
    # A checkpoint of another fit or update is refused now, before the cluster starts, as fit does.
    start = resume_point(settings, update_estimator(model, settings.get("step_size"), args.passes), data)
    if start is not None:
        from streamem.storage import describe

        _say(args.quiet, f"resumed from checkpoint {describe(checkpoint)} at pass {start}")
    with dask_client(settings, args.quiet) as client, performance_report_file(report, args.quiet):
        model.set_params(client=client, verbose=0 if args.quiet else 1, verbose_interval=1)
        tic = time.perf_counter()
        model.update(
            args.data,
            step_size=settings.get("step_size"),
            passes=args.passes,
            **where,
            checkpoint=checkpoint,
            resume=bool(settings.get("resume")),
            progress=_progress(args),
        )
        seconds = time.perf_counter() - tic
    model.set_params(client=None, verbose=0)
    model.save(args.out, overwrite=overwrite, storage_options=options)
    # The rows of DATA, not the rows seen (each pass counts them again).
    passes = f" in {args.passes} passes" if args.passes > 1 else ""
    _say(args.quiet, f"updated in {seconds:.1f} s with {data.n_samples:,} new rows{passes} ({model.n_rows_seen_:,} seen in all): "
         f"mean log-likelihood {model.lower_bound_:.6f} (online average over the {'last ' if passes else ''}pass); saved {args.out}")


def update_estimator(model: Any, step_size: float | None, passes: int) -> Any:
    """An unfitted copy of ``model`` with the settings ``model.update`` fits with, whose checkpoint settings
    (:func:`streamem.checkpoint.fit_settings`) are those the update records and checks on ``--resume``.
    """
    from sklearn.base import clone

    step_size = model.step_size if step_size is None else step_size
    return clone(model).set_params(**model._update_params(step_size, passes))


def check_update_settings(model: Any, step_size: float | None) -> None:
    """Refuse a ``--batch-size`` or ``--step-size`` that ``update`` would refuse, before any cluster starts.

    Raises
    ------
    ValueError
        The estimator's, put in command-line words by :func:`cli_words`.
    """
    from sklearn.base import clone

    trial = clone(model).set_params(algorithm="stepwise")
    if step_size is not None:
        trial.set_params(step_size=step_size)
    trial._check_parameters()


def cmd_predict(args: argparse.Namespace) -> None:
    import xarray as xr

    import streamem
    from streamem.data import normalise_location
    from streamem.io import write_dataset

    settings = merged_settings(args)
    options = settings.get("storage_options")
    check_out(args.out, args.overwrite, storage_options=options)
    check_distinct(("--out", args.out), ("data", args.data), ("model", args.model))
    report = check_performance_report(args, settings)
    model = streamem.load(args.model, storage_options=options)
    where = data_keywords(settings)
    # The model loads the data itself: its feature checks (and feature alignment) apply,
    # and an xarray input gives results carrying its sample coordinates. Lazy: fails before the cluster starts.
    data = model._load_fitted(args.data, **where)
    with dask_client(settings, args.quiet) as client, performance_report_file(report, args.quiet):
        variables = {"labels": _as_dataarray(model.predict(args.data, **where))}
        if args.proba:
            variables["proba"] = _as_dataarray(model.predict_proba(args.data, **where), "component")
        if args.score:
            variables["log_likelihood"] = _as_dataarray(model.score_samples(args.data, **where))
        ds = xr.Dataset(variables)
        ds.attrs = {"model": normalise_location(args.model), "data_source": data.source}
        with write_progress(_progress(args), client, len(variables) * data.array.numblocks[0], "predict"):
            write_dataset(ds, args.out, overwrite=args.overwrite, checksum=False, storage_options=options)
    _say(args.quiet, f"wrote {', '.join(variables)} for {data.n_samples:,} rows to {args.out}")


#: The tasks of ``dask.array.store`` (which xarray's ``to_zarr`` uses) that write one chunk each.
WRITE_TASK_PREFIX = "store-map"


@contextlib.contextmanager
def write_progress(show: bool, client: Any, total: int, label: str) -> Iterator[None]:
    """A progress bar over the chunk writes of the block (``predict``'s output), moving as each chunk is written.

    ``total`` chunks. Without a client the local scheduler's callbacks count
    the write tasks; with one, the scheduler's count of write tasks finished
    (as the dashboard shows them) is read a few times a second.
    """
    if not show:
        yield
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit="chunk", leave=False, dynamic_ncols=True) as bar:
        if client is None:
            with _local_write_ticks(bar):
                yield
            return
        start = client.run_on_scheduler(_writes_done)
        stop = threading.Event()

        def poll() -> None:
            with contextlib.suppress(Exception):  # the bar is a courtesy: a failed poll ends it, not the run
                while not stop.wait(0.25):
                    bar.n = min(total, client.run_on_scheduler(_writes_done) - start)
                    bar.refresh()

        watcher = threading.Thread(target=poll, name="streamem-write-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def _writes_done(dask_scheduler: Any) -> int:
    """On the scheduler: how many chunk-write tasks have finished (or failed) since it started."""
    prefix = dask_scheduler.task_prefixes.get(WRITE_TASK_PREFIX)
    return 0 if prefix is None else int(prefix.state_counts["memory"] + prefix.state_counts["erred"])


def _local_write_ticks(bar: Any) -> Any:
    from dask.callbacks import Callback
    from dask.utils import key_split

    class Ticks(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
            if key_split(key) == WRITE_TASK_PREFIX:
                bar.update(1)

    return Ticks()


def _as_dataarray(result: Any, *extra: str) -> Any:
    """A per-row result as a DataArray: an xarray input's result already is one, with its coordinates."""
    import xarray as xr

    if isinstance(result, xr.DataArray):
        return result
    # Only an xarray input has a sample coordinate; we do not invent one (an
    # index of all rows would have to sit in memory).
    return xr.DataArray(result, dims=("sample", *extra))


def cmd_score(args: argparse.Namespace) -> None:
    import streamem
    from streamem.em import Progress, progress_bars

    settings = merged_settings(args)
    model = streamem.load(args.model, storage_options=settings.get("storage_options"))
    # Through the model's own loading, so its feature checks (and alignment) apply; before the cluster starts.
    data = model._load_fitted(args.data, **data_keywords(settings))
    with dask_client(settings, args.quiet), progress_bars(Progress(label="score") if _progress(args) else False):
        total = model._total_loglik(data)
    n = data.n_samples
    p = model._family().n_parameters(model.n_components, model.n_features_in_)
    print(f"rows: {n}\nmean log-likelihood: {total / n:.10g}\nBIC: {-2 * total + p * np.log(n):.10g}\nAIC: {-2 * total + 2 * p:.10g}")


def cmd_info(args: argparse.Namespace) -> None:
    import streamem

    model = streamem.load(args.model, storage_options=merged_settings(args).get("storage_options"))
    family = model._family()
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    data = getattr(model, "fit_data_", {})
    own = "".join(f"{name}={getattr(model, name)!r}, " for name in family_setting_names(type(model)))
    print(f"{type(model).__name__}: family {family.name}, {model.n_components} components, {own}{model.n_features_in_} features")
    print(f"fitted on: {data.get('source', '?')} shape {data.get('shape', '?')}")
    print(f"iterations: {model.n_iter_}, converged: {model.converged_}, mean log-likelihood: {model.lower_bound_:.10g}")
    prior = getattr(model, "prior_", None)
    print("prior: none (maximum likelihood)" if prior is None else f"prior: MAP, hyperparameters {', '.join(sorted(prior))}")
    arrays = family.param_arrays(model._params())
    print(f"weights{'' if model.learn_weights else ' (fixed)'}:", arrays.pop("weights"))
    for name, value in arrays.items():
        print(f"{name} ({', '.join(family.param_dims(name))}):")
        print(value)


def cmd_generate(args: argparse.Namespace) -> None:
    from streamem.generate import generate
    from streamem.io import GENERATED_FORMAT

    # generate replaces only data it wrote: never a directory of other things (the current one), a model or user data.
    check_out(args.out, args.overwrite, flag="OUT", formats=(GENERATED_FORMAT,))
    tic = time.perf_counter()
    generate(args.out, args.n_samples, args.n_features, args.n_components, chunk_rows=args.chunk_rows,
             seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
    nbytes = args.n_samples * args.n_features * np.dtype(args.dtype).itemsize
    _say(args.quiet, f"wrote {args.n_samples:,} x {args.n_features} {args.dtype} ({nbytes / 2**20:,.1f} MiB) to {args.out} "
         f"in {time.perf_counter() - tic:.1f} s")


def cmd_plot(args: argparse.Namespace) -> None:
    import streamem
    from streamem.plot import check_sampling, image_format, plot_model

    # The file written is the one named (matplotlib would add ".png" to a name without a suffix), checked before any work.
    if os.path.isdir(os.path.expanduser(args.out)):
        raise UsageError(f"--out: {args.out!r} is a directory; give a file name such as {os.path.join(args.out, 'figure.png')!r}")
    try:
        image_format(args.out)
    except ValueError as exc:
        raise UsageError(f"--out: {exc}") from None
    try:
        check_sampling(args.n_points, args.seed)  # before the model and data are read
    except ValueError as exc:
        raise UsageError(cli_words(str(exc), args)) from None
    check_out(args.out, overwrite=True, any_file=True)  # a picture is replaced silently, but its directory must take it
    model = streamem.load(args.model, storage_options=merged_settings(args).get("storage_options"))
    data = None
    if args.data is not None:
        # Loaded here because plot_model takes no missing_chunks; the model's own loading, so its
        # feature checks and alignment apply. Lazy: the rows are read when plot_model samples them.
        data = model._load_fitted(args.data, **data_keywords(merged_settings(args))).array
    plot_model(model, args.out, data=data, features=args.features, n_points=args.n_points, seed=args.seed)
    _say(args.quiet, f"wrote {args.out}")


def cmd_accumulate(args: argparse.Namespace) -> None:
    import streamem
    from streamem.em import Progress, progress_bars
    from streamem.mapreduce import accumulate, parse_rows, write_stats

    settings = merged_settings(args)
    options = settings.get("storage_options")
    check_out(args.out, args.overwrite, storage_options=options)
    check_distinct(("--out", args.out), ("data", args.data), ("model", args.model))
    model = streamem.load(args.model, storage_options=options)
    where = data_keywords(settings)
    data = model._load_fitted(args.data, **where)  # lazy: fail before the cluster starts
    parse_rows(args.rows, data.n_samples)  # --rows too, against the data's rows
    bars = Progress(label="accumulate") if _progress(args) else False
    with dask_client(settings, args.quiet) as client, progress_bars(bars):
        ds = accumulate(model, args.data, rows=args.rows, **where, client=client)
    write_stats(ds, args.out, overwrite=args.overwrite, storage_options=options)
    _say(args.quiet, f"wrote statistics of rows {ds.attrs['rows']} to {args.out}")


def cmd_reduce(args: argparse.Namespace) -> None:
    import streamem
    from streamem.mapreduce import reduce_stats

    options = merged_settings(args).get("storage_options")
    check_out(args.out, args.overwrite, storage_options=options)
    # --out may replace --model (an iteration in place), not a shard, nor be written inside --model.
    check_distinct(("--out", args.out), *(("statistics store", path) for path in args.stats))
    check_distinct(("--out", args.out), ("--model", args.model), may_be=["--model"])
    model = reduce_stats(streamem.load(args.model, storage_options=options), args.stats, storage_options=options)
    model.save(args.out, overwrite=args.overwrite, storage_options=options)
    _say(args.quiet, f"one EM iteration from {len(args.stats)} shards: mean log-likelihood {model.lower_bound_:.10g}; saved {args.out}")


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _load_npy(name: str, path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
        raise UsageError(f"--{name.replace('_', '-')}: cannot read {path!r} as a .npy array: {exc}") from None


# -------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """A parser whose errors are one line on stderr, exit status 2: ``streamem fit: error: ... (see streamem fit --help)``.

    argparse prints the whole usage (some twenty lines for ``fit``) before
    the error; the error alone says what is wrong, ``--help`` the rest.
    """

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        # Kept for error(): argparse checks the required flags before it hands back the unknown ones.
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            unknown = self._unknown_flags(getattr(self, "_words", []))
            if unknown:  # "--outt M" for "--out M": name the misspelled flag, not only the one missing
                message = f"{message}; {unrecognized(self, unknown)}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _unknown_flags(self, words: Sequence[str]) -> list[str]:
        """The words that look like flags and are none of this parser's (nor an abbreviation of one)."""
        flags = [flag for action in self._actions for flag in action.option_strings]
        unknown = []
        for word in words:
            if word == "--":
                break
            name = word.split("=", 1)[0]
            if name.startswith("-") and not self._negative_number_matcher.match(name) and not any(f.startswith(name) for f in flags):
                unknown.append(word)
        return unknown


class _CommandsFormatter(argparse.HelpFormatter):
    """argparse's help, measuring the subcommands at the indent they are shown at (it wraps ``accumulate``'s line otherwise)."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            indent = self._current_indent + self._indent_increment
            self._action_max_length = max(self._action_max_length, indent + max(map(len, action.choices)))


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand ``command`` (the top-level parser when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def unrecognized(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """argparse's "unrecognized arguments" message, with the closest flag of ``parser`` for a misspelled one."""
    import difflib

    flags = [flag for action in parser._actions for flag in action.option_strings]
    message = f"unrecognized arguments: {' '.join(extras)}"
    for extra in extras:
        close = difflib.get_close_matches(extra.split("=", 1)[0], flags, n=1) if extra.startswith("-") else []
        if close:
            return f"{message}; did you mean {close[0]}?"
    return message


MODEL_HELP = "model store written by fit, update or reduce (a path or URL)"
DATA_HELP = "the data: a Zarr array, or a Zarr group / xarray store with --variable (a path or URL)"
COMMANDS = {  # one line each in ``streamem --help``; the command's own --help says more
    "fit": "fit a mixture model to data and save it",
    "update": "fold new rows into a saved model (online EM)",
    "predict": "write every row's component (and --proba, --score)",
    "score": "print log-likelihood, BIC and AIC of a model on data",
    "accumulate": "write one shard's statistics (map step)",
    "reduce": "sum shards' statistics: one EM iteration",
    "info": "print a summary of a saved model",
    "generate": "write synthetic Gaussian-mixture data",
    "plot": "draw the convergence curve and the components",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamem", description="Out-of-core EM for mixture models on Dask + Zarr.", formatter_class=_CommandsFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                help="one of these; streamem COMMAND --help says more")

    def command(name: str, func: Any, description: str, cluster: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=COMMANDS[name], description=description)
        p.set_defaults(func=func)
        p.add_argument("--quiet", "-q", action="store_true", help="no progress or log output")
        if name != "generate":  # every command that reads or writes stores takes URLs
            p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help=STORAGE_OPTION_HELP)
        if cluster:
            _add_options(p.add_argument_group("cluster"), CLUSTER_OPTIONS)
            p.add_argument("--config", help="YAML file of settings (flags override it)")
        return p

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--variable", help="variable of a Zarr group / xarray Dataset holding the data")
        p.add_argument("--sample-dim", help="sample dimension of an xarray store (default: the first)")
        p.add_argument("--missing-chunks", choices=("raise", "fill"), help=MISSING_CHUNKS_HELP)

    p = command("fit", cmd_fit, "fit a mixture of --family components to DATA and save it to --out", cluster=True)
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--out", required=True, help="model store to write (Zarr)")
    _add_options(p.add_argument_group("model"), FIT_OPTIONS)

    p = command("update", cmd_update, "fold the new rows in DATA into MODEL by stepwise EM (a running average over all rows seen, "
                "or --step-size); keep its component labels; save to --out", cluster=True)
    p.add_argument("model", help="model store to start from (Zarr)")
    p.add_argument("data", help="the new rows only: " + DATA_HELP.removeprefix("the data: "))
    p.add_argument("--out", required=True, help="updated model store to write (Zarr; may be MODEL, to update in place)")
    p.add_argument("--passes", type=int, default=1, help="passes over the new rows (default 1)")
    _add_options(p.add_argument_group("online EM"), [o for o in FIT_OPTIONS if o.name in UPDATE_OPTIONS])

    for name, func, description in (
        ("predict", cmd_predict, "write labels (and --proba, --score) for every row of DATA to the Zarr store --out"),
        ("score", cmd_score, "print mean log-likelihood, BIC and AIC of MODEL on DATA"),
        ("accumulate", cmd_accumulate, "write the sufficient statistics of rows --rows of DATA under MODEL (one shard of "
         "an EM iteration; reduce sums the shards)"),
    ):
        p = command(name, func, description, cluster=True)
        p.add_argument("model", help=MODEL_HELP)
        p.add_argument("data", help=DATA_HELP)
        data_options(p)
    p = sub.choices["predict"]
    p.add_argument("--out", required=True, help="Zarr store to write: labels (sample), and proba, log_likelihood")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--proba", action="store_true", help="also write responsibilities (sample, component)")
    p.add_argument("--score", action="store_true", help="also write each row's log-likelihood")
    p = sub.choices["accumulate"]
    p.add_argument("--out", required=True, help="statistics store to write (Zarr), for reduce")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--rows", metavar="START:STOP", help="rows of DATA this shard covers, 0-based, STOP excluded (default: all rows)")
    for name in ("fit", "update", "predict"):
        sub.choices[name].add_argument("--performance-report", metavar="FILE.html", help=PERFORMANCE_REPORT_HELP)

    p = command("reduce", cmd_reduce, "sum the statistics of the shards written by accumulate and do one M-step from --model")
    p.add_argument("stats", nargs="+", help="statistics stores written by accumulate, one per shard")
    p.add_argument("--model", required=True, help="the model the shards were accumulated under")
    p.add_argument("--out", required=True, help="model store to write (Zarr; may be --model, to iterate in place)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = command("info", cmd_info, "print a summary of a saved model: family, settings, fit, parameters")
    p.add_argument("model", help=MODEL_HELP)

    p = command("generate", cmd_generate, "write synthetic Gaussian-mixture data (well-separated components) to a Zarr store")
    p.add_argument("out", help="Zarr store to write: one 2-D array (rows, features)")
    p.add_argument("--n-samples", type=int, default=1_000_000, help="rows (default 1000000)")
    p.add_argument("--n-features", type=int, default=16, help="features, the columns (default 16)")
    p.add_argument("--n-components", type=int, default=8, help="Gaussian components the rows are drawn from (default 8)")
    p.add_argument("--chunk-rows", type=int, default=65_536, help="rows per Zarr chunk (default 65536)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same data (default 0)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="type of the values (default float64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    p = command("plot", cmd_plot, "plot the convergence curve and the components: a scatter with covariance ellipses from --data (Gaussian), "
                "or the probability / rate profiles (other families; --data adds the rows per component)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="picture file to write, replaced if it exists; its suffix names the format "
                   "(.png, .pdf, .svg, ...)")
    p.add_argument("--data", help="data to draw rows from: " + DATA_HELP.removeprefix("the data: "))
    data_options(p)
    p.add_argument("--features", type=int, nargs=2, metavar=("I", "J"), help="Gaussian: two feature indices (default: first two principal axes)")
    p.add_argument("--n-points", type=int, default=5000, help="rows of --data drawn at most (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rows drawn (default 0)")
    return parser


def _version() -> str:
    from importlib.metadata import version

    return version("streamem")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for bad input, 130 when interrupted, 141 for a closed pipe)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C, wherever it lands (an import, the cluster's start, a pass)
        print(f"streamem{_command_word(argv)}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # The reader of our output went away (streamem info model.zarr | head -1): nothing more to say.
        _silence_stdout()
        return 141


def _command_word(argv: Sequence[str] | None) -> str:
    """`` fit`` for ``streamem fit ...``: the command named in the arguments, for a message before they are parsed."""
    words = [word for word in (sys.argv[1:] if argv is None else argv) if word in COMMANDS]
    return f" {words[0]}" if words else ""


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (a BrokenPipeError may also come from a socket)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit finds no closed pipe to complain about."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the command's parser, which knows its flags (argparse would show the top-level usage)
        command = _command_parser(parser, args.command)
        command.error(unrecognized(command, extras))
    # Dask's own INFO lines (from the workers' processes too) drown ours.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    if not args.quiet:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        return _run(args)
    finally:  # main() called in a process that goes on (tests, notebooks) leaves the logger as it found it
        logger.handlers[:], logger.level, logger.propagate = saved


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe is found here, not at exit
    except (UsageError, ValueError, TypeError, OSError) as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            raise  # not an error of the run: main ends quietly
        # OSError: a path we may not read or write (PermissionError, a read-only file system, ...).
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        # The library's keywords, as the flags that set them here.
        message = cli_words(message, args)
        message = _resume_advice(message)
        message = _redact(message, args)
        print(f"streamem {args.command}: error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


def cli_words(message: str, args: argparse.Namespace) -> str:
    """A library error in the words of the command line: flags for keywords, "the data" for ``X``, the files by name.

    ``n_components must be ...`` and ``n_components=0`` become
    ``--n-components must be ...`` and ``--n-components 0``;
    ``checkpoint=`` becomes ``--checkpoint``; ``X has 4 features, but
    GaussianMixture is expecting 8 features as input`` names the data and
    the model given.
    """
    features = re.fullmatch(r"X has (\d+) features, but \w+ is expecting (\d+) features as input", message)
    if features:
        data, model = getattr(args, "data", None), getattr(args, "model", None)
        data_words = f"the data {data!r}" if data is not None else "the data"
        model_words = f"the model {model!r}" if model is not None else "the model"
        return f"{data_words} have {features[1]} features, but {model_words} is expecting {features[2]} features"
    rows = re.match(r"X has n_samples=(\d+) rows, but n_components=(\d+) ", message)
    if rows:
        return f"the data have {rows[1]} rows, fewer than --n-components {rows[2]} (each component needs at least one row)"
    message = re.sub(r"^X: ", "data: ", message)
    message = re.sub(r"^X (has|is|contains|must) ", lambda m: f"the data {_PLURAL.get(m[1], m[1])} ", message)
    flags = _KEYWORD_FLAGS | _COMMAND_KEYWORD_FLAGS.get(getattr(args, "command", None), {})
    names = "|".join(sorted(flags, key=len, reverse=True))
    # name=value (value quoted or not, or none: "checkpoint= naming ...")
    message = re.sub(rf"(?<![\w\[.'\"-])({names})=('[^']*'|\"[^\"]*\"|[^\s,;:()\[\]]*)",
                     lambda m: flags[m[1]] + (" " + m[2].strip("'\"") if m[2] not in ("", "True") else ""), message)
    # name as the subject of the sentence: "n_components must be ...", "checkpoint 'dir' was made for ..."
    message = re.sub(rf"(?<![\w\[.'\"-])({names})(?= must | contains | needs | '| \")", lambda m: flags[m[1]], message)
    return _flags_once(message)


def _flags_once(message: str) -> str:
    """A flag named once: the library's ``overwrite=True (--overwrite)`` became ``--overwrite (--overwrite)``, and
    ``--checkpoint: checkpoint 'dir' ...`` (a prefix on the library's message) ``--checkpoint: --checkpoint 'dir' ...``."""
    message = re.sub(r"(--[\w-]+) \(\1\)", r"\1", message)
    return re.sub(r"^(--[\w-]+): (?=\1\b)", "", message)


_PLURAL = {"has": "have", "is": "are", "contains": "contain"}
#: The library's keywords that a flag of the same name sets, and the flag.
_KEYWORD_FLAGS = {o.name: _flag(o.name) for o in FIT_OPTIONS + CLUSTER_OPTIONS} | {"rows": "--rows", "passes": "--passes"}
#: Keywords of one command's library function and the flags that set them (``seed`` is --seed of these only).
_COMMAND_KEYWORD_FLAGS = {
    "generate": {name: _flag(name) for name in ("n_samples", "n_features", "chunk_rows", "seed", "dtype")},
    "plot": {name: _flag(name) for name in ("features", "n_points", "seed")},
}


def _resume_advice(message: str) -> str:
    """A checkpoint refused for other data or settings (streamem.checkpoint), with the ways to start afresh."""
    if not message.endswith("; refusing to resume"):
        return message
    return (f"{message}: give a new --checkpoint directory to start afresh, "
            "or --no-resume to start afresh and replace the state in this one")


def _redact(message: str, args: argparse.Namespace) -> str:
    """``message`` without the secrets of the storage options given (the library's errors have none; this is a backstop)."""
    from streamem.storage import redact

    try:
        options = merged_settings(args).get("storage_options")
    except Exception:  # a bad config or flag: nothing was read that could be in the message
        return message
    return redact(message, options)


if __name__ == "__main__":
    sys.exit(main())
