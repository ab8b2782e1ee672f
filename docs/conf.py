"""Sphinx configuration of the pydeform documentation (markdown pages through MyST-Parser).

Build from the repository root, warnings as errors:

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The API reference imports pydeform from this checkout, installed or not; docs/_ext holds the
# site's own extensions.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import pydeform  # noqa: E402  (after the path is set)

project = "pydeform"
author = "the pydeform authors"
copyright = "the pydeform authors"
release = version = pydeform.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' Args: / Returns: sections
    "mathtext_math",  # the formulas of the docstrings (.. math::), drawn at build time
]
# MathJax would load from a CDN (raw LaTeX offline): formulas are SVGs in the pages instead.
html_math_renderer = "mathtext"
source_suffix = {".md": "markdown"}
# Figure scripts (*.py) and their outputs live beside the pages; only the pages are sources.
exclude_patterns = ["_build", "**/__pycache__"]
# Headings become link targets (`page.md#heading`) down to level 3.
myst_heading_anchors = 3

# The API reference documents pydeform.torch and pydeform.jax. The docs extra does not install
# torch or jax (gigabytes); where one is missing, autodoc stands in a mock for it.
autodoc_mock_imports = []
for framework in ("torch", "jax"):
    try:
        importlib.import_module(framework)
    except ImportError:
        autodoc_mock_imports.append(framework)

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"pydeform {release}"
# Wider pages and wrapping code blocks: the examples' expected-output comments stay in view.
html_static_path = ["_static"]
html_css_files = ["pydeform.css"]

# autodoc gives every NamedTuple field the docstring "Alias for field number N"; the class
# docstring says what the fields are.
_FIELD_ALIAS = re.compile(r"Alias for field number \d+")


def _drop_field_alias_docstrings(app, what, name, obj, options, lines):
    if _FIELD_ALIAS.fullmatch(" ".join(lines).strip()):
        lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _drop_field_alias_docstrings)
