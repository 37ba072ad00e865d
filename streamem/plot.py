"""Pictures of a fitted model: the convergence curve and its components.

Gaussian mixtures: with data, a scatter of sampled rows with each
component's covariance ellipse (one feature: a histogram with each
component's density). Every other family: the component
profiles (a line per component over the features for parameters of shape
(K, d), such as Bernoulli/Binomial probabilities and Poisson rates; a
heatmap for (K, d, C), such as categorical probabilities), and with data,
the share of sampled rows each component takes next to its weight.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from typing import Any, Callable

import numpy as np

#: Draws one panel on the axes it is given.
Panel = Callable[[Any], None]


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
    """Write a picture: the convergence curve and pictures of the components.

    Gaussian mixtures: with ``data``, a scatter of a random sample of rows,
    coloured by their most likely component, with each component's 2-sigma
    covariance ellipse, projected onto ``features`` (two feature indices)
    or by default onto the first two principal axes of the sample. A
    one-feature model: a histogram of the sample with each component's
    weighted density and the mixture's.

    Other families: every parameter array of the family drawn per
    component: (K, d) arrays as one line per component over the features,
    (K, d, C) arrays (categorical probabilities) as a heatmap of components
    by feature and category. With ``data``, also the share of a random
    sample of rows whose most likely component each component is, beside
    its mixing weight.

    Parameters
    ----------
    model : MixtureEstimator
        A fitted model of any family.
    out : str
        The file to write; its suffix names the format (``.png``, ``.pdf``,
        ``.svg``, ...: see :func:`image_format`).
    data : array-like, dask array, zarr.Array, path or xarray object, optional
        Data the model can score (see :func:`streamem.data.load_data`); it
        is checked by the model as for ``predict``.
    variable, sample_dim : str, optional
        The variable and sample dimension of an xarray or Zarr-group ``data``.
    features : tuple of two int, optional
        Gaussian mixtures of two or more features only.
    n_points : int, default=5000
        Rows drawn from ``data``, at least 1.
    seed : int, default=0
        Seed of the rows drawn, from 0 to 2**32 - 1.

    Raises
    ------
    ValueError
        Without matplotlib, with ``out`` of no format matplotlib writes,
        ``n_points`` below 1, ``seed`` out of range, ``features`` out of range, or ``features``
        for a family other than Gaussian or a one-feature model.
    """
    plt = _pyplot()
    fmt = image_format(out)
    check_sampling(n_points, seed)
    if data is not None:
        # The model's own loading: the same feature checks (and alignment) as predict, before any drawing.
        data = model._load_fitted(data, variable=variable, sample_dim=sample_dim)
    panels_of = FAMILY_PANELS.get(model._family().name, profile_panels)
    panels = [partial(_convergence, model), *panels_of(model, data, features, n_points, seed)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for panel, ax in zip(panels, axes[0]):
        panel(ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110, format=fmt)
    plt.close(fig)


def check_sampling(n_points: int, seed: int) -> None:
    """Refuse ``n_points`` below 1 or a ``seed`` numpy does not take (0 to 2**32 - 1), before anything is read.

    Raises
    ------
    ValueError
        Naming the argument, the value and what is allowed.
    """
    if isinstance(n_points, bool) or int(n_points) != n_points or n_points < 1:
        raise ValueError(f"n_points must be a positive integer, got {n_points!r}")
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**32:  # np.random.RandomState's range
        raise ValueError(f"seed must be an integer from 0 to 2**32 - 1, got {seed!r}")


def image_format(out: str | os.PathLike) -> str:
    """The picture format of the file ``out``, by its suffix, as matplotlib writes it (``png`` for ``f.png``).

    Raises
    ------
    ValueError
        A name without a suffix (matplotlib would write ``out.png``, another
        file than the one named) or with one matplotlib does not write.
    """
    _pyplot()  # matplotlib, or the message saying how to install it
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    name = os.fspath(out)
    suffix = os.path.splitext(name.rstrip(os.sep))[1].lstrip(".").lower()
    if not suffix:
        raise ValueError(f"{name!r} has no suffix naming a picture format; give a file name such as "
                         f"{name.rstrip(os.sep) + '.png'!r} (formats: {', '.join(formats)})")  # fmt: skip
    if suffix not in formats:
        raise ValueError(f"{name!r}: matplotlib writes no format {suffix!r}; give a suffix of {', '.join(formats)}")
    if suffix == "pgf" and not _latex_found():
        raise ValueError(f"{name!r}: matplotlib writes pgf through LaTeX ({_latex()!r}, rcParams['pgf.texsystem']), "
                         f"which is not installed here; install it, or give another suffix such as .pdf or .svg")  # fmt: skip
    return suffix


def _latex() -> str:
    import matplotlib

    return str(matplotlib.rcParams["pgf.texsystem"])


def _latex_found() -> bool:
    """Whether the LaTeX that matplotlib's pgf backend runs (to measure text) is on PATH."""
    return shutil.which(_latex()) is not None


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'streamem[plot]'") from None
    return plt


