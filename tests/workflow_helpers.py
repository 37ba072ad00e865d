"""Helpers shared by the production-workflow tests (CLI, model files, checkpoints, map-reduce).

Everything here is independent of streamem's numerics: data come from a
fixed-seed numpy generator, references from scikit-learn or from an
uninterrupted in-process fit made by the test itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import numpy as np
import zarr
from numpy.testing import assert_allclose
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

#: A well separated 3-component mixture in 3 dimensions (the "truth" every data set is drawn from).
MIX_WEIGHTS = np.array([0.3, 0.45, 0.25])
MIX_MEANS = np.array([[0.0, 0.0, 0.0], [6.0, 5.0, 0.5], [-5.0, 6.0, 4.0]])
MIX_CHOL = np.array(
    [
        [[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [0.2, -0.3, 0.7]],
        [[1.3, 0.0, 0.0], [-0.4, 0.6, 0.0], [0.0, 0.3, 1.1]],
        [[0.7, 0.0, 0.0], [0.1, 1.2, 0.0], [0.5, 0.0, 0.9]],
    ]
)

#: The parameters two fitted models are compared on.
PARAM_ATTRS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")

#: Initial parameters (deliberately off the truth) in scikit-learn's shapes, per covariance type.
INIT_WEIGHTS = np.array([0.25, 0.4, 0.35])
INIT_MEANS = MIX_MEANS + np.array([[0.5, -0.3, 0.2], [-0.4, 0.6, -0.5], [0.3, 0.3, -0.6]])
INIT_PRECISIONS = {
    "full": np.array(
        [
            [[0.8, 0.1, 0.0], [0.1, 0.9, -0.05], [0.0, -0.05, 0.7]],
            [[1.0, 0.2, 0.0], [0.2, 1.1, -0.05], [0.0, -0.05, 0.9]],
            [[1.2, 0.3, 0.0], [0.3, 1.0, -0.05], [0.0, -0.05, 1.1]],
        ]
    ),
    "tied": np.array([[0.9, 0.1, 0.0], [0.1, 1.1, -0.05], [0.0, -0.05, 0.8]]),
    "diag": np.array([[0.8, 1.0, 1.2], [1.1, 0.7, 0.9], [1.0, 1.3, 0.6]]),
    "spherical": np.array([0.7, 1.0, 1.3]),
}


def inits(covariance_type: str) -> dict:
    return {
        "weights_init": INIT_WEIGHTS.copy(),
        "means_init": INIT_MEANS.copy(),
        "precisions_init": INIT_PRECISIONS[covariance_type].copy(),
    }


def mixture_sample(n: int, seed: int, n_features: int = 3, spread: float = 1.0) -> np.ndarray:
    """``n`` rows drawn from the fixed mixture above (first ``n_features`` coordinates).

    ``spread`` scales the distances between the means: at 0.25 the components
    overlap and EM keeps changing the parameters for many iterations.
    """
    rng = np.random.RandomState(seed)
    labels = rng.choice(len(MIX_WEIGHTS), size=n, p=MIX_WEIGHTS)
    z = rng.standard_normal((n, 3))
    X = spread * MIX_MEANS[labels] + np.einsum("nij,nj->ni", MIX_CHOL[labels], z)
    return np.ascontiguousarray(X[:, :n_features])


def write_zarr(path, X: np.ndarray, chunk_rows: int) -> str:
    """``X`` as a Zarr v3 array on disk, chunked by rows."""
    path = os.fspath(path)
    arr = zarr.create_array(path, shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype, zarr_format=3)
    arr[...] = X
    return path


def cli(*args, env: dict | None = None, timeout: float = 240, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m streamem.cli ARGS`` in a subprocess (the real console entry point)."""
    full_env = dict(os.environ)
    full_env.pop("PYTHONWARNINGS", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "streamem.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or REPO,
    )


def cli_main(*args, cwd: str | None = None) -> subprocess.CompletedProcess:
    """``streamem ARGS`` through :func:`streamem.cli.main` in this process, as :func:`cli` reports it.

    For tests about what a command does rather than about its process (signals,
    pipes, the interpreter's exit): it saves the ~2 s of imports a subprocess
    pays. The exit status is main's return value or an argparse SystemExit's
    code; stdout and stderr hold what the command printed, what loggers that
    write to stderr logged, what was written to file descriptors 1 and 2 (by
    worker processes started meanwhile, say) and the warnings shown under
    Python's default filters, as the real command's output would.
    """
    import io

    out, err = io.StringIO(), io.StringIO()
    code = main_in_process(args, stdout=out, stderr=err, cwd=cwd)
    return subprocess.CompletedProcess(["streamem", *map(str, args)], code, out.getvalue(), err.getvalue())


