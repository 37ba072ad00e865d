"""Breaking review of issue 17 ("The command line and the first hour").

Every test marked ``# DEFECT n`` reproduces a defect found by this review and fails until it
is fixed; the others cover what the existing tests (test_cli_polish.py, test_first_run.py,
test_cli.py, test_init.py) leave out. Commands run in process through ``streamem.cli.main``
(``--workers 0`` unless the test is about a cluster); a subprocess only where the behaviour
needs the real command (a signal during the imports, the nightly script).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from numpy.testing import assert_allclose

import streamem
from streamem.cli import UsageError, load_config
from workflow_helpers import REPO, inits, lines, listing, mixture_sample, one_line_error, quiet_fit, write_zarr
from workflow_helpers import run_main as run

N_ROWS = 600
CHUNK_ROWS = 200
SCRIPT = os.path.join(os.path.dirname(sys.executable), "streamem")  # the installed console script
NO_CLUSTER = ("--workers", "0")


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(N_ROWS, seed=1)


@pytest.fixture(scope="module")
def stores(X, tmp_path_factory) -> dict[str, str]:
    """Data (3 features), the same rows with 2 features and with one NaN, a 3-component model of the data."""
    root = tmp_path_factory.mktemp("review17")
    bad = np.array(X)
    bad[N_ROWS - 10, 1] = np.nan
    model = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=3, **inits("full")), X)
    model.save(root / "model.zarr")
    return {
        "data": write_zarr(root / "data.zarr", X, CHUNK_ROWS),
        "two": write_zarr(root / "two.zarr", np.ascontiguousarray(X[:, :2]), CHUNK_ROWS),
        "nan": write_zarr(root / "nan.zarr", bad, CHUNK_ROWS),
        "model": os.fspath(root / "model.zarr"),
    }


# ------------------------------------------------------------------ outputs that destroy
# DEFECT 1: `generate OUT --overwrite` deletes whatever directory is at OUT (generate.py: shutil.rmtree), the
# current directory included (`generate . --overwrite` empties it, then fails with "'.': Invalid argument"); the
# other commands replace only streamem's own stores (io.check_replaceable).
@pytest.mark.parametrize("where", ["a directory of the user's files", "the current directory"])
def test_generate_overwrite_never_deletes_a_directory_it_did_not_write(where, tmp_path, monkeypatch, capfd):
    victim = tmp_path / "mine"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (victim / "results").mkdir()
    out = victim
    if where == "the current directory":
        monkeypatch.chdir(victim)
        out = "."
    status, _, err = run(capfd, "generate", out, "--overwrite", "--n-samples", 10, "--n-features", 2, "--n-components", 1)
    assert listing(victim) == ["precious.txt", "results"], f"generate deleted the user's files (exit {status!r}: {err})"
    one_line_error(status, err, "--overwrite")


def test_generate_overwrite_replaces_its_own_data(tmp_path, capfd):
    """The fix of DEFECT 1 must keep what --overwrite is for: writing the data set anew."""
    out = tmp_path / "gen.zarr"
    assert run(capfd, "generate", out, "--n-samples", 10, "--n-features", 2, "--n-components", 1, "-q")[0] == 0
    status, _, err = run(capfd, "generate", out, "--overwrite", "--n-samples", 12, "--n-features", 2, "--n-components", 1, "-q")
    assert status == 0, err
    assert zarr.open_array(os.fspath(out), mode="r").shape == (12, 2)


# DEFECT 2: `--out DIR --overwrite`, DIR not a store streamem wrote, passes check_out and is refused only by
# io.check_replaceable when the result is saved: after the whole fit / update / predict / accumulate (and the
# cluster's start), which is thrown away. cli.check_out should call io.check_replaceable when overwrite is given.
@pytest.mark.parametrize("command", ["fit", "update", "predict", "accumulate"])
def test_overwrite_of_a_directory_streamem_did_not_write_is_refused_before_any_work(command, stores, tmp_path, capfd):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    inputs = {"fit": (stores["data"], "--n-components", 2), "update": (stores["model"], stores["data"]),
              "predict": (stores["model"], stores["data"]), "accumulate": (stores["model"], stores["data"])}[command]  # fmt: skip
    status, _, err = run(capfd, command, *inputs, "--out", foreign, "--overwrite", *NO_CLUSTER)
    one_line_error(status, err, "--out")  # today: the run's log lines come first, then the refusal
    assert listing(foreign) == ["notes.txt"]


# DEFECT 3: a flag named twice in one message (cli_words turns the library's "overwrite=True (--overwrite)" into
# "--overwrite (--overwrite)"; check_checkpoint prefixes "--checkpoint: " to a message that starts "--checkpoint X").
def test_messages_name_each_flag_once(stores, tmp_path, capfd):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _, _, err = run(capfd, "predict", stores["model"], stores["data"], "--out", foreign, "--overwrite", *NO_CLUSTER, "-q")
    assert "--overwrite (--overwrite)" not in err, err
    _, _, err = run(capfd, "fit", stores["data"], "--out", tmp_path / "m.zarr", "--checkpoint", foreign, *NO_CLUSTER, "-q")
    assert "--checkpoint" in err and "--checkpoint: --checkpoint" not in err, err


# DEFECT 4: an output inside the input model is accepted by update (check_distinct leaves MODEL out, to allow an
# update in place) and by fit with --init-from (not compared at all): a new store is written into the model's
# directory; predict refuses the same ("is inside the model"). cmd_update / cmd_fit: refuse "inside" (not "is").
@pytest.mark.parametrize("command", ["update", "fit --init-from"])
def test_an_output_inside_the_input_model_is_refused(command, stores, tmp_path, capfd):
    model = tmp_path / "model.zarr"
    streamem.load(stores["model"]).save(model)
    before = listing(model)
    if command == "update":
        argv = ("update", model, stores["data"], "--out", model / "next.zarr")
    else:
        argv = ("fit", stores["data"], "--init-from", model, "--out", model / "next.zarr", "--max-iter", 2)
    status, _, err = run(capfd, *argv, *NO_CLUSTER, "-q")
    assert listing(model) == before, f"the input model was written into (exit {status!r})"
    one_line_error(status, err, "--out", "inside")


# ------------------------------------------------------------ checks before any work
# DEFECT 5: values the estimator could check at once are refused only when the fit meets them, after the cluster
# (here: the "no cluster" line) and not in command-line words: --random-state -1 ("Seed must be between 0 and
# 2**32 - 1"), --reg-covar inf ("array must not contain infs or NaNs"). Fix: MixtureEstimator._check_parameters
# (streamem/estimators/base.py) checks the seed range and a finite reg_covar, which cmd_fit already calls early.
@pytest.mark.parametrize(
    "flag, value", [("--random-state", "-1"), ("--random-state", "4294967296"), ("--reg-covar", "inf")]
)
def test_values_checkable_before_the_run_are_refused_naming_the_flag(flag, value, stores, tmp_path, capfd):
    status, _, err = run(capfd, "fit", stores["data"], "--out", tmp_path / "m.zarr", "--n-components", 2, flag, value, *NO_CLUSTER)
    one_line_error(status, err, flag)
    assert not (tmp_path / "m.zarr").exists()


# DEFECT 6: cluster settings are not checked before use. --worker-timeout nan|inf reach Dask as "nans"/"infs":
# a LocalCluster starts, a distributed WARNING line, then a ~1,500-character error naming no flag;
# --scheduler-timeout -1 says "could not convert string to float: '1-1.0'", --scheduler-timeout nan ends in a
# KeyError traceback (exit 1); --memory-limit banana names no flag. Fix: cli.dask_client (or a check before
# cmd_* load anything): finite positive timeouts, memory_limit through dask.utils.parse_bytes ('auto' allowed).
@pytest.mark.parametrize(
    "flag, value, extra",
    [
        ("--worker-timeout", "nan", ("--workers", "1")),
        ("--worker-timeout", "inf", ("--workers", "1")),
        ("--scheduler-timeout", "-1", ("--scheduler", "tcp://127.0.0.1:9")),
        ("--scheduler-timeout", "nan", ("--scheduler", "tcp://127.0.0.1:9")),
        ("--memory-limit", "banana", ("--workers", "1")),
    ],
)
def test_cluster_settings_are_checked_and_named(flag, value, extra, stores, tmp_path, capfd):
    status, _, err = run(capfd, "score", stores["model"], stores["data"], flag, value, *extra)
    line = one_line_error(status, err, flag)
    assert len(line) < 300, line


# DEFECT 7: `update --resume` with a checkpoint of another fit is refused only inside model.update, after the
# cluster has started (fit refuses the same before: cli.resume_point). cmd_update should check the checkpoint's
# state against the update's settings and data before dask_client, as cmd_fit does.
def test_update_refuses_a_checkpoint_of_another_fit_before_the_run(stores, tmp_path, capfd):
    ck = tmp_path / "ck"
    status, _, err = run(capfd, "fit", stores["data"], "--out", tmp_path / "m.zarr", "--n-components", 3, "--max-iter", 1,
                         "--checkpoint", ck, *NO_CLUSTER, "-q")  # fmt: skip
    assert status == 0, err
    status, _, err = run(capfd, "update", stores["model"], stores["data"], "--out", tmp_path / "u.zarr", "--checkpoint", ck,
                         "--resume", *NO_CLUSTER)  # fmt: skip
    one_line_error(status, err, "--checkpoint", "--no-resume")
    assert not (tmp_path / "u.zarr").exists()


def test_update_resumes_its_own_checkpoint_and_counts_new_rows_once(stores, tmp_path, capfd):
    """The early check of DEFECT 7 accepts the update's own checkpoint; `--passes 2` reports the data's rows once
    (it said "1,200 new rows" for 600), while the model counts both passes as seen, as MixtureEstimator.update does."""
    ck, seen = tmp_path / "ck", streamem.load(stores["model"])._rows_seen()
    status, _, err = run(capfd, "update", stores["model"], stores["data"], "--out", tmp_path / "u1.zarr", "--checkpoint", ck, *NO_CLUSTER)
    assert status == 0, err
    assert f"with {N_ROWS} new rows ({seen + N_ROWS:,} seen in all)" in err, err
    status, _, err = run(capfd, "update", stores["model"], stores["data"], "--out", tmp_path / "u2.zarr", "--checkpoint", ck,
                         "--resume", "--passes", 2, *NO_CLUSTER)  # fmt: skip
    assert status == 0, err
    assert f"resumed from checkpoint {ck} at pass 1" in err, err
    assert f"with {N_ROWS} new rows in 2 passes ({seen + 2 * N_ROWS:,} seen in all)" in err, err
    assert streamem.load(tmp_path / "u2.zarr").n_rows_seen_ == seen + 2 * N_ROWS


# ------------------------------------------------------------------ errors on a cluster
# DEFECT 8: an error found by the workers reaches stderr as the workers' own logs: predict on data with a NaN prints
# "distributed.worker - ERROR - Compute Failed" with its traceback (16 lines; score 9) before the one-line error,
# after a "dashboard:" line. Fix: start the LocalCluster's workers with distributed logging at "critical" (as
# scripts/demo.py does; the client reports the error), and say "dashboard:" only once the run is under way or
# only in a log line that an error replaces. (Ctrl-C during predict on a cluster likewise printed workers'
# "Async instruction ... ended with CancelledError" warnings and once left OUT.tmp-* behind: racy, no test.)
def test_an_error_found_by_the_workers_is_one_line(stores, tmp_path):
    # The real command: the workers' logs reach its stderr (an in-process run's capture does not see them).
    proc = subprocess.run([sys.executable, "-m", "streamem.cli", "predict", stores["model"], stores["nan"], "--out",
                           tmp_path / "p.zarr", "--workers", "1"], capture_output=True, text=True, timeout=240, cwd=tmp_path)  # fmt: skip
    assert "Traceback" not in proc.stderr and "Compute Failed" not in proc.stderr, proc.stderr
    # The lead kept the "dashboard:" line of a run that started (the error was found by the run, not before it):
    # it is the only line before the error.
    err = "\n".join(line for line in lines(proc.stderr) if not line.startswith("dashboard: "))
    one_line_error(proc.returncode, err, "non-finite")
    assert os.listdir(tmp_path) == []


# DEFECT 15 (streamem/estimators/base.py, the lead's): predict and score say how many values are not finite but
# not where ("the data contain 1 non-finite values (NaN or inf)"); fit and accumulate name the rows ("in rows 590
# to 590"). Fix: _check_finite(block, offset) in _per_row names the chunk's first and last bad row (+ offset).
@pytest.mark.parametrize("command", ["predict", "score"])
def test_predict_and_score_locate_non_finite_values(command, stores, tmp_path, capfd):
    extra = ("--out", tmp_path / "p.zarr") if command == "predict" else ()
    status, _, err = run(capfd, command, stores["model"], stores["nan"], *extra, *NO_CLUSTER, "-q")
    one_line_error(status, err, "non-finite", f"rows {N_ROWS - 10}")


# DEFECT 9: Ctrl-C during the first second or two of any command (the console script imports streamem.cli, hence
# streamem/__init__ with dask and scikit-learn, before main() can catch it) prints a KeyboardInterrupt traceback
# of the imports. Fix: an entry point (e.g. streamem/_entry.py, set in pyproject's [project.scripts]) that imports
# streamem.cli inside try/except KeyboardInterrupt and prints "streamem: interrupted", exit 130.
def test_ctrl_c_during_the_imports_is_one_line(stores):
    if not os.path.exists(SCRIPT):
        pytest.skip(f"no console script at {SCRIPT}")
    proc = subprocess.Popen([SCRIPT, "info", stores["model"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # the imports take ~2 s
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err[-800:]
    assert proc.returncode == 130 and len(lines(err)) == 1 and "interrupted" in err, (proc.returncode, err)


# ------------------------------------------------------------- command-line words
# DEFECT 10: errors that still speak the library's or numpy's words instead of naming the flag.
@pytest.mark.parametrize(
    "argv, needles",
    [
        (("generate", "{tmp}/g.zarr", "--n-samples", "0"), ("--n-samples",)),  # "n_samples must be ..."
        (("generate", "{tmp}/g.zarr", "--chunk-rows", "0", "--n-samples", "10"), ("--chunk-rows",)),  # "chunk_rows ..."
        (("generate", "{tmp}/g.zarr", "--seed", "-1", "--n-samples", "10"), ("--seed",)),  # "expected non-negative integer"
        (("plot", "{model}", "--data", "{data}", "--out", "{tmp}/f.png", "--features", "0", "5"), ("--features",)),
        (("plot", "{model}", "--data", "{data}", "--out", "{tmp}/f.png", "--n-points", "-1"), ("--n-points",)),  # "Negative dimensions"
        # "--init-from: the old model has other n_components or covariance_type than asked for"
        (("fit", "{data}", "--init-from", "{model}", "--n-components", "4", "--out", "{tmp}/m.zarr", *NO_CLUSTER), ("--n-components 4", "3")),
        (("fit", "{data}", "--config", "{tmp}/binary.yaml", "--out", "{tmp}/m.zarr"), ("--config",)),  # "'utf-8' codec can't ..."
    ],
    ids=["generate-n-samples", "generate-chunk-rows", "generate-seed", "plot-features", "plot-n-points",
         "init-from-n-components", "config-not-text"],  # fmt: skip
)
def test_errors_name_the_flag(argv, needles, stores, tmp_path, capfd):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00n_components: 2\n")
    places = {**stores, "tmp": os.fspath(tmp_path)}
    status, _, err = run(capfd, *(arg.format(**places) for arg in argv), "-q")
    one_line_error(status, err, *needles)


# DEFECT 11: a flag misspelled where a required one is expected is not named: `fit DATA --outt M` says only "the
# following arguments are required: --out" (argparse's required check runs before cli._main sees the extras).
# Fix: in _Parser.error, when the message is about required arguments, add unrecognized()'s "did you mean".
@pytest.mark.parametrize(
    "argv, typo, meant",
    [(("fit", "{data}", "--outt", "{tmp}/m.zarr"), "--outt", "--out"),
     (("reduce", "{tmp}/s.zarr", "--modle", "{model}", "--out", "{tmp}/r.zarr"), "--modle", "--model")],  # fmt: skip
)
def test_a_misspelled_required_flag_is_named(argv, typo, meant, stores, tmp_path, capfd):
    places = {**stores, "tmp": os.fspath(tmp_path)}
    status, _, err = run(capfd, *(arg.format(**places) for arg in argv))
    one_line_error(status, err, typo, f"did you mean {meant}?")


# ------------------------------------------------------------------------------ plots
# DEFECT 12: `streamem plot` of a one-feature Gaussian model with --data: IndexError traceback, exit 1
# (plot._scatter indexes a second projected column). Fix: plot.py draws a histogram with the component densities
# for one feature (or refuses it in one line).
def test_plot_of_a_one_feature_model(X, tmp_path, capfd):
    quiet_fit(streamem.GaussianMixture(2, random_state=0, max_iter=5), X[:, :1]).save(tmp_path / "m1.zarr")
    data = write_zarr(tmp_path / "one.zarr", np.ascontiguousarray(X[:, :1]), CHUNK_ROWS)
    status, _, err = run(capfd, "plot", tmp_path / "m1.zarr", "--data", data, "--out", tmp_path / "f.png", "-q")
    # Fixed by drawing (a histogram with the component densities), so a refusal no longer passes.
    assert status == 0, f"exit {status!r}: {err}"
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")


def test_one_feature_histogram_draws_the_weighted_component_densities(X):
    """The curves of DEFECT 12's histogram against scipy's normal densities, and their sum against score_samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    from streamem.plot import _histogram

    model = quiet_fit(streamem.GaussianMixture(2, random_state=0, max_iter=5), X[:, :1])
    fig, ax = plt.subplots()
    try:
        _histogram(model, X[:200, :1], ax)
        curves = [line.get_ydata() for line in ax.lines]
        x = ax.lines[0].get_xdata()
    finally:
        plt.close(fig)
    assert len(curves) == 3  # two components and the mixture
    for k in range(2):
        reference = model.weights_[k] * norm.pdf(x, model.means_[k, 0], np.sqrt(model.covariances_[k].ravel()[0]))
        assert_allclose(curves[k], reference, rtol=1e-10)
    assert_allclose(curves[2], np.exp(model.score_samples(x[:, None])), rtol=1e-10)


