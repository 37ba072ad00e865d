"""Checkpoint directories: what a fit may touch, settings as JSON, data paths (issue 13, items 1, 9, 16).

A checkpoint removes only what it wrote itself; a directory that holds
anything else is refused unless it already is a checkpoint directory (then
the other files are left alone); fits sharing a directory each finish with
the model of a fit alone; numpy-scalar settings checkpoint and resume; and
any spelling of the data's path resumes a checkpoint made with another.
Every reference is an uninterrupted fit without a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import zarr
from numpy.testing import assert_array_equal

import streamem
from streamem.checkpoint import MARKER, data_fingerprint, fit_settings, load_checkpoint
from workflow_helpers import REPO, assert_same_params, check_usage_error, cli_main, mixture_sample, quiet_fit, write_zarr

RTOL = 1e-12
SPREAD = 0.25


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(2000, seed=41, spread=SPREAD)


@pytest.fixture(scope="module")
def data_path(X, tmp_path_factory) -> str:
    return write_zarr(tmp_path_factory.mktemp("safety") / "data.zarr", X, 500)


def _model(**params) -> streamem.GaussianMixture:
    settings = dict(n_components=3, tol=0, random_state=0)
    settings.update(params)
    return streamem.GaussianMixture(**settings)


def _states(ckpt) -> list[str]:
    return sorted(e for e in os.listdir(ckpt) if e.startswith("state-"))


# ------------------------------------------------------------ item 1: what a fit may touch
def test_data_store_inside_the_checkpoint_directory_is_refused_and_kept(X, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    data = write_zarr(ckpt / "data.zarr", X, 500)
    with pytest.raises(ValueError, match="data.zarr") as info:
        quiet_fit(_model(max_iter=3), data, checkpoint=ckpt)
    assert str(ckpt) in str(info.value)
    assert os.listdir(ckpt) == ["data.zarr"]
    assert_array_equal(zarr.open_array(data, mode="r")[...], X)


@pytest.mark.parametrize("resume", [False, True])
def test_a_directory_of_other_files_is_refused(data_path, tmp_path, resume):
    ckpt = tmp_path / "results"
    (ckpt / "plots").mkdir(parents=True)
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        quiet_fit(_model(max_iter=2), data_path, checkpoint=ckpt, resume=resume)
    assert sorted(os.listdir(ckpt)) == ["notes.txt", "plots"]
    assert (ckpt / "notes.txt").read_text() == "mine"


def test_cli_refuses_a_directory_of_other_files(data_path, tmp_path):
    ckpt = tmp_path / "results"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    out = tmp_path / "model.zarr"
    proc = cli_main("fit", data_path, "--out", out, "--checkpoint", ckpt, "--n-components", 3, "--max-iter", 2, "--workers", 0, "--quiet")
    check_usage_error(proc, str(ckpt), "notes.txt")
    assert os.listdir(ckpt) == ["notes.txt"] and not out.exists()


def test_other_files_in_a_checkpoint_directory_are_left_alone(data_path, X, tmp_path):
    reference = quiet_fit(_model(max_iter=5), data_path)
    ckpt = tmp_path / "ckpt"
    quiet_fit(_model(max_iter=2), data_path, checkpoint=ckpt)
    assert MARKER in os.listdir(ckpt)
    # The user puts their own things into the (now recognised) checkpoint directory.
    (ckpt / "notes.txt").write_text("mine")
    write_zarr(ckpt / "data.zarr", X, 500)
    resumed = quiet_fit(_model(max_iter=5), str(ckpt / "data.zarr"), checkpoint=ckpt)
    assert (ckpt / "notes.txt").read_text() == "mine"
    assert_array_equal(zarr.open_array(str(ckpt / "data.zarr"), mode="r")[...], X)
    assert_same_params(resumed, reference, RTOL)
    assert len(_states(ckpt)) == 1  # the fit's own older states are gone


def test_a_checkpoint_directory_of_the_old_layout_resumes(data_path, tmp_path):
    """LATEST + state-<iteration>-<id>.zarr without a marker, as the first checkpoint code wrote it."""
    reference = quiet_fit(_model(max_iter=5), data_path)
    ckpt = tmp_path / "ckpt"
    quiet_fit(_model(max_iter=2), data_path, checkpoint=ckpt)
    (state,) = _states(ckpt)
    os.remove(ckpt / MARKER)
    os.rename(ckpt / state, ckpt / "state-000002-0123abcd.zarr")
    (ckpt / "LATEST").write_text("state-000002-0123abcd.zarr")
    resumed = quiet_fit(_model(max_iter=5), data_path, checkpoint=ckpt, resume=True)
    assert resumed.n_data_passes_ == 3  # it went on from iteration 2
    assert_same_params(resumed, reference, RTOL)
    # The marker was added, and the old-layout state went once a newer one was current.
    (state,) = _states(ckpt)
    assert sorted(os.listdir(ckpt)) == sorted(["LATEST", MARKER, state]) and "0123abcd" not in state


#: Iterations of each concurrent fit: every one saves a state (~0.1-0.5 s of writes and fsyncs).
CONCURRENT_ITER = 4


def _concurrent_models() -> list[streamem.GaussianMixture]:
    return [_model(max_iter=CONCURRENT_ITER, random_state=seed, covariance_type=cov) for seed, cov in ((0, "full"), (1, "diag"), (2, "spherical"))]


def _check_shared_directory(ckpt, data_path, fitted) -> None:
    """Every fit equals its reference; LATEST names the complete last state of one of them."""
    found = 0
    for model in fitted:
        reference = quiet_fit(streamem.GaussianMixture(**model.get_params()), data_path)
        assert_same_params(model, reference, RTOL)
        try:
            runs, iteration = load_checkpoint(ckpt, fit_settings(model), data_fingerprint(streamem.load_data(data_path)))
        except ValueError as exc:
            assert "other settings" in str(exc)
            continue
        found += 1
        assert iteration == CONCURRENT_ITER and runs[0][2] == pytest.approx(reference.lower_bounds_, rel=RTOL)
    assert found == 1


def test_concurrent_fits_in_threads_share_a_directory(data_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    models = _concurrent_models()
    start = threading.Barrier(len(models))
    errors: list[BaseException] = []

    def fit(model):
        try:
            start.wait()
            quiet_fit(model, data_path, checkpoint=ckpt)
        except BaseException as exc:  # reported below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=fit, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    _check_shared_directory(ckpt, data_path, models)


_PROCESS_FIT = """
import os, sys, time, json, warnings
import streamem
go, ckpt, data, params, out = sys.argv[1:6]
while not os.path.exists(go):
    time.sleep(0.01)
