"""Second breaking review of issue 17: the fixes of test_review_cli17.py's defects and what they touched.

Every test marked ``# DEFECT n`` reproduces a defect found by this review and fails until it is
fixed; the others cover what the fixes promise and no other test checks (an update in place
that fails, model files and pickles in a fresh interpreter). Commands run in process through
``streamem.cli.main`` with ``--workers 0`` or are refused before any cluster starts; a
subprocess only where a fresh interpreter is the point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import zarr
from numpy.testing import assert_array_equal

import streamem
from streamem.generate import generate
from workflow_helpers import REPO, inits, listing, mixture_sample, one_line_error, quiet_fit, write_zarr
from workflow_helpers import run_main as run

N_ROWS = 400
CHUNK_ROWS = 100
NO_CLUSTER = ("--workers", "0")
GEN = ("--n-features", "2", "--n-components", "1", "-q")  # generate's shape besides --n-samples


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return mixture_sample(N_ROWS, seed=3)


@pytest.fixture(scope="module")
def stores(rows, tmp_path_factory) -> dict[str, str]:
    """Data (3 features, 4 chunks), the same rows with a NaN in the last chunk, a 3-component Gaussian model."""
    root = tmp_path_factory.mktemp("review17b")
    bad = np.array(rows)
    bad[N_ROWS - 5, 0] = np.nan
    model = quiet_fit(streamem.GaussianMixture(n_components=3, tol=0, max_iter=3, random_state=0, **inits("full")), rows)
    model.save(root / "model.zarr")
    return {
        "data": write_zarr(root / "data.zarr", rows, CHUNK_ROWS),
        "nan": write_zarr(root / "nan.zarr", bad, CHUNK_ROWS),
        "model": os.fspath(root / "model.zarr"),
    }


def file_bytes(path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: a store left exactly as it was."""
    path = os.fspath(path)
    return {name: open(os.path.join(path, name), "rb").read() for name in listing(path) if os.path.isfile(os.path.join(path, name))}


def model_copy(stores, tmp_path) -> str:
    """A copy of the module's model that a test may see written to (or not)."""
    return os.fspath(shutil.copytree(stores["model"], tmp_path / "mine.zarr"))


# ------------------------------------------------------------------ generate --overwrite
# DEFECT 1: generate --overwrite (and `make demo N=...`, scripts/demo.py's generate(..., overwrite=True)) refuses
# data that an earlier streamem generate wrote: those stores have attributes generator='streamem.generate' and no
# 'format' (added by the fix), so check_replaceable(formats=(GENERATED_FORMAT,)) calls them foreign; demo.py then
# ends in a ValueError traceback for every user with a data/demo.zarr from before. Fix: io._foreign_content /
# _foreign_attrs also accept generator == 'streamem.generate' when GENERATED_FORMAT is among the formats.
def test_generate_overwrite_replaces_data_an_earlier_generate_wrote(tmp_path, capfd):
    out = tmp_path / "demo.zarr"
    old = zarr.create_array(os.fspath(out), shape=(20, 2), chunks=(10, 2), dtype="float64", zarr_format=3)
    old[...] = 0.0
    old.attrs.update({"weights": [1.0], "means": [[0.0, 0.0]], "covariances": [[[1.0, 0.0], [0.0, 1.0]]],
                      "seed": 0, "generator": "streamem.generate"})  # what generate wrote before 'format'  # fmt: skip
    status, _, err = run(capfd, "generate", out, "--overwrite", "--n-samples", 30, *GEN)
    assert status == 0, err
    assert zarr.open_array(os.fspath(out), mode="r").shape == (30, 2)