# DEFECT 13: `plot --out NAME` without a suffix, or naming an existing directory: matplotlib writes NAME.png
# (replacing one that is there, unchecked) but the command says "wrote NAME"; `--out .` writes "./.png".
# Fix: cmd_plot checks and writes the path matplotlib will use (or refuses a directory / a name without a
# format suffix, before reading the data) and reports it.
@pytest.mark.parametrize("name", ["figure", "a-directory"])
def test_plot_writes_the_file_it_reports(name, stores, tmp_path, capfd):
    out = tmp_path / name
    if name == "a-directory":
        out.mkdir()
    status, _, err = run(capfd, "plot", stores["model"], "--data", stores["data"], "--out", out)
    if status == 2:
        one_line_error(status, err, "--out")
        assert listing(tmp_path) == ([name] if out.exists() else [])
        return
    assert status == 0, err
    reported = re.search(r"^wrote (.+)$", err, flags=re.M).group(1)
    assert os.path.isfile(reported), f"said 'wrote {reported}', but {listing(tmp_path)} is what is there"
    assert listing(tmp_path) == sorted({name, os.path.basename(reported)})


def test_plot_replaces_an_existing_picture(stores, tmp_path, capfd):
    """A picture is not a store: the --overwrite check of DEFECT 2 must not refuse to replace it."""
    out = tmp_path / "f.svg"
    out.write_text("an older picture")
    status, _, err = run(capfd, "plot", stores["model"], "--out", out, "-q")
    assert status == 0, err
    assert b"<svg" in out.read_bytes()


