"""Remote stores (issue 16 item 1) against a real S3 server on 127.0.0.1 (moto's, in this process).

Data, models, checkpoints, statistics stores and ``predict --out`` at
``s3://`` URLs (through s3fs and zarr's FsspecStore), the same objects read
anonymously over ``http://``, and zarr store objects. The references are
the same computations on local Zarr stores: a fit from S3 must equal the
local fit to 1e-12. A secret given as a storage option must appear in no
object written, no log line and no error message.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import subprocess
import sys
import textwrap
import time
import tracemalloc
import uuid
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr
from numpy.testing import assert_allclose
from sklearn.exceptions import ConvergenceWarning

pytest.importorskip("s3fs", reason="object-storage tests need s3fs (pip install 'streamem[test]')")
pytest.importorskip("moto.server", reason="object-storage tests need moto[server] (pip install 'streamem[test]')")

import streamem  # noqa: E402
from streamem import storage  # noqa: E402
from streamem.cli import main, storage_option_flags, UsageError  # noqa: E402
from streamem.io import write_dataset  # noqa: E402
from streamem.mapreduce import accumulate, reduce_stats, write_stats  # noqa: E402

from _common import make_data, new_bucket  # noqa: E402

#: Given as a storage option in every test; must never be written, logged or shown.
SECRET = "s3cr3t-" + uuid.uuid4().hex
KEY_ID = "AKIDSTREAMEMTEST"
CHUNK_ROWS = 500
PARAMS = ("weights_", "means_", "covariances_", "precisions_cholesky_")


@pytest.fixture
def s3(endpoint):
    """A fresh bucket on conftest's S3 server (endpoint): its s3:// URL, the storage options, an s3fs file system."""
    return new_bucket(endpoint, KEY_ID, SECRET, "b")


def _write(target, X: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> None:
    """X as a Zarr v3 array at a local path or in a store (chunk by chunk: the store never holds a copy in one request)."""
    arr = zarr.create_array(target, shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype)
    for start in range(0, len(X), chunk_rows):
        arr[start : start + chunk_rows] = X[start : start + chunk_rows]


def _same_data(tmp_path, url: str, options: dict, X: np.ndarray) -> str:
    """X at ``url``/data.zarr and in a local store; returns the local path."""
    _write(storage.open_store(f"{url}/data.zarr", options), X)
    local = str(tmp_path / "data.zarr")
    _write(local, X)
    return local


def _assert_same_model(a, b, rtol: float = 1e-12) -> None:
    for name in PARAMS:
        assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-12, err_msg=name)
    assert a.n_iter_ == b.n_iter_
    assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol, atol=1e-12)


def _all_objects(fs, url: str) -> dict[str, bytes]:
    bucket = url.removeprefix("s3://")
    return {path: fs.cat_file(path) for path in fs.find(bucket)}


# ------------------------------------------------------------------ fit, predict, models
def test_fit_from_s3_on_a_cluster_equals_the_local_fit(tmp_path, s3, cluster):
    """Workers read the chunks from S3 themselves (the storage options travel with the graph); labels too.

    On the shared 2-worker LocalCluster of conftest (its worker processes were not started with the options).
    """
    from distributed import Client

    url, options, _ = s3
    X = make_data()
    local = _same_data(tmp_path, url, options, X)
    reference = streamem.GaussianMixture(3, random_state=0).fit(local)
    with Client(cluster) as client:
        model = streamem.GaussianMixture(3, random_state=0, client=client)
        model.fit(f"{url}/data.zarr/", storage_options=options)
        labels = model.predict(f"{url}/data.zarr", storage_options=options)  # lazy: the workers write its chunks
        write_dataset(xr.Dataset({"labels": ("sample", labels)}), f"{url}/labels.zarr", overwrite=False, checksum=False,
                      storage_options=options)  # fmt: skip
    _assert_same_model(model, reference)
    written = xr.open_zarr(storage.open_store(f"{url}/labels.zarr", options, read_only=True))
    np.testing.assert_array_equal(written["labels"].values, reference.predict(X))
    assert model.fit_data_["source"] == f"{url}/data.zarr"  # one spelling: no trailing slash
    assert model.fit_data_["row_chunks"] == [CHUNK_ROWS] * 9