# DEFECT 2: generate replaces its own data by rmtree + os.replace, not io.atomic_write. OUT spelled 'g.zarr/.'
# passes check_out and check_replaceable, the rows are written, then rmtree('g.zarr/.') empties g.zarr and
# os.replace fails: "'g.zarr/.': Invalid argument" - the old data gone, no new data, no flag named. A symbolic
# link to generated data: "Cannot call rmtree on a symbolic link", after the work. Fix: normalise OUT
# (os.path.normpath) and install with io.atomic_write(..., overwrite=True) as the other writers do.
@pytest.mark.parametrize("spelling", ["trailing /.", "symbolic link"])
def test_generate_overwrite_by_another_spelling_keeps_data(spelling, tmp_path, capfd):
    data = tmp_path / "g.zarr"
    generate(data, 20, 2, 1, chunk_rows=10)
    if spelling == "symbolic link":
        out = tmp_path / "link.zarr"
        os.symlink(data, out)
    else:
        out = f"{data}{os.sep}."
    status, _, err = run(capfd, "generate", out, "--overwrite", "--n-samples", 30, *GEN)
    if status == 0:  # replaced: the new rows are where OUT names
        assert zarr.open_array(os.fspath(out), mode="r").shape == (30, 2)
    else:  # or refused before any work, naming OUT, with the old data intact
        one_line_error(status, err, "OUT")
        assert zarr.open_array(os.fspath(data), mode="r").shape == (20, 2)


# DEFECT 3: generate takes a URL for OUT (check_out checks it as a remote store) but writes with local file
# operations: the whole data set goes to a temporary store beside the URL, then os.replace fails ("'memory://
# g.zarr.tmp-...' -> 'memory://g.zarr': No such file or directory"), and the temporary store stays in the bucket
# (shutil.rmtree of a URL does nothing). Fix: refuse a URL in cmd_generate before any work ("OUT: generate writes
# a local path"), or write through io.atomic_write, which handles URLs.
def test_generate_to_a_url_writes_it_or_nothing(capfd):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/review17b-{uuid.uuid4().hex[:8]}"
    url = f"memory://{root}/g.zarr"
    try:
        status, _, err = run(capfd, "generate", url, "--n-samples", 20, *GEN)
        if status == 0:
            assert zarr.open_array(url, mode="r").shape == (20, 2)
        else:
            one_line_error(status, err, "OUT")
            assert fs.find(root) == [], f"left behind: {fs.find(root)}"
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


# ------------------------------------------------------------------ outputs inside inputs
# DEFECT 4: fit --checkpoint inside the --init-from model is accepted (cmd_fit checks --checkpoint against --out
# and the data only; update checks it against MODEL): the checkpoint directory is written into the input model,
# and every later load of that model warns "ZarrUserWarning: Object at ck is not recognized as a component of a
# Zarr hierarchy". Fix: cmd_fit: check_distinct(("--checkpoint", ...), ("--init-from", ...), may_hold=["--checkpoint"]).
def test_fit_checkpoint_inside_the_init_from_model_is_refused(stores, tmp_path, capfd):
    model = model_copy(stores, tmp_path)
    before = listing(model)
    status, _, err = run(capfd, "fit", stores["data"], "--init-from", model, "--checkpoint", f"{model}/ck",
                         "--out", tmp_path / "out.zarr", "--max-iter", 1, *NO_CLUSTER, "-q")  # fmt: skip
    assert listing(model) == before, "the checkpoint was written inside the --init-from model"
    one_line_error(status, err, "--checkpoint", "--init-from")


# DEFECT 5: reduce --out inside --model is accepted (cmd_reduce checks --out against the shards only, while
# update and fit --init-from now refuse an --out inside the model they read): `reduce S --model M --out M/next
# --overwrite` writes a model store inside M. Fix: cmd_reduce: check_distinct(("--out", out), ("--model",
# model), may_be=["--model"]) besides the shards.
def test_reduce_out_inside_the_model_is_refused(stores, tmp_path, capfd):
    model = model_copy(stores, tmp_path)
    stats = tmp_path / "s.zarr"
    assert run(capfd, "accumulate", model, stores["data"], "--out", stats, *NO_CLUSTER, "-q")[0] == 0
    before = listing(model)
    status, _, err = run(capfd, "reduce", stats, "--model", model, "--out", f"{model}/next", "--overwrite", "-q")
    assert listing(model) == before, "reduce wrote a model inside its --model"
    one_line_error(status, err, "--out", "inside")


