"""Sphinx configuration of streamem's documentation (``make docs``)."""

from __future__ import annotations

import streamem

project = "streamem"
author = "the streamem developers"
copyright = "the streamem developers"  # noqa: A001 (Sphinx's name)
version = release = streamem.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
# Pages are linked by hand (autosummary tables without stub files): nothing is
# generated into the source tree.
autosummary_generate = False

# Every object documented once, on its API page; the class pages list their
# methods themselves (autodoc ``:members:``), so numpydoc does not add tables.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # numpydoc's "Parameters" already give the types

# Markdown: ``[text](page.md#a-heading)`` links to headings of levels 1-3.
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = f"streamem {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path: list[str] = []
