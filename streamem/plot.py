"""Pictures of a fitted model: convergence curve, and a scatter with covariance ellipses."""

from __future__ import annotations

from typing import Any

import numpy as np


def plot_model(
    model: Any,
    out: str,
    *,
    data: Any = None,
    variable: str | None = None,
    sample_dim: str | None = None,
    features: tuple[int, int] | None = None,
    n_points: int = 5000,
    seed: int = 0,
) -> None:
    """Write a PNG: the convergence curve; with ``data``, a scatter of a random sample of rows.

    Rows are coloured by their most likely component; each component gets its
    2-sigma covariance ellipse. The projection is onto ``features`` (two
    feature indices) or, by default, onto the first two principal axes of the
    sample.

    Parameters
    ----------
    model : GaussianMixture
        A fitted model.
    out : str
        The PNG file to write.
    data : array-like, dask array, zarr.Array, path or xarray object, optional
        Data the model can score (see :func:`streamem.data.load_data`); it
        is checked by the model as for ``predict``.
    variable, sample_dim : str, optional
        The variable and sample dimension of an xarray or Zarr-group ``data``.
    features : tuple of two int, optional
    n_points : int, default=5000
        Rows drawn for the scatter.
    seed : int, default=0
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Ellipse
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'streamem[plot]'") from None
    from streamem.cluster import resolve_scheduler
    from streamem.em import DataPasses
    from streamem.init import draw_sample
    from streamem.matching import full_covariances

    d = model.n_features_in_
    if features is not None and not all(0 <= f < d for f in features):
        raise ValueError(f"features must be two indices in 0..{d - 1}, got {list(features)}")
    if data is not None:
        # The model's own loading: the same feature checks (and alignment) as predict, before any drawing.
        data = model._load_fitted(data, variable=variable, sample_dim=sample_dim)
    ncols = 1 if data is None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.8), squeeze=False)
    ax = axes[0, 0]
    bounds = np.asarray(model.lower_bounds_)
    ax.plot(np.arange(1, len(bounds) + 1), bounds, marker="o", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean log-likelihood per sample")
    ax.set_title(f"convergence ({'converged' if model.converged_ else 'not converged'}, {model.n_iter_} iterations)")
    ax.grid(alpha=0.3)

    if data is not None:
        sample = draw_sample(DataPasses(data, resolve_scheduler()), n_points, np.random.RandomState(seed))
        labels = model.predict(sample)
        covs = full_covariances(model.covariances_, model.covariance_type, *model.means_.shape)
        if features is None:
            centred = sample - sample.mean(axis=0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            axes2 = vt[:2].T
            names = ("principal axis 1", "principal axis 2")
        else:
            axes2 = np.eye(d)[:, list(features)]
            names = tuple(f"feature {f}" for f in features)
        xy = sample @ axes2
        ax = axes[0, 1]
        cmap = plt.get_cmap("tab10" if model.n_components <= 10 else "tab20")
        ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(k % cmap.N) for k in labels], s=3, alpha=0.4, linewidths=0)
        for k in range(model.n_components):
            mean = model.means_[k] @ axes2
            cov = axes2.T @ covs[k] @ axes2
            vals, vecs = np.linalg.eigh(cov)
            angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
            width, height = 2 * 2 * np.sqrt(np.maximum(vals[::-1], 0))
            ax.add_patch(Ellipse(mean, width, height, angle=angle, fill=False, lw=2, color=cmap(k % cmap.N)))
            ax.annotate(str(k), mean, ha="center", va="center", fontweight="bold")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title(f"{len(sample):,} random rows by component, 2-sigma ellipses")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)