# DEFECT 6: --performance-report may name an input of the run: it is checked (any_file=True) against --out, the
# data, MODEL, --checkpoint and --config, not against --init-from, the --*-init .npy files or a --prior file;
# a successful run then replaces that input with Dask's HTML report (measured: `fit D --init-from M
# --performance-report M/zarr.json` exits 0 and M no longer opens; `--weights-init w.npy --performance-report
# w.npy` leaves HTML in w.npy). Fix: check_performance_report adds every input path of the command (init_from
# and its contents, the _NPY_OPTIONS files, a prior given as a path) to its check_distinct. The data are missing
# here so that no run starts: the refusal comes first (check_performance_report runs before the data are read).
@pytest.mark.parametrize("what", ["--init-from model", "--weights-init file"])
def test_performance_report_never_replaces_an_input(what, stores, tmp_path, capfd):
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:
        pytest.skip("--performance-report needs bokeh")
    if what == "--init-from model":
        model = model_copy(stores, tmp_path)
        extra, report = ("--init-from", model), f"{model}/zarr.json"
    else:
        weights = tmp_path / "w.npy"
        np.save(weights, np.full(3, 1 / 3))
        extra, report = ("--weights-init", weights, "--n-components", 3), weights
    status, _, err = run(capfd, "fit", tmp_path / "no-data.zarr", *extra, "--performance-report", report,
                         "--out", tmp_path / "out.zarr", "--workers", 1, "-q")  # fmt: skip
    one_line_error(status, err, "--performance-report")


# ------------------------------------------------------------------ cluster settings
# DEFECT 7: --memory-limit accepts any non-negative number of bytes: `--memory-limit 16` (a user meaning 16 GB)
# or `1.5` (distributed reads a number above 1 as bytes: 1 byte) passes check_cluster_settings; the workers start
# and the run ends in a MemoryError traceback, exit 1 ("Task ... has 56 B worth of input dependencies, but worker
# ... has memory_limit set to 16 B"). Fix: _memory_limit_ok refuses a byte count below what a worker needs (say
# 64 MiB; 0 stays "no limit") with "16 means 16 bytes: write 16GiB"; _run could also report a MemoryError in one line.
@pytest.mark.parametrize("limit", ["16", "1.5"])
def test_memory_limit_of_a_few_bytes_is_refused(limit, tmp_path, capfd):
    status, _, err = run(capfd, "fit", tmp_path / "no-data.zarr", "--out", tmp_path / "m.zarr", "--memory-limit", limit)
    one_line_error(status, err, "--memory-limit")


# DEFECT 8: a fraction of the memory works as a flag (`--memory-limit 0.5`, which check_cluster_settings and its
# message allow) but not as a YAML key: `memory_limit: 0.5` is "--config: key 'memory_limit' must be of type str,
# got 0.5" (the option's type is str; _convert turns only an int into text). Fix: _convert(str, float) gives
# repr(value) for memory_limit (or Option('memory_limit', (str, float))); the README's table says "str".
def test_yaml_memory_limit_fraction_as_the_flag(tmp_path, capfd):
    config = tmp_path / "c.yaml"
    config.write_text("memory_limit: 0.5\n")
    status, _, err = run(capfd, "fit", tmp_path / "no-data.zarr", "--out", tmp_path / "m.zarr", "--config", config)
    line = one_line_error(status, err)
    # the data are what is wrong (the key as the errors quote it: tmp_path's name holds "memory_limit" too)
    assert "key 'memory_limit'" not in line and "does not exist" in line, line


# DEFECT 9: --workers -1, --threads-per-worker 0 and the cluster section's kind are still checked inside
# dask_client: after the data and model are opened and after check_checkpoint has created the checkpoint
# directory, which is left behind (a bucket prefix for a URL). Fix: move these checks into
# check_cluster_settings (with jobqueue_cluster's kind/jobs checks), which merged_settings runs first.
@pytest.mark.parametrize(
    "extra, needle",
    [(("--workers", "-1"), "--workers"), (("--threads-per-worker", "0"), "--threads-per-worker"),
     (("--config", "{tmp}/slrum.yaml"), "cluster.kind")],  # fmt: skip
    ids=["workers", "threads-per-worker", "cluster-kind"],
)
def test_cluster_settings_refused_before_the_checkpoint_is_made(extra, needle, stores, tmp_path, capfd):
    (tmp_path / "slrum.yaml").write_text("cluster:\n  kind: slrum\n")
    checkpoint = tmp_path / "ck"
    status, _, err = run(capfd, "fit", stores["data"], "--out", tmp_path / "m.zarr", "--checkpoint", checkpoint,
                         *(word.format(tmp=tmp_path) for word in extra), "-q")  # fmt: skip
    one_line_error(status, err, needle)
    assert not checkpoint.exists(), "the checkpoint directory was made before the cluster settings were checked"


