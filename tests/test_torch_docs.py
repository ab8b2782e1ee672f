"""The PyTorch examples run and print what they say: docs/torch.md (with its DCNv2 block trained
for a few steps) and the PyTorch section of README.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_docs_examples import examples, run_example

pytest.importorskip("torch")

README = Path(__file__).resolve().parents[1] / "README.md"


def test_docs_page_examples_run():
    namespace = {}
    for code in examples("torch.md"):
        run_example(code, namespace, "torch.md")


def test_readme_example_runs():
    section = re.search(r"^## PyTorch\n(.*?)^## ", README.read_text(), re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## PyTorch' section"
    codes = re.findall(r"^```python\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    assert codes, "README.md's PyTorch section has no python example"
    namespace = {}
    for code in codes:
        run_example(code, namespace, "../README.md")
