"""A real SLURM (issue 16 item 2): the single-node cluster of scripts/ci/start_slurm.sh.

Three ways a fit meets SLURM, each checked against the same fit made here
without any cluster (``--workers 0``), to 1e-10:

- worker jobs: ``streamem fit --config configs/slurm-single-node.yaml``
  submits its Dask workers as batch jobs through dask-jobqueue, and none of
  them is left in ``squeue`` afterwards, also when the fit fails;
- the whole fit as one job: ``sbatch scripts/slurm/fit_in_allocation.sbatch``
  sizes a LocalCluster from the job's CPUs and memory;
- a checkpointed fit job cancelled with ``scancel`` mid-fit and submitted
  again with ``--resume`` ends with the model of an uninterrupted fit.

SLURM is found through ``SLURM_CONF``, or the env file start_slurm.sh writes
(``$STREAMEM_SLURM_DIR/env``, default /tmp/streamem-slurm/env); without a
SLURM that answers ``sinfo``, every test here is skipped saying why.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import yaml

import streamem
from workflow_helpers import REPO, assert_same_params, check_ok, check_usage_error, cli, mixture_sample, write_zarr

RTOL = 1e-10
SLURM_DIR = os.environ.get("STREAMEM_SLURM_DIR", "/tmp/streamem-slurm")
SBATCH_SCRIPT = os.path.join(REPO, "scripts", "slurm", "fit_in_allocation.sbatch")
WORKER_CONFIG = os.path.join(REPO, "configs", "slurm-single-node.yaml")
#: Overlapping components (EM changes the parameters every iteration), no early stop.
MAX_ITER = 20
FIT_ARGS = ("--n-components", "3", "--max-iter", str(MAX_ITER), "--tol", "0", "--random-state", "0")
#: Seconds a SLURM job may take to start, run and leave on a busy 2-core machine.
JOB_TIMEOUT = 180


# ------------------------------------------------------------------ finding SLURM
def _slurm_conf() -> tuple[str | None, str]:
    """SLURM_CONF from the environment or start_slurm.sh's env file; else None and why."""
    conf = os.environ.get("SLURM_CONF")
    if conf:
        return conf, ""
    env_file = os.path.join(SLURM_DIR, "env")
    try:
        with open(env_file) as fh:
            for line in fh:
                words = shlex.split(line)
                if len(words) == 2 and words[0] == "export" and words[1].startswith("SLURM_CONF="):
                    return words[1].split("=", 1)[1], ""
    except OSError:
        pass
    return None, f"no SLURM: SLURM_CONF is not set and {env_file} does not exist (start one: scripts/ci/start_slurm.sh)"


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment for SLURM's commands and for streamem under SLURM; skips without a SLURM that answers."""
    conf, why = _slurm_conf()
    if conf is None:
        pytest.skip(why)
    missing = [cmd for cmd in ("sinfo", "sbatch", "squeue", "scancel") if not shutil.which(cmd)]
    if missing:
        pytest.skip(f"no SLURM: {', '.join(missing)} not installed (scripts/ci/start_slurm.sh installs them)")
    env = {**os.environ, "SLURM_CONF": conf}
    env.pop("PYTHONWARNINGS", None)
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.skip(f"no SLURM: sinfo (SLURM_CONF={conf}) did not answer within 15 s")
    states = proc.stdout.split()
    if proc.returncode != 0 or not states:
        pytest.skip(f"no SLURM: sinfo (SLURM_CONF={conf}) failed: {proc.stderr.strip() or 'no node'}")
    if not {"idle", "mixed", "allocated"} & set(states):
        pytest.skip(f"no SLURM node can run jobs: sinfo (SLURM_CONF={conf}) says {states}")
    return env


