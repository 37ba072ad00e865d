"""The documentation site: it builds with warnings as errors, documents the public API, and its examples say true things.

The build needs the ``docs`` extra (``pip install -e '.[docs]'``, which
``make docs`` does); without it the build test is skipped with that reason.
The example test runs everywhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: Every object the API reference must have an entry (an HTML anchor) for.
API_OBJECTS = {
    "api/estimators.html": [
        f"streamem.{name}" for name in
        ("GaussianMixture", "BernoulliMixture", "BinomialMixture", "PoissonMixture", "CategoricalMixture", "MixtureEstimator")
    ] + [f"streamem.GaussianMixture.{m}" for m in ("fit", "partial_fit", "update", "predict", "score", "bic", "aic", "save")],
    "api/functions.html": ["streamem.load", "streamem.load_data"],
    "api/families.html": [
        "streamem.families.base.MixtureFamily", "streamem.families.base.MixtureFamily.component_log_prob",
        "streamem.families.base.register_family", "streamem.families.GaussianFamily", "streamem.families.BernoulliFamily",
        "streamem.families.BinomialFamily", "streamem.families.PoissonFamily", "streamem.families.CategoricalFamily",
    ],
}  # fmt: skip

USER_GUIDE = ["out_of_core", "online", "other_families", "clusters", "object_storage", "cli", "choosing_k"]


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_docs_build_with_warnings_as_errors_and_document_the_api(tmp_path):
    for module in ("sphinx", "numpydoc", "myst_parser", "pydata_sphinx_theme"):
        pytest.importorskip(module, reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path / "html"
    # -E: read every source again (no environment from an earlier build); the same flags as `make docs`.
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-b", "html", str(DOCS), str(out), "-d", str(tmp_path / "doctrees")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for page, names in API_OBJECTS.items():
        html = (out / page).read_text()
        missing = [name for name in names if f'id="{name}"' not in html]
        assert not missing, f"{page} has no entry for {missing}"
    for name in USER_GUIDE:
        assert (out / "user_guide" / f"{name}.html").is_file(), name
    # The family protocol page written before the site is part of it, content kept.
    assert "Component families: the protocol" in (out / "families.html").read_text()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # tol=0: ten iterations, as the paper
def test_the_two_coins_example_gives_the_numbers_the_page_quotes():
    """other_families.md quotes [0.797, 0.520] for Do & Batzoglou's coins (the paper: 0.80 and 0.52)."""
    (block,) = [b for b in _python_blocks(DOCS / "user_guide" / "other_families.md") if "coins" in b]
    namespace: dict = {}
    exec(block, namespace)
    probs = namespace["coins"].probs_.ravel()
    np.testing.assert_allclose(probs, [0.797, 0.520], atol=5e-4)
    assert "[0.797, 0.520]" in block


def test_every_user_guide_page_is_in_the_toctree():
    """A page left out of the toctree is a Sphinx warning too; this says which one without Sphinx."""
    index = (DOCS / "user_guide" / "index.md").read_text()
    pages = {p.stem for p in (DOCS / "user_guide").glob("*.md")} - {"index"}
    assert pages == set(USER_GUIDE)
    listed = set(re.findall(r"^([\w./]+)$", index, flags=re.M))
    assert set(USER_GUIDE) | {"../families"} <= listed
