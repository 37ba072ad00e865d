"""A new user's first hour (issue 17 items 4, 6 and 7): the README against the code, configuration
files, the demo, the nightly script and the plots.

The README's tables are checked against what the code accepts and writes (the options of
streamem.cli, the attributes of saved models, the variables of a predict store); commands run
through :func:`streamem.cli.main` in process (``cli_main``); the demo and the nightly script
run as the scripts they are.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
from numpy.testing import assert_allclose, assert_array_equal

import streamem
from streamem.cli import CLUSTER_OPTIONS, EXTRA_KEYS, FIT_OPTIONS, UsageError, load_config
from workflow_helpers import REPO, check_ok, check_usage_error, cli_main, mixture_sample, quiet_fit, write_zarr

README = os.path.join(REPO, "README.md")
NO_CLUSTER = ("--workers", 0)


def _readme() -> str:
    with open(README) as fh:
        return fh.read()


def _section(title: str) -> str:
    """The README's text from the heading ``title`` to the next heading of the same or a higher level."""
    text = _readme()
    match = re.search(rf"^(#+) {re.escape(title)}\n", text, flags=re.M)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def _first_column_names(section: str) -> set[str]:
    """Every `name` in the first column of the Markdown tables of ``section``."""
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            names |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[np.ndarray, str]:
    X = mixture_sample(3000, seed=17, spread=0.6)
    return X, write_zarr(tmp_path_factory.mktemp("first-run") / "data.zarr", X, 700)


# ------------------------------------------------------------ configuration (item 4)
def test_readme_yaml_table_lists_exactly_the_accepted_keys():
    section = _section("Configuration files")
    listed = _first_column_names(section)
    accepted = {o.name for o in FIT_OPTIONS + CLUSTER_OPTIONS} | set(EXTRA_KEYS)
    assert accepted - listed == set(), f"keys missing from the README's table: {sorted(accepted - listed)}"
    assert listed - accepted == set(), f"keys in the README's table that load_config refuses: {sorted(listed - accepted)}"
    persist = next(line for line in section.splitlines() if line.startswith("| `persist`"))
    for mode in ("auto", "always", "never"):
        assert f"`{mode}`" in persist
    assert "--no-resume" in section


def test_yaml_values_that_convert_exactly_are_taken(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tol: 1e-3\nreg_covar: 1e-6\nmax_iter: '50'\nn_init: 2.0\nworkers: 0\nrandom_state:\nvariable: 2024\n"
                   "n_trials: '8,10,8'\nworker_timeout: 30\n")  # fmt: skip
    assert yaml.safe_load(cfg.read_text())["tol"] == "1e-3"  # YAML 1.1: text, which is why this matters
    config = load_config(str(cfg))
    assert config == {"tol": 1e-3, "reg_covar": 1e-6, "max_iter": 50, "n_init": 2, "workers": 0, "variable": "2024",
                      "n_trials": [8, 10, 8], "worker_timeout": 30.0}  # fmt: skip
    assert [type(config[k]) for k in ("tol", "max_iter", "n_init", "worker_timeout")] == [float, int, int, float]


@pytest.mark.parametrize(
    "text, needles",
    [
        ("tol: abc\n", ("'tol'", "float", "'abc'", "1.0e-3")),
        ("max_iter: 2.5\n", ("'max_iter'", "int", "2.5")),
        ("n_components: yes\n", ("'n_components'", "True")),
        ("resume: 1\n", ("'resume'", "bool")),
    ],
    ids=["text-for-float", "fraction-for-int", "bool-for-int", "int-for-bool"],
)
def test_yaml_values_that_do_not_convert_are_refused(tmp_path, text, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(UsageError) as err:
        load_config(str(cfg))
    for needle in needles:
        assert needle in str(err.value)


def test_fit_with_yaml_1_1_exponent_gives_the_flag_model(data, tmp_path):
    X, path = data
    cfg = tmp_path / "run.yaml"
    cfg.write_text("n_components: 3\ntol: 1e-3\nrandom_state: 0\nmax_iter: 40\n")
    out = tmp_path / "model.zarr"
    check_ok(cli_main("fit", path, "--config", cfg, "--out", out, *NO_CLUSTER, "--quiet"))
    model = streamem.load(out)
    assert model.tol == 1e-3 and isinstance(model.tol, float)
    reference = quiet_fit(streamem.GaussianMixture(n_components=3, tol=1e-3, random_state=0, max_iter=40), X)
    assert_allclose(model.means_, reference.means_, rtol=1e-10)


def test_shipped_configs_set_no_checkpoint():
    """An example run on other data or settings must not meet an old checkpoint."""
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        config = load_config(os.path.join(REPO, "configs", name))
        assert "checkpoint" not in config and "resume" not in config, name


def test_no_resume_overrides_the_config_and_the_refusal_says_so(data, tmp_path):
    X, path = data
    ckpt = tmp_path / "fit.ckpt"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"checkpoint: {ckpt}\nresume: true\nrandom_state: 0\nmax_iter: 30\n")
    check_ok(cli_main("fit", path, "--config", cfg, "--n-components", 2, "--out", tmp_path / "m2.zarr", *NO_CLUSTER, "--quiet"))

    out = tmp_path / "m3.zarr"
    refused = cli_main("fit", path, "--config", cfg, "--n-components", 3, "--out", out, *NO_CLUSTER, "--quiet")
    line = check_usage_error(refused, "refusing to resume", "n_components", "new --checkpoint directory", "--no-resume")
    assert str(ckpt) in line and not out.exists()

    check_ok(cli_main("fit", path, "--config", cfg, "--n-components", 3, "--no-resume", "--out", out, *NO_CLUSTER, "--quiet"))
    reference = quiet_fit(streamem.GaussianMixture(n_components=3, random_state=0, max_iter=30), X)
    assert_allclose(streamem.load(out).means_, reference.means_, rtol=1e-10)
    # The checkpoint now holds the 3-component fit: resuming it works.
    check_ok(cli_main("fit", path, "--config", cfg, "--n-components", 3, "--out", out, "--overwrite", *NO_CLUSTER, "--quiet"))


def test_unknown_cluster_key_is_one_complete_sentence(data, tmp_path):
    pytest.importorskip("dask_jobqueue")
    _, path = data
    cfg = tmp_path / "jobs.yaml"
    cfg.write_text("n_components: 2\ncluster:\n  kind: slurm\n  jobs: 1\n  cores: 1\n  memory: 1GiB\n  interface: lo\n"
                   "  bogus_key: 3\n")  # fmt: skip
    line = check_usage_error(cli_main("fit", path, "--config", cfg, "--out", tmp_path / "m.zarr", "--quiet"), "'bogus_key'", "cluster")
    message = line.split("error: ", 1)[1]
    assert not message.rstrip().endswith((":", ",", ";")) and "job_kwargs" not in message, message


# ------------------------------------------------------------------- first run (item 6)
def test_readme_says_how_to_run_the_installed_command():
    top = _readme().split("## In Python", 1)[0]
    assert ".venv/bin/streamem" in top and "source .venv/bin/activate" in top
    assert "`plot` extra" in top


def test_make_demo_installs_the_plot_extra():
    with open(os.path.join(REPO, "Makefile")) as fh:
        makefile = fh.read()
    demo = re.search(r"^demo: (.*)$", makefile, flags=re.M).group(1).split()
    install = re.search(r"^\$\(VENV\)/\.installed: .*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert "$(VENV)/.installed" in demo and install, makefile
    assert "'.[plot]'" in install.group(1)


def test_demo_saves_a_model_the_printed_commands_use(tmp_path):
    """scripts/demo.py on a small data set, then every `streamem info|plot` command it prints, as printed."""
    demo = [sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--n-samples", "10000", "--n-features", "4",
            "--n-components", "3", "--max-iter", "10", "--path", "data/demo.zarr", "--model", "data/demo-model.zarr"]  # fmt: skip
    proc = subprocess.run(demo, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    check_ok(proc)
    commands = [line.split(".venv/bin/streamem ", 1)[1].split() for line in proc.stdout.splitlines() if ".venv/bin/streamem " in line]
    assert {c[0] for c in commands} >= {"info", "plot", "predict"}
    model = streamem.load(tmp_path / "data" / "demo-model.zarr")
    assert model.n_components == 3 and model.n_features_in_ == 4
    for command in (c for c in commands if c[0] in ("info", "plot")):
        check_ok(cli_main(*command, cwd=str(tmp_path)))
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _saved_models(X: np.ndarray, tmp_path) -> list[str]:
    """Model files of several kinds: Gaussian from a DataFrame (feature names), Poisson with a MAP prior and fixed
    weights, categorical fitted by stepwise EM."""
    rng = np.random.RandomState(3)
    frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(X.shape[1])])
    models = {
        "gaussian": quiet_fit(streamem.GaussianMixture(2, max_iter=3, random_state=0), frame),
        "poisson": quiet_fit(streamem.PoissonMixture(2, max_iter=3, random_state=0, prior="default", weights_init=[0.4, 0.6],
                                                     learn_weights=False), rng.poisson(3.0, (400, 3)).astype(float)),  # fmt: skip
        "categorical": quiet_fit(streamem.CategoricalMixture(2, n_categories=3, algorithm="stepwise", max_iter=1, random_state=0),
                                 rng.randint(0, 3, (400, 2)).astype(float)),  # fmt: skip
    }
    paths = []
    for name, model in models.items():
        paths.append(str(tmp_path / f"{name}.zarr"))
        model.save(paths[-1])
    return paths


def test_readme_lists_every_variable_and_attribute_of_a_model_file(data, tmp_path):
    section = _section("Model file format")
    listed = _first_column_names(section)
    for path in _saved_models(data[0], tmp_path):
        ds = xr.open_zarr(path, consolidated=False)
        names = set(ds.data_vars) | set(ds.attrs)
        assert names - listed == set(), f"{os.path.basename(path)}: not in the README's tables: {sorted(names - listed)}"
        if os.path.basename(path) == "gaussian.zarr":  # the attributes of a DataFrame's fit, with names, were seen
            assert ds.attrs["feature_names_in"] == [f"x{j}" for j in range(data[0].shape[1])]


