"""Sphinx HTML math renderer that draws formulas at build time with matplotlib's mathtext.

Sphinx's default renderer, MathJax, loads its JavaScript from a CDN, so a site opened offline
shows raw LaTeX. This one turns each formula into an SVG (glyphs as paths: no font is needed
to view it) embedded in the page as a data URI, so the pages need nothing from the network.
mathtext covers the TeX the docstrings use (sub- and superscripts, ``\\sum`` with limits, Greek
letters, spacing commands); a formula it cannot parse is a build warning (an error under -W)
and is shown as its source text.
"""

from __future__ import annotations

import base64
import html
import io

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: Resolution of the drawing in points per inch: the SVG scales, this sets its nominal size.
DPI = 100


def formula_svg(latex: str, fontsize: float) -> str:
    """The SVG text of one formula (a single line of TeX math, without dollar signs)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import mathtext, rc_context
    from matplotlib.font_manager import FontProperties

    buffer = io.BytesIO()
    with rc_context({"mathtext.fontset": "cm", "svg.fonttype": "path", "svg.hashsalt": "pydeform"}):
        mathtext.math_to_image(f"${' '.join(latex.split())}$", buffer, prop=FontProperties(size=fontsize),
                               dpi=DPI, format="svg")
    return buffer.getvalue().decode()


def _image(latex: str, fontsize: float, css_class: str) -> str:
    svg = formula_svg(latex, fontsize)
    data = base64.b64encode(svg.encode()).decode()
    return (f'<img class="{css_class}" src="data:image/svg+xml;base64,{data}" '
            f'alt="{html.escape(latex.strip())}"/>')


def _render(translator, node, latex: str, fontsize: float, css_class: str) -> str:
    try:
        return _image(latex, fontsize, css_class)
    except ValueError as error:  # mathtext's parse errors
        logger.warning("math %r cannot be drawn by mathtext: %s", latex, error, location=node)
        return f'<span class="math">{translator.encode(latex)}</span>'


def visit_math(translator, node: nodes.math) -> None:
    translator.body.append(_render(translator, node, node.astext(), 13, "math"))
    raise nodes.SkipNode


def visit_displaymath(translator, node: nodes.math_block) -> None:
    # Blank lines separate the equations of one block, as in Sphinx's other renderers.
    parts = [part for part in node.astext().split("\n\n") if part.strip()]
    translator.body.append(translator.starttag(node, "div", CLASS="math"))
    for part in parts:
        translator.body.append(f"<p>{_render(translator, node, part, 15, 'math-display')}</p>\n")
    translator.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer("mathtext", (visit_math, None), (visit_displaymath, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
