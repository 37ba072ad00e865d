"""The command line as a batch-job user meets it (issue 17 items 1, 2, 3 and 5).

One-line errors in command-line words, checks before any cluster starts,
Ctrl-C and closed pipes, progress bars that say what they are, and help for
every argument. Commands run through :func:`streamem.cli.main` in process
(``cli_main``); Ctrl-C and the closed pipe need the real command in a
subprocess. Progress bars are read from a pseudo-terminal that is the
command's stderr.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import pytest
from numpy.testing import assert_allclose

import streamem
from streamem.matching import match_components
from workflow_helpers import REPO, check_ok, check_usage_error, cli_main, inits, main_in_process, mixture_sample, quiet_fit, write_zarr

N_ROWS = 3000
CHUNK_ROWS = 500  # 6 chunks


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(N_ROWS, seed=71, spread=0.7)


@pytest.fixture(scope="module")
def stores(X, tmp_path_factory) -> dict[str, str]:
    """The data (3 features), the same rows with 2 features, and a 3-component model of the data."""
    root = tmp_path_factory.mktemp("polish")
    model = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=5, **inits("full")), X)
    model.save(root / "model.zarr")
    return {
        "data": write_zarr(root / "data.zarr", X, CHUNK_ROWS),
        "two": write_zarr(root / "two.zarr", np.ascontiguousarray(X[:, :2]), CHUNK_ROWS),
        "model": os.fspath(root / "model.zarr"),
    }


# ------------------------------------------------------------ item 1: errors
@pytest.mark.parametrize(
    "args, needles",
    [
        (("fit",), ("streamem fit: error:", "required: data, --out", "see streamem fit --help")),
        (("fit", "{data}", "--out", "{out}", "--n-componets", "3"), ("streamem fit: error:", "--n-componets", "did you mean --n-components?")),
        (("fit", "{data}", "--out", "{out}", "--covariance-type", "round"), ("streamem fit: error:", "'round'", "tied")),
        (("fitt", "{data}"), ("streamem: error:", "'fitt'", "see streamem --help")),
        (("predict", "{model}"), ("streamem predict: error:", "data", "--out")),
    ],
)
def test_usage_errors_are_one_line_from_the_commands_parser(args, needles, stores, tmp_path):
    places = {**stores, "out": os.fspath(tmp_path / "out.zarr")}
    proc = cli_main(*(arg.format(**places) for arg in args))
    check_usage_error(proc, *needles)
    assert "usage:" not in proc.stderr


def test_a_misspelled_flag_is_the_commands_error_not_the_top_level_usage(stores, tmp_path):
    proc = cli_main("predict", stores["model"], stores["data"], "--out", tmp_path / "p.zarr", "--probba")
    line = check_usage_error(proc, "streamem predict: error: unrecognized arguments: --probba", "did you mean --proba?")
    assert "COMMAND" not in line and not (tmp_path / "p.zarr").exists()


def test_library_keywords_become_flags(stores, tmp_path):
    from streamem.cli import cli_words

    none = argparse.Namespace()
    # The fit's own messages, as the estimator and streamem.checkpoint word them.
    assert cli_words("resume=True needs checkpoint= naming the checkpoint directory", none) == (
        "--resume needs --checkpoint naming the checkpoint directory")
    assert cli_words("init_sample_size=2 must be >= n_components=3: k-means needs", none) == (
        "--init-sample-size 2 must be >= --n-components 3: k-means needs")
    assert cli_words("checkpoint '/ck' was made with other settings (differs in: tol); refusing to resume", none) == (
        "--checkpoint '/ck' was made with other settings (differs in: tol); refusing to resume")
    assert cli_words("device='cuda' needs CuPy", none) == "--device cuda needs CuPy"
    # Words that only look like keywords stay.
    assert cli_words("prior['kappa'] must be >= 0", none) == "prior['kappa'] must be >= 0"

    proc = cli_main("fit", stores["data"], "--out", tmp_path / "m.zarr", "--n-components", 0, "--workers", 0)
    line = check_usage_error(proc, "--n-components must be an integer >= 1, got 0")
    assert "n_components" not in line


def test_feature_count_mismatch_names_both_stores_and_counts(stores, tmp_path):
    # predict and update: test_bad_input_is_refused_before_any_cluster_starts
    for command, extra in (("score", ()), ("accumulate", ("--out", tmp_path / "a.zarr"))):
        proc = cli_main(command, stores["model"], stores["two"], *extra, "--workers", 0)
        check_usage_error(proc, f"the data {stores['two']!r} have 2 features", f"the model {stores['model']!r} is expecting 3 features")
    proc = cli_main("fit", stores["two"], "--out", tmp_path / "m.zarr", "--init-from", stores["model"], "--workers", 0)
    check_usage_error(proc, f"--init-from: the model {stores['model']!r} has 3 features, the data {stores['two']!r} 2")
    assert sorted(os.listdir(tmp_path)) == []


def test_an_init_array_of_the_wrong_shape_names_its_file_and_the_shapes(stores, tmp_path):
    path = tmp_path / "means.npy"
    np.save(path, np.zeros((3, 4)))
    proc = cli_main("fit", stores["data"], "--out", tmp_path / "m.zarr", "--n-components", 3, "--means-init", path, "--workers", 0)
    check_usage_error(proc, f"--means-init: {os.fspath(path)!r} holds an array of shape (3, 4)", "3 components",
                      "3 features", "shape (3, 3)")  # fmt: skip


def test_an_error_during_the_run_is_one_line(X, tmp_path):
    """Bad values in the last chunk are found only by reading it: still one line, exit 2."""
    bad = np.array(X)
    bad[N_ROWS - 7, 1] = np.nan
    data = write_zarr(tmp_path / "bad.zarr", bad, CHUNK_ROWS)
    proc = cli_main("fit", data, "--out", tmp_path / "m.zarr", "--n-components", 3, "--workers", 0, "--quiet")
    check_usage_error(proc, "the data contain 1 non-finite values", f"rows {N_ROWS - 7} to {N_ROWS - 7}")


def _slow_fit(data: str, tmp_path, *extra) -> tuple[subprocess.Popen, str]:
    """A fit that runs until stopped (tol 0, no iteration limit to speak of), checkpointing every iteration."""
    checkpoint = os.fspath(tmp_path / "ck")
    cmd = [sys.executable, "-m", "streamem.cli", "fit", data, "--out", os.fspath(tmp_path / "m.zarr"), "--n-components", "3",
           "--tol", "0", "--max-iter", "1000000", "--checkpoint", checkpoint, "--quiet", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    return proc, checkpoint


def _wait_for_iterations(proc: subprocess.Popen, checkpoint: str, timeout: float = 120) -> None:
    """Until the fit has saved a state (EM is running), then a little longer."""
    deadline = time.monotonic() + timeout
    while not any(name.startswith("state-") for name in (os.listdir(checkpoint) if os.path.isdir(checkpoint) else [])):
        assert proc.poll() is None, proc.communicate()
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the fit saved no state in time")
        time.sleep(0.1)
    time.sleep(0.5)


def _interrupted(proc: subprocess.Popen, send) -> tuple[int, str, str]:
    send()
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the fit went on after Ctrl-C")
    return proc.returncode, out, err


def test_ctrl_c_exits_130_with_one_line(stores, tmp_path):
    proc, checkpoint = _slow_fit(stores["data"], tmp_path, "--workers", "0")
    _wait_for_iterations(proc, checkpoint)
    status, out, err = _interrupted(proc, lambda: proc.send_signal(signal.SIGINT))
    assert (status, out, err) == (130, "", "streamem fit: interrupted\n")
    assert not (tmp_path / "m.zarr").exists()


def test_ctrl_c_at_the_terminal_stops_the_cluster_quietly(stores, tmp_path):
    """A terminal sends SIGINT to the whole process group: the worker too, which says nothing."""
    proc, checkpoint = _slow_fit(stores["data"], tmp_path, "--workers", "1", "--threads-per-worker", "1")
    _wait_for_iterations(proc, checkpoint)
    status, out, err = _interrupted(proc, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert (status, out, err) == (130, "", "streamem fit: interrupted\n")
    time.sleep(1.0)
    left = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split("\n")
    assert [line for line in left if line.strip() and "Z" not in line.split()[-1]] == []  # no worker left running


def test_a_closed_pipe_ends_quietly(stores):
    """``streamem info model.zarr | head -1``: the reader is gone before the output is written."""
    proc = subprocess.Popen([sys.executable, "-m", "streamem.cli", "info", stores["model"]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141  # as a process killed by SIGPIPE reports itself
    assert err == ""


# ------------------------------------------------ item 2: checks before work
@pytest.fixture(scope="module")
def parse_seconds(stores) -> float:
    """How long the command line takes (in this process) to refuse a usage error: the baseline."""
    tic = time.perf_counter()
    cli_main("score", stores["model"])
    return time.perf_counter() - tic


def _refused_early(proc: subprocess.CompletedProcess, seconds: float, baseline: float, *needles: str) -> None:
    """Exit 2, one line, no cluster started (no dashboard line, and about as fast as a usage error).

    In process the refusals take milliseconds; starting a worker process takes seconds.
    """
    check_usage_error(proc, *needles)
    assert "dashboard" not in proc.stderr
    assert seconds < max(2.0, 2 * baseline), f"{seconds:.1f} s (a usage error takes {baseline:.1f} s)"


@pytest.mark.parametrize(
    "args, needles",
    [
        (("fit", "{data}", "--out", "{out}", "--n-components", "0"), ("--n-components", "got 0")),
        (("fit", "{data}", "--out", "{out}", "--n-components", "5000"), ("3000 rows", "fewer than --n-components 5000")),
        (("fit", "{data}", "--out", "{out}", "--step-decay", "0.2", "--algorithm", "stepwise"), ("--step-decay", "(0.5, 1]")),
        (("accumulate", "{model}", "{data}", "--out", "{out}", "--rows", "9:3"), ("--rows 9:3", "0:3000")),
        (("accumulate", "{model}", "{data}", "--out", "{out}", "--rows", "0:3001"), ("--rows 0:3001", "0:3000")),
        (("accumulate", "{model}", "{data}", "--out", "{out}", "--rows", "five"), ("--rows must look like START:STOP",)),
        (("predict", "{model}", "{two}", "--out", "{out}"), ("2 features", "expecting 3 features")),
        (("update", "{model}", "{two}", "--out", "{out}"), ("2 features", "expecting 3 features")),
        (("update", "{model}", "{data}", "--out", "{out}", "--step-size", "2"), ("--step-size", "(0, 1]")),
        (("update", "{model}", "{data}", "--out", "{no_dir}"), ("--out", "does not exist")),
        (("update", "{model}", "{data}", "--out", "{model}"), ("--out", "exists", "--overwrite")),
    ],
)
def test_bad_input_is_refused_before_any_cluster_starts(args, needles, stores, tmp_path, parse_seconds):
    places = {**stores, "out": os.fspath(tmp_path / "out.zarr"), "no_dir": os.fspath(tmp_path / "no" / "out.zarr")}
    tic = time.perf_counter()
    proc = cli_main(*(arg.format(**places) for arg in args), "--workers", 1)  # a cluster would start, and say so
    _refused_early(proc, time.perf_counter() - tic, parse_seconds, *needles)
    assert os.listdir(tmp_path) == []


def test_device_cuda_without_cupy_is_refused_before_any_cluster_starts(stores, tmp_path, parse_seconds):
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    tic = time.perf_counter()
    proc = cli_main("fit", stores["data"], "--out", tmp_path / "m.zarr", "--device", "cuda", "--workers", 1)
    _refused_early(proc, time.perf_counter() - tic, parse_seconds, "--device cuda needs CuPy")


def test_a_checkpoint_of_another_fit_is_refused_before_any_cluster_starts(stores, tmp_path, parse_seconds):
    ck = tmp_path / "ck"
    check_ok(cli_main("fit", stores["data"], "--out", tmp_path / "m.zarr", "--n-components", 3, "--max-iter", 1,
                 "--checkpoint", ck, "--workers", 0, "--quiet"))  # fmt: skip
    tic = time.perf_counter()
    proc = cli_main("fit", stores["data"], "--out", tmp_path / "m2.zarr", "--n-components", 2, "--checkpoint", ck, "--resume", "--workers", 1)
    _refused_early(proc, time.perf_counter() - tic, parse_seconds, f"--checkpoint {os.fspath(ck)!r}", "n_components",
                   "refusing to resume")  # fmt: skip


# ---------------------------------------------------------- item 3: progress
def run_on_terminal(*args, timeout: float = 180) -> tuple[int, str, str]:
    """``streamem ARGS`` (main in this process) with stderr on a pseudo-terminal (120 columns): exit status, stdout, stderr.

    The terminal is read in a thread while the command runs (a full terminal
    buffer would block its writes); it is the command's ``sys.stderr``, so
    ``isatty()`` is true and newlines arrive as ``\r\n``.
    """
    import io

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    seen: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, seen), daemon=True)
    reader.start()
    out = io.StringIO()
    with os.fdopen(slave, "w", buffering=1) as terminal:
        status = main_in_process(args, stdout=out, stderr=terminal, fds=False)
    reader.join(timeout)  # the terminal closed: the reader meets its end
    assert not reader.is_alive(), "the terminal was not read to its end"
    os.close(master)
    return status, out.getvalue(), b"".join(seen).decode(errors="replace")


def _drain(master: int, seen: list[bytes]) -> None:
    """Read the terminal's master side until its slave side is closed (EIO on Linux)."""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            return
        if not chunk:
            return
        seen.append(chunk)


