"""The documentation site (docs/, Sphinx + MyST-Parser) builds with warnings as errors, and its
API reference documents every public name of pydeform."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import pydeform

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The HTML site, built as the README says (-W: any warning fails the build)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    out = tmp_path_factory.mktemp("html")
    doctrees = tmp_path_factory.mktemp("doctrees")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(doctrees),
               str(DOCS), str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def test_every_page_is_built(site):
    pages = {path.stem for path in DOCS.glob("*.md")}
    assert pages, "no pages in docs/"
    for page in pages:
        assert (site / f"{page}.html").is_file(), f"docs/{page}.md was not built"


# The API reference's modules (pydeform.torch / pydeform.jax once they are part of the package).
API_MODULES = tuple(name for name in ("pydeform", "pydeform.torch", "pydeform.jax") if importlib.util.find_spec(name))


def public_names(module_name):
    """A module's ``__all__``, read from its source: pydeform.torch / pydeform.jax need not be
    importable here (the docs build mocks a missing torch or jax)."""
    tree = ast.parse(Path(importlib.util.find_spec(module_name).origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [name for name in ast.literal_eval(node.value) if not name.startswith("__")]
    raise AssertionError(f"{module_name} has no __all__")


@pytest.mark.parametrize("module_name", API_MODULES)
def test_api_reference_documents_every_public_name(site, module_name):
    api = (site / "api.html").read_text()
    missing = [name for name in public_names(module_name) if f'id="{module_name}.{name}"' not in api]
    assert not missing, f"docs/api.md lacks {missing}"


def test_public_names_are_read_right():
    assert public_names("pydeform") == [name for name in pydeform.__all__ if not name.startswith("__")]


def test_figures_are_in_the_site(site):
    """Every PNG beside the pages is shown by some page (Sphinx copies used images only)."""
    figures = sorted(path.name for path in DOCS.glob("*.png"))
    copied = {path.name for path in (site / "_images").glob("*.png")}
    assert figures and not set(figures) - copied, f"figures not shown on any page: {set(figures) - copied}"