def main_in_process(args, stdout, stderr, cwd: str | None = None, fds: bool = True) -> int:
    """:func:`streamem.cli.main` on ``args`` with its output sent to the given streams; its exit status.

    ``sys.stdout``/``sys.stderr`` are the streams; so are the stderr log handlers
    and, with ``fds``, file descriptors 1 and 2 (their text is appended at the
    end). The process is left as it was found: working directory, environment,
    logger levels (a quiet command silences Dask's loggers), warning filters,
    Dask's configuration. A command that leaves Dask's scheduler setting
    changed fails the test (after the restoration): the next computation of the
    process (a notebook's, a test's) would go to a scheduler that is gone.
    """
    import contextlib

    import dask

    from streamem.cli import main

    our_stderr = (sys.stderr, sys.__stderr__)  # where this process's stderr log handlers write
    with contextlib.ExitStack() as stack:
        stack.enter_context(_process_state_kept())
        written = stack.enter_context(_fd_output(fds))
        stack.enter_context(contextlib.redirect_stdout(stdout))
        stack.enter_context(contextlib.redirect_stderr(stderr))
        stack.enter_context(_logs_to(stderr, our_stderr))
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = _warning_to_stderr
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's errors and --help/--version
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        scheduler_after = dask.config.get("scheduler", None)
    stdout.write(written.get(1, ""))
    stderr.write(written.get(2, ""))
    assert scheduler_after == dask.config.get("scheduler", None), (
        f"streamem {' '.join(map(str, args))}: main() left dask's 'scheduler' setting at {scheduler_after!r} "
        f"(was {dask.config.get('scheduler', None)!r}); exit {code}, stderr: {stderr.getvalue()[-500:]!r}")
    return code


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _all_loggers() -> list:
    import logging

    return [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]


@contextlib.contextmanager
def _process_state_kept():
    """Restore the working directory, the environment, logger levels and warning filters on exit."""
    import dask
    import distributed  # noqa: F401 - its defaults join dask.config on import: copied with the rest, not lost by the restore

    try:
        import dask_jobqueue  # noqa: F401 - the same for its defaults (a cluster: section imports it)
    except ImportError:
        pass

    here, environ = os.getcwd(), dict(os.environ)
    levels = {lg: lg.level for lg in _all_loggers()}
    config = _dict_copy(dask.config.config)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        for lg in _all_loggers():
            lg.setLevel(levels.get(lg, 0))
        dask.config.config.clear()
        dask.config.config.update(config)


def _dict_copy(d: dict) -> dict:
    """A copy of nested dicts (the values themselves, clients say, are not copied)."""
    return {k: _dict_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


@contextlib.contextmanager
def _logs_to(stream, stderrs: tuple):
    """Log handlers that write to one of ``stderrs`` write to ``stream`` meanwhile (as a subprocess's would)."""
    import logging

    handlers = [h for lg in _all_loggers() for h in lg.handlers
                if type(h) is logging.StreamHandler and any(h.stream is e for e in stderrs if e is not None)]  # fmt: skip
    originals = [h.setStream(stream) for h in handlers]
    try:
        yield
    finally:
        for handler, original in zip(handlers, originals):
            handler.setStream(original)


@contextlib.contextmanager
def _fd_output(enabled: bool):
    """What is written to file descriptors 1 and 2 meanwhile: {fd: text} (filled on exit); nothing when not ``enabled``."""
    import tempfile

    written: dict[int, str] = {}
    if not enabled:
        yield written
        return
    sys.stdout.flush()
    sys.stderr.flush()
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    saved = {fd: os.dup(fd) for fd in files}
    try:
        for fd, fh in files.items():
            os.dup2(fh.fileno(), fd)
        yield written
    finally:
        for fd, fh in files.items():
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            fh.seek(0)
            written[fd] = fh.read().decode(errors="replace")
            fh.close()


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def check_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, exactly one line on stderr, no traceback, naming every needle. Returns the line."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def sklearn_fit(X: np.ndarray, **params) -> SkGaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return SkGaussianMixture(**params).fit(X)


def quiet_fit(model, X, **fit_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, **fit_kwargs)


def sklearn_from(model) -> SkGaussianMixture:
    """A scikit-learn GaussianMixture carrying ``model``'s fitted parameters (for scoring by sklearn's formulas)."""
    sk = SkGaussianMixture(n_components=model.n_components, covariance_type=model.covariance_type)
    sk.weights_ = np.asarray(model.weights_)
    sk.means_ = np.asarray(model.means_)
    sk.covariances_ = np.asarray(model.covariances_)
    sk.precisions_cholesky_ = np.asarray(model.precisions_cholesky_)
    sk.precisions_ = np.asarray(model.precisions_)
    sk.n_features_in_ = model.means_.shape[1]
    sk.converged_ = True
    sk.n_iter_ = 1
    sk.lower_bound_ = 0.0
    return sk


def assert_same_params(ours, ref, rtol: float, *, attrs=PARAM_ATTRS, bounds: bool = True, n_iter: bool = True) -> None:
    """Fitted parameters agree to ``rtol`` relative (an absolute floor of rtol * 1e-6 * max|ref| for ~0 entries)."""
    for name in attrs:
        a, b = np.asarray(getattr(ours, name)), np.asarray(getattr(ref, name))
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-6 * float(np.max(np.abs(b))), err_msg=name)
    if bounds:
        assert_allclose(ours.lower_bound_, ref.lower_bound_, rtol=rtol, atol=0, err_msg="lower_bound_")
        assert len(ours.lower_bounds_) == len(ref.lower_bounds_)
        assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=rtol, atol=0, err_msg="lower_bounds_")
    if n_iter:
        assert ours.n_iter_ == ref.n_iter_
        assert ours.converged_ == ref.converged_