def bar_labels(stderr: str) -> set[str]:
    """What the progress bars said: the text before ``NN%|``."""
    return set(re.findall(r"\r([^\r\n]*?):\s+\d+%\|", stderr))


def test_fit_bars_say_what_they_are(stores, tmp_path):
    status, _, err = run_on_terminal("fit", stores["data"], "--out", tmp_path / "m.zarr", "--n-components", 3,
                                     "--max-iter", 2, "--tol", 0, "--workers", 0)  # fmt: skip
    assert status == 0, err
    # k-means: a pass drawing its sample, a pass for the initial statistics; then one pass per iteration.
    assert bar_labels(err) == {"initialisation pass 1/2", "initialisation pass 2/2", "iteration 1", "iteration 2"}

    status, _, err = run_on_terminal("fit", stores["data"], "--out", tmp_path / "s.zarr", "--n-components", 3,
                                     "--max-iter", 2, "--tol", 0, "--algorithm", "stepwise", "--monitor", "exact",
                                     "--init-params", "k-means++", "--workers", 0)  # fmt: skip
    assert status == 0, err
    assert bar_labels(err) == {"initialisation pass 1/1", "pass 1 (stepwise)", "pass 1 (stepwise): log-likelihood",
                               "pass 2 (stepwise)", "pass 2 (stepwise): log-likelihood"}  # fmt: skip


def test_a_resumed_fit_says_where_it_resumed(stores, tmp_path):
    ck = tmp_path / "ck"
    common = ("--n-components", 3, "--tol", 0, "--checkpoint", ck, "--workers", 0)
    check_ok(cli_main("fit", stores["data"], "--out", tmp_path / "a.zarr", "--max-iter", 2, *common, "--quiet"))
    status, _, err = run_on_terminal("fit", stores["data"], "--out", tmp_path / "b.zarr", "--max-iter", 4, "--resume", *common)
    assert status == 0, err
    assert f"resumed from checkpoint {os.fspath(ck)} at iteration 2\r\n" in err
    assert bar_labels(err) == {"iteration 3", "iteration 4"}  # no initialisation: the state is the start
    assert streamem.load(tmp_path / "b.zarr").n_iter_ == 4


@pytest.mark.parametrize("command", ["predict", "score", "accumulate"])
def test_predict_score_and_accumulate_show_a_bar_on_a_terminal(command, stores, tmp_path):
    out = ("--out", tmp_path / "out.zarr") if command != "score" else ()
    extra = ("--proba", "--score") if command == "predict" else ()
    status, stdout, err = run_on_terminal(command, stores["model"], stores["data"], *out, *extra, "--workers", 0)
    assert status == 0, err
    assert bar_labels(err) == {command}
    # A bar over the chunks: predict writes 6 chunks of each of its 3 outputs.
    assert f"/{18 if command == 'predict' else 6} [" in err
    if command == "score":
        assert stdout.startswith(f"rows: {N_ROWS}\n")


def test_no_bar_off_a_terminal_or_with_quiet(stores, tmp_path):
    proc = check_ok(cli_main("predict", stores["model"], stores["data"], "--out", tmp_path / "p.zarr", "--workers", 0))
    assert "%|" not in proc.stderr
    status, _, err = run_on_terminal("score", stores["model"], stores["data"], "--workers", 0, "--quiet")
    assert (status, err) == (0, "")


@pytest.mark.parametrize(
    "params",
    [
        dict(init_params="kmeans"), dict(init_params="random"), dict(init_params="k-means++"),
        dict(init_params="random_from_data"), dict(init_params="random_from_data", prior="default"),
        dict(init_params="kmeans", prior="default"), dict(init_params="k-means++", prior="default"),
        dict(init_params="kmeans", **inits("full")),  # complete initial parameters, as --init-from gives
        dict(init_params="kmeans", **inits("diag"), covariance_type="diag", prior="default"),
        dict(init_params="kmeans", weights_init=inits("full")["weights_init"], means_init=inits("full")["means_init"]),
        dict(init_params="random", means_init=inits("full")["means_init"]),  # the rest still to be found
    ],
)
def test_the_initialisation_pass_count_is_the_fits(params, X):
    """The ``/2`` of "initialisation pass 1/2" is the number of passes the fit makes before its first iteration."""
    from streamem.cli import init_passes

    model = quiet_fit(streamem.GaussianMixture(n_components=3, max_iter=1, tol=0, random_state=0, **params), X)
    assert init_passes(model) == model.n_data_passes_ - model.n_iter_


def _symmetric_kl(m0, c0, m1, c1) -> float:
    """KL(N0 || N1) + KL(N1 || N0) by the textbook formula (log-determinants included)."""

    def kl(ma, ca, mb, cb):
        inv = np.linalg.inv(cb)
        diff = mb - ma
        return 0.5 * (np.trace(inv @ ca) + diff @ inv @ diff - len(ma) + np.linalg.slogdet(cb)[1] - np.linalg.slogdet(ca)[1])

    return kl(m0, c0, m1, c1) + kl(m1, c1, m0, c0)


def test_init_from_says_how_components_were_matched(stores, tmp_path):
    out = tmp_path / "m.zarr"
    proc = check_ok(cli_main("fit", stores["data"], "--out", out, "--init-from", stores["model"], "--max-iter", 3, "--tol", 0, "--workers", 0))
    line = next(line for line in proc.stderr.splitlines() if line.startswith("components matched"))
    old, new = streamem.load(stores["model"]), streamem.load(out)
    expected = sum(_symmetric_kl(old.means_[k], old.covariances_[k], new.means_[k], new.covariances_[k]) for k in range(3))
    cost = float(re.search(r"total cost (\S+);", line)[1])
    assert expected > 1e-6  # three iterations moved the components a little
    assert_allclose(cost, expected, rtol=1e-3)
    assert line.endswith("; none moved")


def test_describe_matching_names_every_component_that_moved(stores):
    from streamem.cli import describe_matching

    old = streamem.load(stores["model"])
    swapped = streamem.load(stores["model"]).permute_components([2, 0, 1])  # new 0 is old 2, new 1 is old 0, new 2 is old 1
    line = describe_matching(old, swapped, match_components(old, swapped))
    assert line.endswith("; relabelled 1 -> 0, 2 -> 1, 0 -> 2 (fitted -> old label)")
    assert abs(float(re.search(r"total cost (\S+);", line)[1])) < 1e-9


# -------------------------------------------------------------- item 5: help
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_argument_of_every_command_has_help():
    from streamem.cli import build_parser

    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"fit", "update", "predict", "score", "accumulate", "reduce", "info", "generate", "plot"}
    missing = [f"{name} {action.dest}" for name, sub in commands.items() for action in sub._actions
               if not action.help or action.help == argparse.SUPPRESS]  # fmt: skip
    missing += [action.dest for action in parser._actions if not action.help]
    assert missing == []


def test_streamem_help_lists_the_commands_one_line_each(monkeypatch):
    from streamem.cli import COMMANDS

    monkeypatch.setenv("COLUMNS", "80")  # argparse's width, as for a pipe (where the real command's output goes)
    proc = check_ok(cli_main("--help"))
    lines = proc.stdout.splitlines()
    for name, summary in COMMANDS.items():
        assert any(re.fullmatch(rf"\s+{name}\s+{re.escape(summary)}", line) for line in lines), (name, proc.stdout)
    assert max(map(len, lines)) <= 80