def test_https_url_and_store_objects_read_as_local_data(tmp_path, s3, endpoint):
    """The objects over plain HTTP (moto serves them anonymously), an FsspecStore and a MemoryStore object."""
    url, options, fs = s3
    X = make_data(1500)
    local = _same_data(tmp_path, url, options, X)
    bucket = url.removeprefix("s3://")
    public = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}
    fs.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps(public))
    model = streamem.GaussianMixture(3, random_state=0).fit(local)
    expected = model.score(local)
    http = f"{endpoint}/{bucket}/data.zarr"
    assert model.score(http) == pytest.approx(expected, rel=1e-12)
    assert model.score(storage.open_store(f"{url}/data.zarr", options)) == pytest.approx(expected, rel=1e-12)
    memory = zarr.storage.MemoryStore()
    _write(memory, X)
    refit = streamem.GaussianMixture(3, random_state=0).fit(memory)
    _assert_same_model(refit, model)
    saved = zarr.storage.MemoryStore()
    refit.save(saved)
    _assert_same_model(streamem.load(saved), model)


def test_model_saved_to_s3_loads_and_is_refused_or_replaced_as_locally(tmp_path, s3):
    url, options, fs = s3
    X = make_data(1500)
    model = streamem.PoissonMixture(2, random_state=0).fit(np.floor(np.abs(X)))
    model.save(f"{url}/models/m.zarr", storage_options=options)
    loaded = streamem.load(f"{url}/models/m.zarr", storage_options=options)
    assert type(loaded) is streamem.PoissonMixture
    assert_allclose(loaded.rates_, model.rates_, rtol=0, atol=0)
    assert xr.open_zarr(storage.open_store(f"{url}/models/m.zarr", options)).attrs["format"] == "streamem-model"
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        model.save(f"{url}/models/m.zarr", storage_options=options)
    other = streamem.PoissonMixture(3, random_state=1).fit(np.floor(np.abs(X)))
    other.save(f"{url}/models/m.zarr", overwrite=True, storage_options=options)
    assert streamem.load(f"{url}/models/m.zarr", storage_options=options).n_components == 3
    # No marker or object of the first model left behind.
    names = {p.rsplit("/m.zarr/", 1)[1].split("/")[0] for p in fs.find(f"{url.removeprefix('s3://')}/models/m.zarr")}
    assert storage.WRITING not in names and "rates" in names
    # The user's data is not a streamem store: overwrite=True refuses it.
    _write(storage.open_store(f"{url}/data.zarr", options), X)
    with pytest.raises(ValueError, match="not a store written by streamem"):
        model.save(f"{url}/data.zarr", overwrite=True, storage_options=options)
    assert zarr.open(storage.open_store(f"{url}/data.zarr", options, read_only=True), mode="r").shape == X.shape


