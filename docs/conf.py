"""Sphinx configuration of the pydeform documentation (markdown pages through MyST-Parser).

Build from the repository root, warnings as errors:

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The API reference imports pydeform from this checkout, installed or not.
sys.path.insert(0, str(ROOT))

import pydeform  # noqa: E402  (after the path is set)

project = "pydeform"
author = "the pydeform authors"
copyright = "the pydeform authors"
release = version = pydeform.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' Args: / Returns: sections
    "sphinx.ext.mathjax",  # the formulas of the docstrings (.. math::)
]
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
