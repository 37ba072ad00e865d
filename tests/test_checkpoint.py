"""Checkpoint and resume (issue 4, item 4).

An interrupted fit resumed from its checkpoint ends with the model of an
uninterrupted fit (to 1e-12); a checkpoint made for other data or other
settings is refused; and a real ``streamem fit --checkpoint`` killed with
SIGKILL at random moments always leaves a readable checkpoint from which
``--resume`` finishes the same model.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from numpy.testing import assert_allclose

import streamem
from streamem.checkpoint import MARKER, data_fingerprint, fit_settings, load_checkpoint
from workflow_helpers import REPO, assert_same_params, check_ok, check_usage_error, cli_main, inits, mixture_sample, quiet_fit, write_zarr

RTOL = 1e-12
#: Components overlap at this spread, so EM changes the parameters every iteration.
SPREAD = 0.25


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    """6,000 overlapping rows in 1,000-row chunks."""
    path = tmp_path_factory.mktemp("ckdata") / "data.zarr"
    return write_zarr(path, mixture_sample(6000, seed=31, spread=SPREAD), 1000)


def _model(**params) -> streamem.GaussianMixture:
    settings = dict(n_components=3, tol=0, random_state=0)
    settings.update(params)
    return streamem.GaussianMixture(**settings)


@pytest.mark.parametrize("covariance_type, n_init", [("full", 1), ("diag", 2)])
def test_interrupted_fit_resumes_to_the_uninterrupted_model(data_path, tmp_path, covariance_type, n_init):
    reference = quiet_fit(_model(covariance_type=covariance_type, n_init=n_init, max_iter=12), data_path)
    ckpt = tmp_path / "ckpt"
    # Three pieces: 4 iterations, 4 more, the last 4.
    first = quiet_fit(_model(covariance_type=covariance_type, n_init=n_init, max_iter=4), data_path, checkpoint=ckpt)
    assert first.n_iter_ == 4
    assert_allclose(first.lower_bounds_, reference.lower_bounds_[:4], rtol=RTOL, atol=0)
    quiet_fit(_model(covariance_type=covariance_type, n_init=n_init, max_iter=8), data_path, checkpoint=ckpt, resume=True)
    resumed = quiet_fit(_model(covariance_type=covariance_type, n_init=n_init, max_iter=12), data_path, checkpoint=ckpt, resume=True)
    assert resumed.n_iter_ == 12 and len(resumed.lower_bounds_) == 12
    assert_same_params(resumed, reference, RTOL)
    # The resumed run continued where the last piece stopped: it did not redo iterations 1-8.
    assert resumed.n_data_passes_ == 4


def test_resume_with_user_initial_parameters(data_path, tmp_path):
    params = dict(covariance_type="tied", **inits("tied"))
    reference = quiet_fit(_model(max_iter=9, **params), data_path)
    quiet_fit(_model(max_iter=3, **params), data_path, checkpoint=tmp_path / "ckpt")
    resumed = quiet_fit(_model(max_iter=9, **params), data_path, checkpoint=tmp_path / "ckpt", resume=True)
    assert_same_params(resumed, reference, RTOL)


def test_resume_with_an_empty_checkpoint_directory_starts_afresh(data_path, tmp_path):
    reference = quiet_fit(_model(max_iter=5), data_path)
    resumed = quiet_fit(_model(max_iter=5), data_path, checkpoint=tmp_path / "fresh", resume=True)
    assert_same_params(resumed, reference, RTOL)


@pytest.fixture(scope="module")
def checkpointed(data_path, tmp_path_factory) -> str:
    """A checkpoint after 3 iterations of a fit with means_init given."""
    ckpt = tmp_path_factory.mktemp("refuse") / "ckpt"
    quiet_fit(_model(max_iter=3, means_init=inits("full")["means_init"]), data_path, checkpoint=ckpt)
    return str(ckpt)


def test_checkpoint_for_other_rows_is_refused(checkpointed, tmp_path):
    other = write_zarr(tmp_path / "other.zarr", mixture_sample(5000, seed=32, spread=SPREAD), 1000)
    model = _model(max_iter=6, means_init=inits("full")["means_init"])
    with pytest.raises(ValueError, match="other data"):
        quiet_fit(model, other, checkpoint=checkpointed, resume=True)


def test_checkpoint_for_rewritten_data_of_the_same_shape_is_refused(tmp_path):
    """The data at the checkpointed path were replaced by other rows of the same shape and chunking."""
    path = write_zarr(tmp_path / "data.zarr", mixture_sample(3000, seed=33, spread=SPREAD), 1000)
    quiet_fit(_model(max_iter=3), path, checkpoint=tmp_path / "ckpt")
    shutil.rmtree(path)
    write_zarr(path, mixture_sample(3000, seed=34, spread=SPREAD), 1000)
    with pytest.raises(ValueError, match="other data"):
        quiet_fit(_model(max_iter=6), path, checkpoint=tmp_path / "ckpt", resume=True)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(n_components=4, means_init=None), "n_components"),
        (dict(means_init=inits("full")["means_init"] + 0.01), "means_init"),
        (dict(covariance_type="spherical"), "covariance_type"),
    ],
)
def test_checkpoint_for_other_settings_is_refused(checkpointed, data_path, change, name):
    params = dict(max_iter=6, means_init=inits("full")["means_init"])
    params.update(change)
    with pytest.raises(ValueError, match="other settings") as info:
        quiet_fit(_model(**params), data_path, checkpoint=checkpointed, resume=True)
    assert name in str(info.value)


def test_cli_refuses_a_checkpoint_of_other_settings(checkpointed, data_path, tmp_path):
    """``--resume`` with other settings: exit 2 and one line naming the setting, no model written."""
    out = tmp_path / "model.zarr"
    proc = cli_main(
        "fit", data_path, "--out", out, "--checkpoint", checkpointed, "--resume",
        "--n-components", 4, "--tol", 0, "--max-iter", 6, "--random-state", 0, "--workers", 0, "--quiet",
    )  # fmt: skip
    check_usage_error(proc, "n_components", "other settings")
    assert not out.exists()


def test_same_settings_resume_from_the_refusal_fixture(checkpointed, data_path):
    """The refusals above are not a checkpoint that nothing can resume from."""
    params = dict(max_iter=6, means_init=inits("full")["means_init"])
    reference = quiet_fit(_model(**params), data_path)
    resumed = quiet_fit(_model(**params), data_path, checkpoint=checkpointed, resume=True)
    assert_same_params(resumed, reference, RTOL)


# --------------------------------------------------------------- SIGKILL test
KILL_MAX_ITER = 40
#: --workers of each killed run: the first on a LocalCluster (its worker process dies with it, as a node would),
#: the others with Dask's threads (a cluster costs seconds to start; the checkpoint is the client's either way).
KILLED_RUN_WORKERS = (1, 0, 0)


def _pointer(ckpt: str) -> str | None:
    try:
        with open(os.path.join(ckpt, "LATEST")) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _wait_for_new_state(proc: subprocess.Popen, ckpt: str, previous: str | None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pointer = _pointer(ckpt)
        if pointer and pointer != previous:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"fit ended (exit {proc.returncode}) before writing a new checkpoint state:\n{err}")
        time.sleep(0.02)
    pytest.fail("no new checkpoint state appeared")


def test_sigkill_at_random_moments_then_resume(tmp_path):
    data = write_zarr(tmp_path / "data.zarr", mixture_sample(160_000, seed=35, spread=SPREAD), 20_000)
    ckpt = str(tmp_path / "ckpt")
    out = tmp_path / "model.zarr"
    settings = dict(n_components=3, tol=0.0, max_iter=KILL_MAX_ITER, random_state=0)
    args = [
        "fit", data, "--out", out, "--checkpoint", ckpt, "--resume",
        "--n-components", 3, "--tol", 0, "--max-iter", KILL_MAX_ITER, "--random-state", 0, "--threads-per-worker", 1, "--quiet",
    ]  # fmt: skip

    reference = quiet_fit(streamem.GaussianMixture(**settings), data)
    assert reference.n_iter_ == KILL_MAX_ITER
    expected_settings = fit_settings(streamem.GaussianMixture(**settings))
    fingerprint = data_fingerprint(streamem.load_data(data))

    rng = random.Random(20240607)
    last_iteration, pointer = 0, None
    for workers in KILLED_RUN_WORKERS:
        command = [sys.executable, "-m", "streamem.cli", *map(str, args), "--workers", str(workers)]
        # Its own session, so that SIGKILL reaches the LocalCluster's worker processes too (a node dying).
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _wait_for_new_state(proc, ckpt, pointer)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"the fit finished before it was killed (exit {proc.returncode})"
        assert not out.exists()

        # Whatever moment the kill hit, the checkpoint is readable and is a state of the uninterrupted fit.
        runs, iteration = load_checkpoint(ckpt, expected_settings, fingerprint)
        assert last_iteration < iteration < KILL_MAX_ITER
        (arrays, lower_bound, lower_bounds, n_iter, converged) = runs[0]
        assert n_iter == iteration and len(lower_bounds) == iteration and not converged
        assert_allclose(lower_bounds, reference.lower_bounds_[:iteration], rtol=RTOL, atol=0)
        assert all(np.isfinite(a).all() for a in arrays.values())
        last_iteration, pointer = iteration, _pointer(ckpt)

    # The resume that finishes: in this process (no interpreter start), with Dask's threads.
    check_ok(cli_main(*args, "--workers", 0))
    model = streamem.load(out)
    assert model.n_iter_ == KILL_MAX_ITER
    assert_same_params(model, reference, RTOL)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "data.zarr", "model.zarr"]
    # The killed fits' states and temporaries went once their processes were gone: one state is left.
    entries = sorted(os.listdir(ckpt))
    assert len(entries) == 3 and entries[0] == "LATEST" and entries[1].startswith("state-") and entries[2] == MARKER, entries
