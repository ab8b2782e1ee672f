"""The documentation site (docs/, Sphinx + MyST-Parser) builds with warnings as errors, and its
API reference documents every public name of pydeform."""

import importlib
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


# The framework modules, documented once they are part of the package.
FRAMEWORK_MODULES = tuple(name for name in ("pydeform.torch", "pydeform.jax") if importlib.util.find_spec(name))


@pytest.mark.parametrize("module_name", ("pydeform",) + FRAMEWORK_MODULES)
def test_api_reference_documents_every_public_name(site, module_name):
    api = (site / "api.html").read_text()
    module = importlib.import_module(module_name)
    public = [name for name in module.__all__ if not name.startswith("__")]
    missing = [name for name in public if f'id="{module_name}.{name}"' not in api]
    assert not missing, f"docs/api.md lacks {missing}"


def test_figures_are_in_the_site(site):
    """Every PNG beside the pages is shown by some page (Sphinx copies used images only)."""
    figures = sorted(path.name for path in DOCS.glob("*.png"))
    copied = {path.name for path in (site / "_images").glob("*.png")}
    assert figures and not set(figures) - copied, f"figures not shown on any page: {set(figures) - copied}"