# ------------------------------------------------------------------------------ plots
# DEFECT 10: plot --out FIG.pgf passes image_format (pgf is among matplotlib's file types) on a machine without
# LaTeX; after the model and data are read and the figure drawn, savefig raises RuntimeError("'xelatex' not
# found ..."): a traceback, exit 1. Fix: image_format refuses pgf when shutil.which(rcParams['pgf.texsystem']) is
# None (or cmd_plot turns savefig's RuntimeError into a UsageError naming --out).
def test_plot_pgf_without_latex_is_one_line(stores, tmp_path, capfd):
    import matplotlib

    if shutil.which(matplotlib.rcParams["pgf.texsystem"]):
        pytest.skip("LaTeX is installed: pgf pictures can be written")
    status, _, err = run(capfd, "plot", stores["model"], "--data", stores["data"], "--out", tmp_path / "f.pgf", "-q")
    one_line_error(status, err, "--out")


# DEFECT 11: plot errors still not in flag words. --features with a non-Gaussian model: "features selects a
# scatter's axes ...; got --features[0, 1]" (cli_words' new plot keywords turn "features=[0, 1]" into
# "--features" glued to the list, since its value pattern stops at "["). --seed -1: numpy's "Seed must be
# between 0 and 2**32 - 1", no flag. Fix: plot.profile_panels says "got {list(features)}" without "features=";
# cmd_plot checks --seed (0..2**32-1) with --n-points before loading anything.
@pytest.mark.parametrize("case", ["features of a Bernoulli model", "seed -1"])
def test_plot_errors_name_the_flag(case, rows, stores, tmp_path, capfd):
    if case == "seed -1":
        status, _, err = run(capfd, "plot", stores["model"], "--data", stores["data"], "--out", tmp_path / "f.png", "--seed", -1)
        one_line_error(status, err, "--seed")
        return
    binary = (rows > 0).astype(np.float64)
    quiet_fit(streamem.BernoulliMixture(2, max_iter=2, random_state=0), binary).save(tmp_path / "b.zarr")
    status, _, err = run(capfd, "plot", tmp_path / "b.zarr", "--out", tmp_path / "f.png", "--features", 0, 1)
    line = one_line_error(status, err, "--features")
    assert "--features[" not in line, line


# ---------------------------------------------------------------------- lazy import
# DEFECT 12: the lazy `import streamem` (PEP 562) no longer makes its subpackages attributes: in a fresh
# interpreter `import streamem; streamem.families.family_names()` (as docs/families.md writes it),
# `streamem.io.load_model` or `streamem.data.InputData` raise "AttributeError: module 'streamem' has no attribute
# 'families'"; before the change `import streamem` imported them (measured on 71847aa: families, io, data,
# estimators, em, storage, checkpoint were attributes). Fix: streamem.__getattr__ imports
# f"streamem.{name}" for a name that is a submodule (importlib.util.find_spec), as PEP 562's example does.
def test_import_streamem_reaches_its_subpackages_in_a_fresh_interpreter():
    code = "import streamem\nstreamem.families.family_names(); streamem.io.load_model; streamem.data.InputData\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-600:]