def test_plot_twice_through_the_command_gives_the_same_bytes(stores, tmp_path, capfd):
    """Item 7 end to end: the scatter's orientation and the ticks do not change between runs."""
    pictures = []
    for name in ("a.png", "b.png"):
        status, _, err = run(capfd, "plot", stores["model"], "--data", stores["data"], "--out", tmp_path / name, "-q")
        assert status == 0, err
        pictures.append((tmp_path / name).read_bytes())
    assert pictures[0] == pictures[1]


# ----------------------------------------------------------------------------- README
# DEFECT 14: the README's "Command line" block cannot be run as written: its second `streamem fit` writes
# model.zarr again and its second `streamem update` model-2.zarr again, without --overwrite, so a new user who
# pastes the block is stopped half-way ("exists; pass --overwrite"). Fix: README.md, other --out names.
def test_readme_command_line_block_writes_no_output_twice():
    with open(os.path.join(REPO, "README.md")) as fh:
        text = fh.read()
    block = re.search(r"^## Command line\n+```bash\n(.*?)```", text, flags=re.M | re.S).group(1)
    written: dict[str, str] = {}
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "streamem":
            continue
        out = words[words.index("--out") + 1] if "--out" in words else (words[2] if words[1] == "generate" else None)
        if out is None or "--overwrite" in words:
            continue
        assert out not in written, f"{out} is written by\n  {written[out]}\nand again, without --overwrite, by\n  {line}"
        written[out] = line