def test_checkpoint_on_s3_resumes_to_the_uninterrupted_fit(tmp_path, s3):
    url, options, fs = s3
    X = make_data(2000, offset=0.0, unit_variance=True)
    _write(storage.open_store(f"{url}/data.zarr", options), X)
    data = f"{url}/data.zarr"
    kwargs = dict(n_components=3, random_state=0, tol=1e-8, init_params="random")
    full = streamem.GaussianMixture(max_iter=6, **kwargs).fit(data, storage_options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        streamem.GaussianMixture(max_iter=3, **kwargs).fit(data, checkpoint=f"{url}/ck", storage_options=options)
    entries = {p.split("/ck/")[1].split("/")[0] for p in fs.find(f"{url.removeprefix('s3://')}/ck")}
    assert {"LATEST", "streamem-checkpoint.json"} < entries and len(entries) == 3  # one state
    state = fs.cat_file(f"{url.removeprefix('s3://')}/ck/LATEST").decode()
    assert state.startswith("state-000003-")
    resumed = streamem.GaussianMixture(max_iter=6, **kwargs)
    resumed.fit(data, checkpoint=f"{url}/ck", resume=True, storage_options=options)
    assert full.n_iter_ > 3
    _assert_same_model(resumed, full)


def test_accumulate_and_reduce_with_statistics_stores_on_s3(tmp_path, s3):
    url, options, _ = s3
    X = make_data(3000)
    local = _same_data(tmp_path, url, options, X)
    model = streamem.GaussianMixture(3, random_state=0, max_iter=2).fit(local)
    paths = []
    for i, rows in enumerate(("0:1200", "1200:")):
        ds = accumulate(model, f"{url}/data.zarr", rows=rows, storage_options=options)
        assert ds.attrs["data_source"] == f"{url}/data.zarr"
        write_stats(ds, f"{url}/stats-{i}.zarr", storage_options=options)
        local_path = str(tmp_path / f"stats-{i}.zarr")
        write_stats(accumulate(model, local, rows=rows), local_path)
        paths.append(local_path)
    remote = reduce_stats(model, [f"{url}/stats-0.zarr", f"{url}/stats-1.zarr"], storage_options=options)
    # The reference: the same M-step from local shards (whose source differs, so each set is reduced alone).
    reference = reduce_stats(model, paths)
    for name in PARAMS:
        assert_allclose(getattr(remote, name), getattr(reference, name), rtol=1e-12, atol=1e-12)
    assert remote.n_iter_ == model.n_iter_ + 1


# ------------------------------------------------------------------ the command line
def test_cli_fit_and_predict_write_to_s3_with_flags_and_yaml_options(tmp_path, s3, capsys):
    url, options, _ = s3
    X = make_data(1500)
    local = _same_data(tmp_path, url, options, X)
    endpoint = options["client_kwargs"]["endpoint_url"]
    flags = ["--storage-option", f"key={KEY_ID}", "--storage-option", f"secret={SECRET}",
             "--storage-option", f"client_kwargs.endpoint_url={endpoint}"]  # fmt: skip
    code = main(["fit", f"{url}/data.zarr", "--out", f"{url}/m.zarr", "--n-components", "3", "--random-state", "0",
                 "--workers", "0", *flags])  # fmt: skip
    assert code == 0
    config = tmp_path / "run.yaml"
    config.write_text(f"workers: 0\nstorage_options:\n  key: {KEY_ID}\n  secret: {SECRET}\n  client_kwargs:\n    endpoint_url: {endpoint}\n")
    code = main(["predict", f"{url}/m.zarr", f"{url}/data.zarr", "--out", f"{url}/labels.zarr", "--score", "--config", str(config)])
    assert code == 0
    model = streamem.load(f"{url}/m.zarr", storage_options=options)
    reference = streamem.GaussianMixture(3, random_state=0).fit(local)
    _assert_same_model(model, reference)
    out = xr.open_zarr(storage.open_store(f"{url}/labels.zarr", options, read_only=True))
    np.testing.assert_array_equal(out["labels"].values, reference.predict(X))
    assert_allclose(out["log_likelihood"].values, reference.score_samples(X), rtol=1e-12)
    assert out.attrs["model"] == f"{url}/m.zarr" and out.attrs["data_source"] == f"{url}/data.zarr"
    # --out exists: refused before any work, exit 2, one line.
    code = main(["predict", f"{url}/m.zarr", f"{url}/data.zarr", "--out", f"{url}/labels.zarr", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "exists; pass --overwrite" in err.strip().splitlines()[-1]
    assert SECRET not in err


def test_storage_option_flags_parse_nested_keys_and_keep_secrets_as_text():
    parsed = storage_option_flags(["client_kwargs.region_name=eu-west-1", "secret=007", "anon=true", "config_kwargs.read_timeout=5",
                                   "token=null", "key=1_000"])  # fmt: skip
    assert parsed == {"client_kwargs": {"region_name": "eu-west-1"}, "secret": "007", "anon": True,
                      "config_kwargs": {"read_timeout": 5}, "token": None, "key": "1_000"}  # fmt: skip
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        storage_option_flags(["no-equals-sign"])
    signed = "https://user:pw@host.example/data.zarr/?X-Amz-Signature=abc#frag"
    assert storage.public_url(signed) == "https://host.example/data.zarr"
    assert storage.redact(f"cannot read {signed}: token tok-12345", {"client_kwargs": {"token": "tok-12345"}}) == (
        "cannot read https://***@host.example/data.zarr/?***: token ***")
    merged = storage.storage_options_for("s3://b/x", {"config_kwargs": {"read_timeout": 1}})
    assert merged["config_kwargs"] == {"connect_timeout": 5, "read_timeout": 1, "retries": {"max_attempts": 2, "mode": "standard"}}


# ------------------------------------------------------------------ secrets
def test_a_secret_given_as_storage_option_is_written_nowhere(tmp_path, s3, caplog, capsys):
    """Model file, checkpoint, statistics and predictions on S3; logs; errors of the library and the CLI."""
    url, options, fs = s3
    X = make_data(1500)
    _write(storage.open_store(f"{url}/data.zarr", options), X)
    caplog.set_level(logging.DEBUG, logger="streamem")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = streamem.GaussianMixture(3, random_state=0, max_iter=3, verbose=2, verbose_interval=1)
        model.fit(f"{url}/data.zarr", checkpoint=f"{url}/ck", storage_options=options)
    model.save(f"{url}/m.zarr", storage_options=options)
    write_stats(accumulate(model, f"{url}/data.zarr", storage_options=options), f"{url}/stats.zarr", storage_options=options)
    flags = [f"--storage-option=key={KEY_ID}", f"--storage-option=secret={SECRET}",
             f"--storage-option=client_kwargs.endpoint_url={options['client_kwargs']['endpoint_url']}"]  # fmt: skip
    assert main(["predict", f"{url}/m.zarr", f"{url}/data.zarr", "--out", f"{url}/p.zarr", "--workers", "0", *flags]) == 0
    messages = []
    for call in (
        lambda: streamem.load(f"{url}/missing.zarr", storage_options=options),
        lambda: model.save(f"{url}/m.zarr", storage_options=options),
        lambda: streamem.load_data(f"{url}/data.zarr", storage_options={**options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}),
        lambda: model.fit(f"{url}/m.zarr", variable="nope", storage_options=options),
    ):
        with pytest.raises(Exception) as info:
            call()
        messages.append(str(info.value))
    assert main(["info", f"{url}/missing.zarr", *flags]) == 2
    written = _all_objects(fs, url)
    assert any("/ck/state-" in p for p in written) and any(p.endswith("/p.zarr/zarr.json") for p in written)
    leaks = [p for p, data in written.items() if SECRET.encode() in data or KEY_ID.encode() in data]
    assert leaks == []
    captured = capsys.readouterr()
    assert caplog.records  # the fit logged its iterations
    for text in (caplog.text, captured.out, captured.err, *messages):
        assert SECRET not in text
    assert "does not exist" in messages[0] and "cannot reach the endpoint" in messages[2]


# ------------------------------------------------------------------ failures
def test_unreachable_endpoint_missing_bucket_and_key_are_one_line_within_a_timeout(tmp_path, s3, capsys, monkeypatch):
    url, options, _ = s3
    _write(storage.open_store(f"{url}/data.zarr", options), make_data(600))
    endpoint = options["client_kwargs"]["endpoint_url"]
    base = ["--workers", "0", "--storage-option", f"key={KEY_ID}", "--storage-option", f"secret={SECRET}"]
    cases = {
        "closed port": (f"{url}/data.zarr", "http://127.0.0.1:9", "cannot reach the endpoint"),
        "missing bucket": ("s3://no-such-bucket-here/data.zarr", endpoint, "does not exist"),
        "missing key": (f"{url}/nothing.zarr", endpoint, "does not exist"),
    }
    for case, (data, where, expected) in cases.items():
        tic = time.perf_counter()
        code = main(["fit", data, "--out", str(tmp_path / "m.zarr"), *base, "--storage-option", f"client_kwargs.endpoint_url={where}"])
        seconds = time.perf_counter() - tic
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, case
        assert len(err) == 1 and expected in err[0] and data.split("://")[1].split("/")[0] in err[0], (case, err)
        assert seconds < 10, (case, seconds)
    # --out in a missing bucket: refused before the fit starts.
    code = main(["fit", str(tmp_path / "x.zarr"), "--out", "s3://no-such-bucket-here/m.zarr", *base,
                 "--storage-option", f"client_kwargs.endpoint_url={endpoint}"])  # fmt: skip
    assert code == 2 and "bucket 'no-such-bucket-here' does not exist" in capsys.readouterr().err
    # An endpoint that accepts connections and never answers: the first contact is bounded as a whole.
    monkeypatch.setattr(storage, "PROBE_TIMEOUT", 2.0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        tic = time.perf_counter()
        with pytest.raises(TimeoutError, match="no answer within 2 s") as info:
            streamem.load_data(f"{url}/data.zarr", storage_options={**options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}"}})
        assert time.perf_counter() - tic < 6
        assert len(str(info.value).splitlines()) == 1
    finally:
        silent.close()


#: A writer killed (os._exit, no clean-up) while it writes the chunks of a store: after the metadata of
#: every array and some chunks, before the root metadata. argv: endpoint, URL, overwrite, what to write.
_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    import dask, dask.array as da, numpy as np, xarray as xr
    from streamem.io import write_dataset
    endpoint, url, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}}

    def die_on_third(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 2:
            os._exit(3)
        return block

    values = da.ones((400, 2), chunks=(100, 2)).map_blocks(die_on_third, dtype=float)
    ds = xr.Dataset({"big": (("row", "col"), values)}, attrs={"format": "streamem-model", "format_version": 1})
    with dask.config.set(scheduler="synchronous"):  # chunks in order: two written, then the kill
        write_dataset(ds, url, overwrite=overwrite, checksum=False, storage_options=options)
    """
)


def _killed_writes(endpoint: str, *targets: tuple[str, bool]) -> None:
    """One killed writer per (URL, overwrite), run at the same time (each costs seconds of imports); each must die."""
    procs = [subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, endpoint, url, "1" if overwrite else "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for url, overwrite in targets]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err[-2000:]


def test_an_interrupted_write_leaves_the_old_model_or_nothing_and_checkpoints_keep_their_state(tmp_path, s3, endpoint):
    url, options, fs = s3
    bucket = url.removeprefix("s3://")
    model = streamem.GaussianMixture(2, random_state=0).fit(make_data(600))
    model.save(f"{url}/m.zarr", storage_options=options)
    X = make_data(1200)
    _write(storage.open_store(f"{url}/data.zarr", options), X)
    kwargs = dict(n_components=3, random_state=0, tol=1e-8, init_params="random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        streamem.GaussianMixture(max_iter=2, **kwargs).fit(f"{url}/data.zarr", checkpoint=f"{url}/ck", storage_options=options)
    current = fs.cat_file(f"{bucket}/ck/LATEST").decode()
    dead_state = "state-000003-h00000000-p1-t1-deadbeef.zarr"  # another host's: no later save removes it
    # Killed writers (at once, to different places): an overwrite of the model, and a checkpoint's next state.
    _killed_writes(endpoint, (f"{url}/m.zarr", True), (f"{url}/ck/{dead_state}", False))

    # The overwrite killed before its commit: the old model is gone (deleted first), nothing half-written is readable.
    left = {p.split("/m.zarr/")[1] for p in fs.find(f"{bucket}/m.zarr")}
    assert storage.WRITING in left and "big/c/0/0" in left and "big/c/2/0" not in left and "zarr.json" not in left
    with pytest.raises(FileNotFoundError, match="does not exist"):
        streamem.load(f"{url}/m.zarr", storage_options=options)
    # What it left is not a store: a new write (overwrite=False) takes the place and clears it.
    model.save(f"{url}/m.zarr", storage_options=options)
    left = {p.split("/m.zarr/")[1].split("/")[0] for p in fs.find(f"{bucket}/m.zarr")}
    assert storage.WRITING not in left and "big" not in left
    _assert_same_model(streamem.load(f"{url}/m.zarr", storage_options=options), model, rtol=0)

    # The checkpoint whose next state was being written when the writer died resumes from LATEST's state.
    assert fs.cat_file(f"{bucket}/ck/LATEST").decode() == current
    assert any(p.endswith(f"/ck/{dead_state}/{storage.WRITING}") for p in fs.find(f"{bucket}/ck"))  # the writer got that far
    resumed = streamem.GaussianMixture(max_iter=4, **kwargs)
    resumed.fit(f"{url}/data.zarr", checkpoint=f"{url}/ck", resume=True, storage_options=options)
    full = streamem.GaussianMixture(max_iter=4, **kwargs).fit(f"{url}/data.zarr", storage_options=options)
    _assert_same_model(resumed, full)
    with pytest.raises(FileNotFoundError):
        streamem.load(f"{url}/ck/{dead_state}", storage_options=options)


# ------------------------------------------------------------------ memory
def _peak_bytes(fn):
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_data_on_s3_are_read_chunk_by_chunk(tmp_path, s3):
    """A pass over 64 MiB in 1 MiB chunks from S3 allocates far less than the data, a few chunks more than the
    same pass over a local store (tracemalloc sees numpy's buffers, the HTTP client's and the in-process
    server's; measured: 15-20 MiB against 10 MiB locally, whatever the size of the data)."""
    url, options, _ = s3
    rows, d, chunk = 1_048_576, 8, 16_384
    data_bytes = rows * d * 8
    rng = np.random.default_rng(0)
    remote = zarr.create_array(storage.open_store(f"{url}/big.zarr", options), shape=(rows, d), chunks=(chunk, d), dtype="f8")
    local = zarr.create_array(str(tmp_path / "big.zarr"), shape=(rows, d), chunks=(chunk, d), dtype="f8")
    for start in range(0, rows, chunk):
        remote[start : start + chunk] = local[start : start + chunk] = rng.standard_normal((chunk, d))
    model = streamem.GaussianMixture(2, random_state=0).fit(rng.standard_normal((2000, d)))
    expected, local_peak = _peak_bytes(lambda: model.score(str(tmp_path / "big.zarr")))
    score, peak = _peak_bytes(lambda: model.score(f"{url}/big.zarr", storage_options=options))
    assert score == pytest.approx(expected, rel=1e-12)
    assert peak < min(local_peak + 16 * chunk * d * 8, data_bytes / 2), f"peak {peak / 2**20:.1f} MiB, local {local_peak / 2**20:.1f} MiB"
