"""The examples of the documentation pages run, and print what the pages say they print.

In the pages, a ```` ```python ```` fence is a runnable example and a ```` ```{code-block} python ````
directive an illustration (signatures). The examples of a page run in order in one namespace,
as a reader would paste them (a CuPy, PyTorch or JAX example in a copy of it, see
``uses_a_framework``). A ``print(...)`` whose line ends in a comment must print exactly
that comment. Examples that import CuPy need a GPU: without one the page's other examples run
here, and the gpu-marked run of the whole page is skipped (conftest.py).
"""

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("getting_started.md", "deform_conv.md", "roi.md")

_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def examples(page):
    return _FENCE.findall((ROOT / "docs" / page).read_text())


def needs_gpu(code):
    return re.search(r"^import cupy", code, re.MULTILINE) is not None


def uses_a_framework(code):
    """A CuPy, PyTorch or JAX example: it runs in a copy of the page's namespace, so its arrays
    do not replace the NumPy ones of the examples after it."""
    return re.search(r"^(import (cupy|torch|jax)|from pydeform\.(torch|jax) )", code, re.MULTILINE) is not None


def expected_prints(code):
    """One entry per print call of ``code`` in source order (the examples have no loops): the
    comment ending the call's last line or, failing that, filling the line below it; None when
    there is none."""
    lines = code.splitlines()
    calls = sorted(
        (node for node in ast.walk(ast.parse(code))
         if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"),
        key=lambda node: node.lineno,
    )
    expected = []
    for call in calls:
        tail = lines[call.end_lineno - 1][call.end_col_offset:]
        below = lines[call.end_lineno] if call.end_lineno < len(lines) else ""
        if "#" in tail:
            expected.append(tail.split("#", 1)[1].strip())
        elif below.startswith("# "):  # a long output goes on a comment line of its own
            expected.append(below[2:].strip())
        else:
            expected.append(None)
    return expected


def run_example(code, namespace, page, *, keep_names=False):
    """Run one example, checking its prints; ``keep_names`` runs even a framework example in
    ``namespace`` itself (a page about that framework, whose names the caller inspects)."""
    output = io.StringIO()
    isolated = uses_a_framework(code) and not keep_names
    with contextlib.redirect_stdout(output):
        exec(compile(code, f"docs/{page}", "exec"), dict(namespace) if isolated else namespace)
    printed = output.getvalue().splitlines()
    expected = expected_prints(code)
    assert len(printed) == len(expected), (code, printed)
    for line, comment in zip(printed, expected):
        if comment is not None:
            assert line == comment, f"docs/{page}: printed {line!r}, the page says {comment!r}"


def test_every_page_has_examples():
    for page in PAGES:
        assert examples(page), f"docs/{page} has no runnable example"


@pytest.mark.parametrize("page", PAGES)
def test_cpu_examples_run(page):
    namespace = {}
    for code in examples(page):
        if not needs_gpu(code):
            run_example(code, namespace, page)


@pytest.mark.gpu
@pytest.mark.parametrize("page", PAGES)
def test_all_examples_run_on_a_gpu(page):
    namespace = {}
    for code in examples(page):
        run_example(code, namespace, page)