# --------------------------------------------------------------------------- item 8, config, nightly script
def test_random_init_at_exactly_init_sample_size_is_sklearns(X):
    """The boundary n == init_sample_size (irregular chunks, two runs) still starts from scikit-learn's draw."""
    import dask.array as da
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    params = dict(n_components=3, init_params="random", max_iter=2, tol=0, random_state=11, n_init=2, covariance_type="diag")
    reference = quiet_fit(SkGaussianMixture(**params), X)
    ours = quiet_fit(streamem.GaussianMixture(init_sample_size=N_ROWS, **params), da.from_array(X, chunks=((250, 50, 300), (3,))))
    assert_allclose(ours.means_, reference.means_, rtol=0, atol=1e-10)
    assert_allclose(ours.lower_bound_, reference.lower_bound_, rtol=1e-12)


def test_yaml_odd_but_exact_values_and_odd_files(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_iter: 1e2\noverwrite: yes\nresume: off\nn_components: '4'\n")
    assert load_config(str(cfg)) == {"max_iter": 100, "overwrite": True, "resume": False, "n_components": 4}
    cfg.write_text("# nothing set\n")
    assert load_config(str(cfg)) == {}
    for text, needle in (("- n_components\n- 3\n", "mapping"), ("max_iter: 10.5\n", "'max_iter'"), ("max_iter: .inf\n", "'max_iter'")):
        cfg.write_text(text)
        with pytest.raises(UsageError, match=re.escape(needle)):
            load_config(str(cfg))


@pytest.mark.parametrize("env, args", [({"MODE": "Update"}, ["d.zarr", "models"]), ({}, ["d.zarr", "models", "c.yaml", "x"])])
def test_nightly_refit_refuses_bad_arguments_before_running_streamem(env, args, tmp_path):
    """A bad MODE or an extra argument: one line, exit 2, and streamem is never started (STREAMEM would fail)."""
    script = os.path.join(REPO, "scripts", "nightly_refit.sh")
    full_env = {**os.environ, "STREAMEM": "/nonexistent/streamem", **env}
    proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=30, env=full_env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines(proc.stderr)) == 1 and "nonexistent" not in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []
