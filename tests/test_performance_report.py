"""``--performance-report FILE.html`` on fit, update and predict (issue 16, item 4).

The commands run through :func:`streamem.cli.main` in process (the
report is about the run, not the process): fit and update on conftest's
shared 2-worker cluster given by ``--scheduler`` (so that a report holding
another run's tasks would show), predict on a 1-worker LocalCluster it starts. The
report is Dask's own (distributed's
``performance_report``, drawn with bokeh). Its content is checked for the
names of the tasks each command ran (the functions of streamem's task
graphs) and for the work it timed; the models and labels the commands
write are checked against runs without the option.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import zarr
from numpy.testing import assert_array_equal

import streamem
from workflow_helpers import check_ok, check_usage_error, cli_main, inits, mixture_sample, quiet_fit, write_zarr

LOCAL = ("--workers", 1, "--threads-per-worker", 1)
CHUNK_ROWS = 500


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(2000, seed=171)


@pytest.fixture(scope="module")
def data_path(X, tmp_path_factory) -> str:
    return write_zarr(tmp_path_factory.mktemp("report-data") / "data.zarr", X, CHUNK_ROWS)


@pytest.fixture(scope="module")
def model_path(X, tmp_path_factory) -> str:
    model = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=3, **inits("full")), X)
    path = tmp_path_factory.mktemp("report-model") / "model.zarr"
    model.save(path)
    return str(path)


def report_text(path) -> str:
    """The report's HTML; it must be a complete bokeh document."""
    text = open(path).read()
    assert text.lstrip().lower().startswith("<!doctype html>") and text.rstrip().endswith("</html>"), "not a complete HTML file"
    assert "Dask Performance Report" in text
    return text


def n_tasks(text: str, workers: int = 1, threads: int = 1) -> int:
    """The task count of the report's summary, which names the cluster's workers and threads."""
    assert re.search(rf"Workers: {workers} &lt;/li&gt;.*Threads: {threads} &lt;/li&gt;", text), "the summary names the cluster"
    return int(re.search(r"number of tasks: (\d+)", text).group(1))


def only_entry(directory, name: str) -> None:
    """``directory`` holds ``name`` and nothing else of ours: no temporary report left behind."""
    leftovers = [entry for entry in os.listdir(directory) if entry.startswith(".partial-")]
    assert leftovers == [], leftovers
    assert name in os.listdir(directory)


def test_fit_update_and_predict_write_their_reports(X, data_path, model_path, cluster, scheduler_flags, tmp_path):
    """One test (the module's only cluster runs): each command's report names the tasks it ran, and only those."""
    reports = tmp_path / "reports"
    reports.mkdir()
    shared = scheduler_flags
    workers = cluster.scheduler_info["workers"].values()
    size = {"workers": len(workers), "threads": sum(w["nthreads"] for w in workers)}  # 2 and 2

    # fit: batch EM passes run one task per group of chunks (_run_group).
    fit_report = reports / "fit.html"
    fit_report.write_text("an older report")  # replaced, as a picture is
    out = tmp_path / "fit.zarr"
    flags = ("--n-components", 3, "--tol", 0, "--max-iter", 3, "--random-state", 0)
    proc = check_ok(cli_main("fit", data_path, "--out", out, *flags, *shared, "--performance-report", fit_report))
    assert f"wrote performance report {fit_report}" in proc.stderr
    text = report_text(fit_report)
    assert "_run_group" in text and n_tasks(text, **size) >= 3  # 3 passes at least
    only_entry(reports, "fit.html")
    # The report changes nothing else: the model is the library's.
    reference = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=3, random_state=0), data_path)
    np.testing.assert_allclose(streamem.load(out).means_, reference.means_, rtol=1e-10)

    # update: stepwise EM chains one task per chunk (_run_link), each after reading its chunk.
    update_report = reports / "update.html"
    check_ok(cli_main("update", model_path, data_path, "--out", tmp_path / "updated.zarr", *shared, "--quiet",
                      "--performance-report", update_report))  # fmt: skip
    text = report_text(update_report)
    assert "_run_link" in text and "zarr-read" in text
    assert n_tasks(text, **size) >= 4 + 4  # at least the links and the reads of the 4 chunks
    assert "_run_group" not in text  # the report covers this run only (fit ran on the same scheduler)

    # predict: labels per chunk (_block_labels, fused by Dask with the chunk's read and its store into one task);
    # on a LocalCluster the command starts itself.
    predict_report = reports / "predict.html"
    labels_out = tmp_path / "labels.zarr"
    check_ok(cli_main("predict", model_path, data_path, "--out", labels_out, *LOCAL, "--quiet",
                      "--performance-report", predict_report))  # fmt: skip
    text = report_text(predict_report)
    assert "block_labels-zarr-read-store-map" in text
    assert n_tasks(text) >= 4  # the labels of the 4 chunks at least
    assert_array_equal(zarr.open_array(str(labels_out / "labels"))[:], streamem.load(model_path).predict(X))
    assert sorted(os.listdir(reports)) == ["fit.html", "predict.html", "update.html"]

    # A run that fails on the cluster writes no report: the old one stays, and no temporary file is left.
    bad = X.copy()
    bad[1234, 1] = np.nan
    bad_path = write_zarr(tmp_path / "bad.zarr", bad, CHUNK_ROWS)
    before = open(predict_report).read()
    proc = cli_main("predict", model_path, bad_path, "--out", tmp_path / "bad-labels.zarr", *shared, "--quiet",
                    "--performance-report", predict_report)  # fmt: skip
    check_usage_error(proc, "non-finite")
    assert open(predict_report).read() == before
    assert sorted(os.listdir(reports)) == ["fit.html", "predict.html", "update.html"]


def test_bad_report_path_exits_2_before_any_work(data_path, model_path, tmp_path):
    """Checked before the data are read or a cluster starts (one line: no 'dashboard:' line; no --out)."""
    out = tmp_path / "out.zarr"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    (tmp_path / "a-dir").mkdir()
    cases = [
        ("fit", tmp_path / "missing" / "report.html", "does not exist"),
        ("fit", a_file / "report.html", "is not a directory"),
        ("fit", tmp_path / "a-dir", "is a directory"),
        ("fit", out, "is the --out"),
        ("update", tmp_path / "missing" / "report.html", "does not exist"),
        ("predict", os.path.join(data_path, "report.html"), "is inside the data"),
    ]
    for command, path, why in cases:
        head = ("fit", data_path) if command == "fit" else (command, model_path, data_path)
        proc = cli_main(*head, "--out", out, *LOCAL, "--performance-report", path)
        check_usage_error(proc, f"streamem {command}: error: --performance-report", why)
        assert not os.path.exists(out)


def test_report_needs_a_cluster(data_path, tmp_path):
    """--workers 0 runs Dask's threads in this process: there is no scheduler to report on."""
    out = tmp_path / "out.zarr"
    for workers_flag in (("--workers", 0), ("--config", _config(tmp_path, "workers: 0\n"))):
        proc = cli_main("fit", data_path, "--out", out, *workers_flag, "--performance-report", tmp_path / "r.html")
        check_usage_error(proc, "--performance-report needs a Dask cluster", "--workers 0")
        assert not os.path.exists(out) and not os.path.exists(tmp_path / "r.html")


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)
