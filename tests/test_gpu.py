"""The GPU path (CuPy). Runs only where CuPy and a CUDA device are available."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import streamem


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not _gpu_available(), reason="needs CuPy and a CUDA device (none on this machine)")


def _data(n=20_000, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0], [0.0, 5.0, 5.0]])
    return centres[rng.integers(0, 3, n)] + rng.normal(size=(n, 3)), centres


def test_device_cuda_without_cupy_is_a_clear_error():
    if _gpu_available():
        pytest.skip("a GPU is available here")
    X, _ = _data(500)
    with pytest.raises(ValueError, match="device='cuda'"):
        streamem.GaussianMixture(2, device="cuda").fit(X)


def test_device_must_be_known():
    X, _ = _data(500)
    with pytest.raises(ValueError, match="device must be one of"):
        streamem.GaussianMixture(2, device="tpu").fit(X)


@needs_gpu
@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_gpu_agrees_with_cpu(covariance_type):
    X, centres = _data()
    kw = dict(n_components=3, covariance_type=covariance_type, tol=0, max_iter=15, means_init=centres + 0.3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cpu = streamem.GaussianMixture(**kw).fit(X)
        gpu = streamem.GaussianMixture(device="cuda", **kw).fit(X)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(gpu, name), getattr(cpu, name), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gpu.lower_bounds_, cpu.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(gpu.predict_proba(X), cpu.predict_proba(X), rtol=1e-9, atol=1e-12)


@needs_gpu
def test_dask_array_of_cupy_chunks():
    import cupy
    import dask.array as da

    X, centres = _data()
    gX = da.from_array(X, chunks=(4096, 3)).map_blocks(cupy.asarray)
    kw = dict(n_components=3, tol=0, max_iter=10, means_init=centres + 0.3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cpu = streamem.GaussianMixture(**kw).fit(X)
        gpu = streamem.GaussianMixture(**kw).fit(gX)
    np.testing.assert_allclose(gpu.means_, cpu.means_, rtol=1e-10)