def _sample(data: Any, n_points: int, seed: int) -> np.ndarray:
    """A uniform random sample of at most ``n_points`` rows of loaded ``data``."""
    from streamem.cluster import resolve_scheduler
    from streamem.em import DataPasses
    from streamem.init import draw_sample

    return draw_sample(DataPasses(data, resolve_scheduler()), n_points, np.random.RandomState(seed))


def _colours(n_components: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n_components <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(n_components)]


def _convergence(model: Any, ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    bounds = np.asarray(model.lower_bounds_)
    ax.plot(np.arange(1, len(bounds) + 1), bounds, marker="o", ms=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Plain values: near convergence the bounds differ in the 4th digit, and an
    # offset ("+2.662e1" above the axis) would leave only those digits on the ticks.
    ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.yaxis.get_major_formatter().set_scientific(False)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean log-likelihood per sample")
    ax.set_title(f"convergence ({'converged' if model.converged_ else 'not converged'}, {model.n_iter_} iterations)")
    ax.grid(alpha=0.3)


# ------------------------------------------------------------------ Gaussian
def gaussian_panels(model: Any, data: Any, features: tuple[int, int] | None, n_points: int, seed: int) -> list[Panel]:
    """With data: a scatter of sampled rows with the components' 2-sigma ellipses (one feature: a histogram
    with the components' densities); nothing without."""
    d = model.n_features_in_
    if features is not None and d < 2:
        raise ValueError(f"features must not be given for a one-feature model (its rows are drawn as a histogram), got {list(features)}")
    if features is not None and not all(0 <= f < d for f in features):
        raise ValueError(f"features must be two indices in 0..{d - 1}, got {list(features)}")
    if data is None:
        return []
    if d == 1:
        return [partial(_histogram, model, _sample(data, n_points, seed))]
    return [partial(_scatter, model, _sample(data, n_points, seed), features)]


def _histogram(model: Any, sample: np.ndarray, ax: Any) -> None:
    """One feature: a histogram of the sampled rows (a density) with each component's weighted density and their sum."""
    means = model.means_[:, 0]
    sds = np.sqrt(model._family().full_covariances(model.covariances_, *model.means_.shape)[:, 0, 0])
    values = sample[:, 0]
    lo = min(values.min(), (means - 3 * sds).min())
    hi = max(values.max(), (means + 3 * sds).max())
    x = np.linspace(lo, hi, 400)
    densities = model.weights_[:, None] * np.exp(-0.5 * ((x - means[:, None]) / sds[:, None]) ** 2) / (sds[:, None] * np.sqrt(2 * np.pi))
    ax.hist(values, bins=np.histogram_bin_edges(values, bins="auto"), density=True, color="0.8", label="rows")
    for k, colour in enumerate(_colours(model.n_components)):
        ax.plot(x, densities[k], color=colour, lw=2, label=f"{k} (weight {model.weights_[k]:.3f})")
    ax.plot(x, densities.sum(axis=0), color="black", lw=1, ls="--", label="mixture")
    ax.set_xlabel(_feature_labels(model)[0] if getattr(model, "feature_coord_", None) is not None else "feature 0")
    ax.set_ylabel("density")
    ax.set_title(f"{len(sample):,} random rows and the component densities")
    ax.legend(title="component", fontsize="small")


def _scatter(model: Any, sample: np.ndarray, features: tuple[int, int] | None, ax: Any) -> None:
    from matplotlib.patches import Ellipse

    d = model.n_features_in_
    labels = model.predict(sample)
    covs = model._family().full_covariances(model.covariances_, *model.means_.shape)
    if features is None:
        axes2 = principal_axes(sample, 2)
        names = ("principal axis 1", "principal axis 2")
    else:
        axes2 = np.eye(d)[:, list(features)]
        names = tuple(f"feature {f}" for f in features)
    xy = sample @ axes2
    colours = _colours(model.n_components)
    ax.scatter(xy[:, 0], xy[:, 1], c=[colours[k] for k in labels], s=3, alpha=0.4, linewidths=0)
    for k in range(model.n_components):
        mean = model.means_[k] @ axes2
        cov = axes2.T @ covs[k] @ axes2
        vals, vecs = np.linalg.eigh(cov)
        angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
        width, height = 2 * 2 * np.sqrt(np.maximum(vals[::-1], 0))
        ax.add_patch(Ellipse(mean, width, height, angle=angle, fill=False, lw=2, color=colours[k]))
        ax.annotate(str(k), mean, ha="center", va="center", fontweight="bold")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(f"{len(sample):,} random rows by component, 2-sigma ellipses")


def principal_axes(sample: np.ndarray, n_axes: int) -> np.ndarray:
    """The first ``n_axes`` principal axes of ``sample`` as columns (d, n_axes), each signed deterministically.

    An axis's sign is arbitrary (LAPACK may return either), so the picture
    could come out mirrored from one run or machine to the next. Each axis is
    turned so that its largest-magnitude component (the first of equals) is
    positive.
    """
    centred = sample - sample.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:n_axes].T.copy()
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
    return axes * np.where(signs == 0, 1.0, signs)


# ---------------------------------------------------------- other families
def profile_panels(model: Any, data: Any, features: tuple[int, int] | None, n_points: int, seed: int) -> list[Panel]:
    """Every parameter array per component (lines over the features, or a heatmap); with data, rows per component."""
    if features is not None:
        # "features must": the command line's words turn the subject into --features.
        raise ValueError(f"features must be None for a {model._family().name} mixture, whose plot draws every feature "
                         f"(they pick the axes of a Gaussian mixture's scatter), got {list(features)}")  # fmt: skip
    arrays = model._family().param_arrays(model._params())
    arrays.pop("weights")
    panels: list[Panel] = []
    for name, value in arrays.items():
        if value.ndim == 2:
            panels.append(partial(_profile_lines, model, name, value))
        elif value.ndim == 3:
            panels.append(partial(_profile_heatmap, model, name, value))
    if data is not None:
        panels.append(partial(_shares, model, _sample(data, n_points, seed)))
    return panels


def _feature_labels(model: Any) -> list[str]:
    coord = getattr(model, "feature_coord_", None)
    return [str(c) for c in coord] if coord is not None else [str(j) for j in range(model.n_features_in_)]


def _profile_lines(model: Any, name: str, value: np.ndarray, ax: Any) -> None:
    """One line per component over the features (e.g. probabilities of a 1, or Poisson rates)."""
    K, d = value.shape
    x = np.arange(d)
    for k, colour in enumerate(_colours(K)):
        ax.plot(x, value[k], marker="o" if d <= 50 else None, ms=4, color=colour, label=f"{k} (weight {model.weights_[k]:.3f})")
    ticks, labels = x[:: int(np.ceil(d / 30))], _feature_labels(model)  # at most 30 labels
    ax.set_xticks(ticks, [labels[j] for j in ticks], rotation=90 if d > 10 else 0)
    ax.set_xlabel("feature")
    ax.set_ylabel(name)
    ax.set_title(f"{name} per component")
    ax.grid(alpha=0.3)
    ax.legend(title="component", fontsize="small")


def _profile_heatmap(model: Any, name: str, value: np.ndarray, ax: Any) -> None:
    """Components by (feature, category): one row per component, one block of columns per feature."""
    K, d, C = value.shape
    image = ax.imshow(value.reshape(K, d * C), aspect="auto", interpolation="nearest", vmin=0.0,
                      vmax=1.0 if name == "probs" else None, cmap="viridis")  # fmt: skip
    for j in range(1, d):
        ax.axvline(j * C - 0.5, color="white", lw=1.5)
    step = int(np.ceil(d / 30))  # at most 30 labels
    ax.set_xticks(np.arange(0, d, step) * C + (C - 1) / 2, _feature_labels(model)[::step], rotation=90 if d > 10 else 0)
    ax.set_yticks(np.arange(K))
    ax.set_xlabel(f"feature (blocks of {C} categories, 0 .. {C - 1} from left)")
    ax.set_ylabel("component")
    ax.set_title(f"{name} per component, feature and category")
    ax.figure.colorbar(image, ax=ax)


def _shares(model: Any, sample: np.ndarray, ax: Any) -> None:
    """The share of sampled rows whose most likely component is each component, beside its weight."""
    K = model.n_components
    shares = np.bincount(model.predict(sample), minlength=K) / len(sample)
    x = np.arange(K)
    ax.bar(x - 0.2, model.weights_, width=0.4, color=_colours(K), alpha=0.5, label="weight")
    ax.bar(x + 0.2, shares, width=0.4, color=_colours(K), label="share of rows")
    ax.set_xticks(x)
    ax.set_xlabel("component")
    ax.set_ylabel("fraction")
    ax.set_title(f"{len(sample):,} random rows by most likely component")
    ax.legend(fontsize="small")


#: Pictures of the components by family name; families not named here get :func:`profile_panels`.
FAMILY_PANELS: dict[str, Callable[..., list[Panel]]] = {"gaussian": gaussian_panels}
