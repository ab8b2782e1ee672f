"""Everything a user reads points only at the project's own documentation.

The design notes the code was written from are not shipped, so a docstring, comment, page,
``--help`` text or test that cites them ("SPEC section 3", "PERF.md") sends a reader to a file
they do not have. The pages of ``docs/`` hold the definitions; cite those.
"""

import contextlib
import io
import re
from pathlib import Path

from pydeform.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
INTERNAL_CITATION = re.compile(r"\bSPEC\b|\b(?:SPEC|PERF|TESTING)\.md\b|\bPERF\b")
SCANNED = ("README.md", "pyproject.toml", ".ci", "pydeform", "docs", "reference", "tests", "asv_benchmarks", "tools")
SUFFIXES = {".py", ".md", ".cu", ".cuh", ".h", ".json", ".toml", ".txt", ""}


def scanned_files() -> list:
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else path.rglob("*")
        files += [f for f in candidates if f.is_file() and f.suffix in SUFFIXES
                  and "_build" not in f.parts and "__pycache__" not in f.parts
                  and f != Path(__file__).resolve()]
    return sorted(files)


def internal_citations(text: str) -> list:
    return [line.strip() for line in text.splitlines() if INTERNAL_CITATION.search(line)]


def test_the_pattern_finds_the_citations_that_were_there():
    assert internal_citations("Semantics are SPEC section 3. This module\n")
    assert internal_citations('"(SPEC\'s rule B, used by every op"')
    assert internal_citations("the standard shapes of pydeform.benchmark_cases (PERF.md) on every")
    assert internal_citations("see TESTING.md")
    assert not internal_citations("spec = importlib.util.spec_from_file_location(name, path)")
    assert not internal_citations("cat_spec_wh=True, specified, inspect, PERFORMANCE")


def test_no_file_users_read_cites_an_internal_document():
    found = {str(path.relative_to(ROOT)): lines for path in scanned_files()
             if (lines := internal_citations(path.read_text(errors="replace")))}
    assert not found, found
    assert len(scanned_files()) > 50  # the walk reached the package, the docs and the tests


def test_bench_help_cites_the_benchmarks_page():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["bench", "--help"])
    assert "docs/benchmarks.md" in out.getvalue() and not internal_citations(out.getvalue())