def _jobs(env: dict[str, str], name: str, states: str | None = None) -> list[str]:
    """Ids of the jobs named ``name`` in squeue: in ``states``, or (default) those not ended (pending, running, completing)."""
    command = ["squeue", "-h", "-n", name, "-o", "%i", *(["-t", states] if states else [])]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def _wait_gone(env: dict[str, str], name: str, timeout: float = 30) -> list[str]:
    """Wait until no job named ``name`` is in squeue (a cancelled job is 'completing' for a moment); those left."""
    deadline = time.monotonic() + timeout
    while (left := _jobs(env, name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _unique(tag: str) -> str:
    return f"streamem-test-{tag}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ data, reference
@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    """6,000 overlapping rows in 1,000-row chunks."""
    return write_zarr(tmp_path_factory.mktemp("slurm") / "data.zarr", mixture_sample(6000, seed=16, spread=0.25), 1000)


@pytest.fixture(scope="module")
def reference(data_path, tmp_path_factory) -> streamem.GaussianMixture:
    """The same fit without any cluster: Dask's threads in the test's own subprocess."""
    out = tmp_path_factory.mktemp("slurm-ref") / "ref.zarr"
    check_ok(cli("fit", data_path, "--out", out, *FIT_ARGS, "--workers", "0", "--quiet"))
    return streamem.load(out)


@pytest.fixture(scope="module")
def streamem_command(tmp_path_factory) -> str:
    """An executable running this interpreter's streamem, for STREAMEM= of the sbatch script."""
    path = tmp_path_factory.mktemp("slurm-bin") / "streamem"
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m streamem.cli "$@"\n')
    path.chmod(0o755)
    return str(path)


def _worker_config(tmp_path, name: str) -> str:
    """configs/slurm-single-node.yaml with this test's job name; its logs under tmp_path."""
    with open(WORKER_CONFIG) as fh:
        config = yaml.safe_load(fh)
    config["cluster"].update(job_name=name, log_directory=str(tmp_path / "logs"))
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _started_jobs(tmp_path, name: str) -> list[str]:
    """Job ids that wrote an output file: the jobs that started (their output is created at the start)."""
    logs = tmp_path / "logs"
    return sorted({m.group(1) for p in (logs.iterdir() if logs.exists() else ()) if (m := re.fullmatch(rf"{name}-(\d+)\.err", p.name))})


# ------------------------------------------------------------------ (a) worker jobs
def test_worker_jobs_fit_equals_the_local_fit_and_leave_no_job(slurm_env, data_path, reference, tmp_path):
    name = _unique("workers")
    out = tmp_path / "model.zarr"
    proc = cli("fit", data_path, "--out", out, *FIT_ARGS, "--config", _worker_config(tmp_path, name), "--quiet",
               env=slurm_env, cwd=str(tmp_path), timeout=JOB_TIMEOUT)
    running = _jobs(slurm_env, name, "PD,R")
    check_ok(proc)
    assert _started_jobs(tmp_path, name), f"no worker job of {name} started: {proc.stderr}"
    assert running == [], f"jobs still pending or running after the fit: {running}"
    assert _wait_gone(slurm_env, name) == []
    assert_same_params(streamem.load(out), reference, RTOL)


def test_a_fit_that_fails_on_worker_jobs_leaves_no_job(slurm_env, data_path, tmp_path):
    """A NaN in the 5th chunk: found by the workers in the first pass; exit 2, one line, jobs cancelled."""
    import zarr

    X = zarr.open_array(data_path, mode="r")[...]
    X[4321, 1] = float("nan")
    bad = write_zarr(tmp_path / "bad.zarr", X, 1000)
    name = _unique("fails")
    proc = cli("fit", bad, "--out", tmp_path / "model.zarr", *FIT_ARGS, "--config", _worker_config(tmp_path, name), "--quiet",
               env=slurm_env, cwd=str(tmp_path), timeout=JOB_TIMEOUT)
    running = _jobs(slurm_env, name, "PD,R")
    check_usage_error(proc, "non-finite", "4321")
    assert _started_jobs(tmp_path, name), "the fit failed before any worker job started: this test needs one that did"
    assert running == [], f"jobs still pending or running after the failed fit: {running}"
    assert _wait_gone(slurm_env, name) == []
    assert not (tmp_path / "model.zarr").exists()


def test_the_shipped_site_config_meets_a_real_sbatch(slurm_env, data_path, tmp_path):
    """configs/slurm.yaml names a partition this SLURM lacks: sbatch's own refusal, in one line, at once."""
    proc = cli("fit", data_path, "--out", tmp_path / "model.zarr", "--config", os.path.join(REPO, "configs", "slurm.yaml"),
               "--quiet", env=slurm_env, cwd=str(tmp_path), timeout=JOB_TIMEOUT)
    check_usage_error(proc, "cluster (slurm)", "sbatch exited with status 1", "invalid partition specified: normal")
    assert _wait_gone(slurm_env, "dask-worker", timeout=5) == []  # dask-jobqueue's default job name


# ------------------------------------------------------------------ (b) the fit as one job
def _sbatch(env: dict[str, str], name: str, log: str, *args, wait: bool) -> subprocess.CompletedProcess:
    command = ["sbatch", "--parsable", "-J", name, "-o", log, *(["--wait"] if wait else []), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)


def test_the_whole_fit_as_one_sbatch_job(slurm_env, streamem_command, data_path, reference, tmp_path):
    name = _unique("one-job")
    out = tmp_path / "model.zarr"
    log = tmp_path / "job.out"
    env = {**slurm_env, "STREAMEM": streamem_command}
    proc = _sbatch(env, name, log, "--cpus-per-task=2", "--mem=2G", SBATCH_SCRIPT, data_path, out, *FIT_ARGS, "--quiet", wait=True)
    output = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"sbatch exit {proc.returncode}: {proc.stderr}\njob output:\n{output}"
    # The job's 2 CPUs and 2048 MB: 2 workers of 1 thread, 90% of the memory shared.
    assert "2 CPUs, 2048 MB: 2 workers x 1 threads, 921 MiB each" in output, output
    assert_same_params(streamem.load(out), reference, RTOL)


# ------------------------------------------------------------------ (c) scancel, then --resume
def _checkpoint_iteration(ckpt) -> int | None:
    """The iteration of the state LATEST names (state-<iteration>-...), None before the first."""
    try:
        latest = (ckpt / "LATEST").read_text().strip()
    except OSError:
        return None
    match = re.match(r"state-(\d+)-", latest)
    return int(match.group(1)) if match else None


def test_a_cancelled_fit_job_resumes_to_the_same_model(slurm_env, streamem_command, data_path, reference, tmp_path):
    name = _unique("resume")
    out, ckpt = tmp_path / "model.zarr", tmp_path / "ckpt"
    env = {**slurm_env, "STREAMEM": streamem_command}
    # --mem-per-cpu: the script's other way to the job's memory (SLURM_MEM_PER_CPU x CPUs). --workers 0
    # after the model path overrides the script's LocalCluster (the previous test's subject): no worker
    # processes to start, twice, on a busy machine.
    job = ("--cpus-per-task=2", "--mem-per-cpu=1G", SBATCH_SCRIPT, data_path, out, *FIT_ARGS, "--checkpoint", ckpt, "--resume", "--workers", "0")
    first = _sbatch(env, name, tmp_path / "first.out", *job, wait=False)
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT
    while _checkpoint_iteration(ckpt) is None:
        assert _jobs(env, name), f"job {job_id} ended before its first checkpoint:\n{(tmp_path / 'first.out').read_text()}"
        assert time.monotonic() < deadline, f"no checkpoint after {JOB_TIMEOUT} s"
        time.sleep(0.05)
    subprocess.run(["scancel", job_id], env=env, check=True, timeout=15)
    assert _wait_gone(env, name) == [], f"job {job_id} still in squeue after scancel"
    stopped_at = _checkpoint_iteration(ckpt)
    first_output = (tmp_path / "first.out").read_text()
    assert not out.exists(), f"the job finished before it was cancelled (checkpoint at {stopped_at}):\n{first_output}"
    assert 1 <= stopped_at < MAX_ITER
    assert "CANCELLED" in first_output, first_output
    assert "2 CPUs, 2048 MB: 2 workers x 1 threads, 921 MiB each" in first_output, first_output

    second = _sbatch(env, name, tmp_path / "second.out", *job, wait=True)
    second_output = (tmp_path / "second.out").read_text()
    assert second.returncode == 0, f"sbatch exit {second.returncode}: {second.stderr}\njob output:\n{second_output}"
    # It went on from the checkpoint: the iterations it logged start after the cancelled job's last state.
    logged = [int(i) for i in re.findall(r"iteration (\d+):", second_output)]
    assert logged and min(logged) > stopped_at and max(logged) == MAX_ITER, (stopped_at, logged)
    assert_same_params(streamem.load(out), reference, RTOL)