def test_open_zarr_as_the_readme_shows_gives_no_warning(data, tmp_path):
    section = _section("Model file format")
    call = re.search(r"xarray\.open_zarr\(([^)]*)\)", section)
    assert call, "the README does not show how to open a model with xarray"
    path = _saved_models(data[0], tmp_path)[0]
    arguments = call.group(1).replace('"model.zarr"', repr(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = eval(f"xr.open_zarr({arguments})")  # noqa: S307 - the README's own call
    assert ds.attrs["format"] == "streamem-model"


def test_predict_store_is_as_documented_with_absolute_paths(data, tmp_path):
    X, path = data
    model = quiet_fit(streamem.GaussianMixture(n_components=3, random_state=0, max_iter=20), X)
    model.save(tmp_path / "model.zarr")
    os.symlink(path, tmp_path / "data.zarr")
    # Relative paths, from the directory holding them.
    check_ok(cli_main("predict", "model.zarr", "data.zarr", "--out", "pred.zarr", "--proba", "--score", *NO_CLUSTER, "--quiet",
                 cwd=str(tmp_path)))  # fmt: skip
    ds = xr.open_zarr(tmp_path / "pred.zarr", consolidated=False)
    section = _section("Model file format")
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip() for line in section.splitlines()
            if re.match(r"\| `(labels|proba|log_likelihood)` \|", line)}  # fmt: skip
    assert set(rows) == set(ds.data_vars) == {"labels", "proba", "log_likelihood"}
    for name, variable in ds.data_vars.items():
        assert rows[name] == f"({', '.join(variable.dims)})", (name, rows[name], variable.dims)
    for attr in ds.attrs:
        assert f"`{attr}`" in section, attr
    assert ds.attrs["model"] == os.path.realpath(tmp_path / "model.zarr")
    assert ds.attrs["data_source"] == os.path.realpath(path)
    assert_array_equal(ds["labels"].values, model.predict(X))
    assert_allclose(ds["proba"].values, model.predict_proba(X), rtol=1e-12, atol=1e-15)
    assert_allclose(ds["log_likelihood"].values, model.score_samples(X), rtol=1e-12)


def test_nightly_refit_without_arguments_prints_its_usage():
    script = os.path.join(REPO, "scripts", "nightly_refit.sh")
    for args in ([], ["only-data.zarr"], ["", "models"]):
        proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr.startswith("usage: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "nightly_refit.sh DATA.zarr MODEL_DIR" in proc.stderr and "parameter null" not in proc.stderr


# ------------------------------------------------------------------------ plots (item 7)
def test_convergence_axes_have_integer_iterations_and_no_offset(data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from streamem.plot import _convergence

    X = data[0]
    start = quiet_fit(streamem.GaussianMixture(n_components=3, random_state=0, tol=0, max_iter=40), X)
    # Warm-started at the optimum: bounds differ in the 6th digit, where an offset label would appear.
    model = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=6, weights_init=start.weights_,
                                               means_init=start.means_, precisions_init=start.precisions_), X)  # fmt: skip
    assert 0 < np.ptp(model.lower_bounds_) < 1e-4 * abs(model.lower_bound_)
    fig, ax = plt.subplots()
    try:
        _convergence(model, ax)
        fig.canvas.draw()
        assert ax.yaxis.get_offset_text().get_text() == ""
        ticks = ax.get_yticks()
        labels = [t.get_text().replace("\u2212", "-") for t in ax.get_yticklabels()]
        assert len(labels) == len(ticks) > 1 and len(set(labels)) == len(labels)
        # Each label is the value at its tick (to the digits that tell the ticks apart), not an offset from one.
        assert_allclose([float(text) for text in labels], ticks, rtol=0, atol=0.5 * np.diff(ticks).min())
        assert all(float(t).is_integer() for t in ax.get_xticks())
    finally:
        plt.close(fig)


def test_principal_axes_are_signed_the_same_whatever_the_decomposition(data):
    from streamem.plot import principal_axes

    X = data[0]
    axes = principal_axes(X, 2)
    # An independent decomposition (eigenvectors of the covariance, whose signs LAPACK picks its own way),
    # signed by the documented rule: the largest-magnitude component positive.
    vals, vecs = np.linalg.eigh(np.cov(X, rowvar=False))
    reference = vecs[:, np.argsort(vals)[::-1][:2]]
    reference *= np.sign(reference[np.abs(reference).argmax(axis=0), [0, 1]])
    assert_allclose(axes, reference, atol=1e-10)
    # The same axes for the rows in another order and for the data mirrored (the SVD's signs may flip).
    assert_allclose(principal_axes(X[::-1], 2), axes, atol=1e-10)
    assert_allclose(principal_axes(-X, 2), axes, atol=1e-10)
    assert_array_equal(principal_axes(X, 2), axes)


def test_two_plot_runs_draw_the_same_picture(data, tmp_path):
    from streamem.plot import plot_model

    X, path = data
    model = quiet_fit(streamem.GaussianMixture(n_components=3, random_state=0, max_iter=20), X)
    pictures = []
    for i in range(2):
        out = tmp_path / f"fig-{i}.png"
        plot_model(model, str(out), data=path, n_points=800, seed=1)
        pictures.append(out.read_bytes())
    assert pictures[0] == pictures[1]