def save_npy_inits(directory, covariance_type: str) -> dict:
    """Write the initial parameters to .npy files; returns {option name: path}."""
    paths = {}
    for name, value in inits(covariance_type).items():
        path = os.path.join(os.fspath(directory), f"{name}.npy")
        np.save(path, value)
        paths[name] = path
    return paths


#: The first bytes of a pickle (protocol 2-5), and the framed header of protocol 4/5 anywhere in a file.
PICKLE_STARTS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
PICKLE_FRAMES = (b"\x80\x04\x95", b"\x80\x05\x95")


def pickle_traces(root) -> list[str]:
    """Files under ``root`` that start with a pickle header or hold a protocol-4/5 frame, or name a pickle codec."""
    found = []
    for dirpath, _, files in os.walk(os.fspath(root)):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                data = fh.read()
            if data.startswith(PICKLE_STARTS) or any(h in data for h in PICKLE_FRAMES) or b"pickle" in data.lower():
                found.append(os.path.relpath(path, root))
    return found


def nightly_bin(tmp_path) -> tuple[str, str, object]:
    """A directory for PATH with a ``streamem`` wrapper that logs its arguments and a ``date`` saying ``$FAKE_DATE``.

    Returns the directory, the wrapper (for ``STREAMEM``) and the file of logged command lines.
    """
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    scripts = {
        bin_dir / "streamem-wrapper": f'#!/bin/sh\necho "$@" >> "{calls}"\nexec "{sys.executable}" -m streamem.cli "$@"\n',
        bin_dir / "date": '#!/bin/sh\necho "$FAKE_DATE"\n',
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(bin_dir), str(bin_dir / "streamem-wrapper"), calls


# ------------------------------------------------- the review files' in-process command line (test_review_cli17*.py)
def run_main(capfd, *argv) -> tuple[object, str, str]:
    """``streamem ARGV`` in this process: (exit status, stdout, stderr); an escaping exception is the status text
    (what the real command shows as a traceback, exit 1), so that assertions show it."""
    from streamem.cli import main

    try:
        status = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv])
    except SystemExit as exc:  # argparse's errors
        status = exc.code
    except Exception as exc:  # noqa: BLE001
        status = f"exception {type(exc).__name__}: {exc}"
    out, err = capfd.readouterr()
    return status, out, err


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def one_line_error(status, err: str, *needles: str) -> str:
    """Exit status 2 and exactly one line on stderr (nothing before it) naming every needle."""
    assert status == 2, f"exit {status!r}\nstderr:\n{err}"
    got = lines(err)
    assert len(got) == 1, f"expected the error alone on stderr, got {len(got)} lines:\n{err}"
    for needle in needles:
        assert needle in got[0], f"{needle!r} not in {got[0]!r}"
    return got[0]


def listing(path) -> list[str]:
    """Every entry under ``path`` (recursively), to see that an input or a directory was left alone."""
    path = os.fspath(path)
    return sorted(os.path.relpath(os.path.join(d, n), path) for d, dirs, files in os.walk(path) for n in dirs + files)
