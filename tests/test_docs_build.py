"""The documentation site (docs/, Sphinx + MyST-Parser) builds with warnings as errors, its API
reference documents every public name of pydeform, and it works offline."""

import ast
import base64
import html
import importlib.util
import re
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


# A resource the browser fetches by itself: a script, image, frame or stylesheet (not a link the
# reader may follow), or a url() / @import of a stylesheet.
_FETCHED = re.compile(r"""<(?:script|img|iframe|source)\b[^>]*\ssrc=["']([^"']+)|<link\b[^>]*\shref=["']([^"']+)"""
                      r"""|url\(\s*["']?([^"')]+)|@import\s+["']([^"']+)""")


def fetched_from_the_network(text: str) -> list:
    urls = [next(group for group in match.groups() if group) for match in _FETCHED.finditer(text)]
    return [url for url in urls if re.match(r"(?:[a-z]+:)?//", url, re.IGNORECASE)]


def test_the_network_check_finds_a_cdn_script():
    assert fetched_from_the_network(
        '<script defer="defer" src="https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"></script>')
    assert fetched_from_the_network('<link rel="stylesheet" href="//fonts.example.org/a.css" />')
    assert fetched_from_the_network("body { background: url('https://example.org/a.png') }")
    assert not fetched_from_the_network('<script src="_static/doctools.js?v=1"></script>'
                                        '<a href="https://example.org/">a link</a>')


def test_the_site_loads_nothing_from_the_network(site):
    """Opened offline, every page has everything it shows: no CDN script (MathJax), stylesheet,
    font or image."""
    files = list(site.rglob("*.html")) + list(site.rglob("*.css"))
    found = {str(path.relative_to(site)): urls for path in files
             if (urls := fetched_from_the_network(path.read_text(errors="replace")))}
    assert not found, found
    assert not [path.name for path in site.rglob("*.html") if "cdn" in path.read_text().lower()]


def test_formulas_are_drawn_into_the_pages(site):
    """The docstrings' formulas are SVG drawings inside the page (docs/_ext/mathtext_math.py),
    their glyphs as paths, not TeX for a script to typeset."""
    api = (site / "api.html").read_text()
    drawings = re.findall(r'<img class="math-display" src="data:image/svg\+xml;base64,([^"]+)" alt="([^"]*)"', api)
    assert drawings, "no formula drawn in api.html"
    for data, alt in drawings:
        svg = base64.b64decode(data).decode()
        assert "<path" in svg and "<text" not in svg, alt
    # deform_conv2d's sum, as the image's text alternative
    assert any("\\sum" in html.unescape(alt) for _, alt in drawings)


def test_a_formula_mathtext_cannot_draw_is_an_error():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from mathtext_math import formula_svg
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    pytest.importorskip("matplotlib")
    assert "<svg" in formula_svg(r"\sum_{i} x_i", 12)
    with pytest.raises(ValueError):
        formula_svg(r"\frac{1}{", 12)


def test_namedtuple_fields_are_listed_without_alias_noise(site):
    api = (site / "api.html").read_text()
    assert "Alias for field number" not in api
    assert 'id="pydeform.DeformConv2dGrads.offset"' in api  # the fields are still documented


def test_pages_widen_and_code_blocks_wrap(site):
    """Code lines of up to 120 characters (with their expected-output comments) stay in view."""
    assert '_static/pydeform.css' in (site / "getting_started.html").read_text()
    css = (site / "_static" / "pydeform.css").read_text()
    assert "white-space: pre-wrap" in css and "max-width: none" in css