warnings.simplefilter("ignore")
model = streamem.GaussianMixture(**json.loads(params)).fit(data, checkpoint=ckpt)
model.save(out)
"""


def test_concurrent_fits_in_processes_share_a_directory(data_path, tmp_path):
    ckpt, go = tmp_path / "ckpt", tmp_path / "go"
    models = _concurrent_models()[:2]  # each process costs seconds of imports
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_FIT, go, ckpt, data_path, json.dumps(m.get_params()), tmp_path / f"m{i}.zarr"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i, m in enumerate(models)
    ]
    time.sleep(0.5)
    go.write_text("")
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    _check_shared_directory(ckpt, data_path, [streamem.load(tmp_path / f"m{i}.zarr") for i in range(len(models))])


# ------------------------------------------------------------ item 9: numpy-scalar settings
NUMPY_SETTINGS = dict(n_components=np.int64(3), tol=np.float32(1e-3), reg_covar=np.float64(1e-6), random_state=np.int64(0))


def test_numpy_scalar_settings_checkpoint_and_resume(data_path, tmp_path):
    native = {k: v.item() for k, v in NUMPY_SETTINGS.items()}
    reference = quiet_fit(streamem.GaussianMixture(max_iter=4, **native), data_path)
    ckpt = tmp_path / "ckpt"
    quiet_fit(streamem.GaussianMixture(max_iter=2, **NUMPY_SETTINGS), data_path, checkpoint=ckpt)
    resumed = quiet_fit(streamem.GaussianMixture(max_iter=4, **NUMPY_SETTINGS), data_path, checkpoint=ckpt, resume=True)
    assert resumed.n_data_passes_ == 2
    assert_same_params(resumed, reference, RTOL)


def test_fit_settings_are_json_native():
    model = streamem.GaussianMixture(**NUMPY_SETTINGS, dtype=np.dtype("float32"), n_init=np.int32(2))
    settings = fit_settings(model)
    assert json.loads(json.dumps(settings)) == settings
    assert settings["n_components"] == 3 and type(settings["n_components"]) is int
    assert settings["random_state"] == 0 and settings["dtype"] == "float32" and settings["n_init"] == 2
    assert type(settings["tol"]) is float and settings["tol"] == float(np.float32(1e-3))
    assert fit_settings(streamem.GaussianMixture(tol=Fraction(1, 1000)))["tol"] == 0.001


def test_fit_settings_refuse_what_json_cannot_hold():
    model = streamem.GaussianMixture()
    model.init_params = object()
    with pytest.raises(TypeError, match="init_params"):
        fit_settings(model)


def test_other_numpy_random_state_is_refused(data_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    quiet_fit(_model(max_iter=2, random_state=np.int64(0)), data_path, checkpoint=ckpt)
    with pytest.raises(ValueError, match="random_state"):
        quiet_fit(_model(max_iter=3, random_state=np.int64(1)), data_path, checkpoint=ckpt, resume=True)


# ------------------------------------------------------------ item 16: spellings of the data path
@pytest.mark.parametrize("spelling", ["./data.zarr", "data.zarr/", "absolute", "path", "sub/../data.zarr"])
def test_any_spelling_of_the_data_path_resumes(X, tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    write_zarr("data.zarr", X, 500)
    reference = quiet_fit(_model(max_iter=3), "data.zarr")
    quiet_fit(_model(max_iter=2), "data.zarr", checkpoint="ckpt")
    other = {"absolute": str(tmp_path / "data.zarr"), "path": Path("data.zarr")}.get(spelling, spelling)
    resumed = quiet_fit(_model(max_iter=3), other, checkpoint="ckpt", resume=True)
    assert resumed.n_data_passes_ == 1
    assert_same_params(resumed, reference, RTOL)


def test_a_copy_of_the_data_elsewhere_is_still_other_data(X, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_zarr("data.zarr", X, 500)
    quiet_fit(_model(max_iter=2), "data.zarr", checkpoint="ckpt")
    shutil.copytree("data.zarr", "copy.zarr")
    with pytest.raises(ValueError, match="source"):
        quiet_fit(_model(max_iter=3), "copy.zarr", checkpoint="ckpt", resume=True)


def test_zarr_array_input_spellings_resume(X, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_zarr("data.zarr", X, 500)
    quiet_fit(_model(max_iter=2), zarr.open_array("data.zarr", mode="r"), checkpoint="ckpt")
    resumed = quiet_fit(_model(max_iter=3), zarr.open_array(str(tmp_path / "data.zarr"), mode="r"), checkpoint="ckpt", resume=True)
    assert resumed.n_data_passes_ == 1