# ------------------------------------------------------------------------------ README
# DEFECT 13: README's "Exit status:" sentence (and docs/user_guide/cli.md's) lists 0, 2 and 1 only, while main()
# and the console entry point return 130 for Ctrl-C (during the imports too) and 141 for a closed pipe: a batch
# wrapper that treats any other status as a crash cannot know. Fix: name 130 (interrupted, one line) and 141
# (stdout closed, e.g. `| head`) in both.
@pytest.mark.parametrize("page", ["README.md", "docs/user_guide/cli.md"])
def test_documented_exit_statuses_include_interrupt_and_closed_pipe(page):
    text = " ".join(open(os.path.join(REPO, page), encoding="utf-8").read().split())
    start = text.index("Exit status:")
    sentence = text[start : start + 400]
    assert "130" in sentence and "141" in sentence, sentence


# ------------------------------------------------------------------ what held up (new coverage)
def test_update_in_place_fails_without_touching_the_model_and_succeeds_as_elsewhere(stores, tmp_path, capfd):
    """update --out MODEL --overwrite (check_distinct's may_be): a failure in the last chunk leaves every byte of
    MODEL; a success writes what an update to another path writes, and nothing beside it."""
    model = model_copy(stores, tmp_path)
    before = file_bytes(model)
    status, _, err = run(capfd, "update", model, stores["nan"], "--out", model, "--overwrite", *NO_CLUSTER, "-q")
    one_line_error(status, err, "non-finite")
    assert file_bytes(model) == before
    assert sorted(os.listdir(tmp_path)) == ["mine.zarr"]

    assert run(capfd, "update", model, stores["data"], "--out", tmp_path / "other.zarr", *NO_CLUSTER, "-q")[0] == 0
    assert run(capfd, "update", model, stores["data"], "--out", model, "--overwrite", *NO_CLUSTER, "-q")[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["mine.zarr", "other.zarr"]
    in_place, elsewhere = streamem.load(model), streamem.load(tmp_path / "other.zarr")
    assert in_place.n_rows_seen_ == elsewhere.n_rows_seen_ == streamem.load(stores["model"]).n_rows_seen_ + N_ROWS
    for name in ("weights_", "means_", "covariances_"):
        assert_array_equal(getattr(in_place, name), getattr(elsewhere, name))


def test_every_family_loads_and_unpickles_in_a_fresh_interpreter(rows, tmp_path):
    """``streamem.load`` and (cloud)pickle of every built-in family with only ``import streamem`` (lazy) done:
    the same predictions as here; the import itself pulls in neither Dask nor scikit-learn."""
    import cloudpickle

    counts = np.floor(np.abs(rows) * 2)
    fitted = {
        "gaussian": (streamem.GaussianMixture(2, max_iter=2, random_state=0), rows),
        "bernoulli": (streamem.BernoulliMixture(2, max_iter=2, random_state=0), (rows > 0).astype(float)),
        "binomial": (streamem.BinomialMixture(2, n_trials=20, max_iter=2, random_state=0), np.minimum(counts, 20)),
        "poisson": (streamem.PoissonMixture(2, max_iter=2, random_state=0), counts),
        "categorical": (streamem.CategoricalMixture(2, n_categories=3, max_iter=2, random_state=0), counts % 3),
    }
    expected = {}
    for name, (model, data) in fitted.items():
        quiet_fit(model, data).save(tmp_path / f"{name}.zarr")
        (tmp_path / f"{name}.pkl").write_bytes(cloudpickle.dumps(model))
        np.save(tmp_path / f"{name}.npy", data)
        expected[name] = model.predict_proba(data)
    code = (
        "import sys, pickle, numpy as np, streamem\n"
        "assert not {'dask', 'sklearn', 'xarray'} & set(sys.modules), sorted({'dask', 'sklearn', 'xarray'} & set(sys.modules))\n"
        f"for name in {sorted(fitted)!r}:\n"
        "    data = np.load(name + '.npy')\n"
        "    loaded = streamem.load(name + '.zarr').predict_proba(data)\n"
        "    unpickled = pickle.loads(open(name + '.pkl', 'rb').read()).predict_proba(data)\n"
        "    np.save(name + '-loaded.npy', loaded); np.save(name + '-unpickled.npy', unpickled)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-800:]
    for name, proba in expected.items():
        assert_array_equal(np.load(tmp_path / f"{name}-loaded.npy"), proba)
        assert_array_equal(np.load(tmp_path / f"{name}-unpickled.npy"), proba)
