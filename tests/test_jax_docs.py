"""The JAX examples of README.md and docs/jax.md run and show what they say."""

import re
from pathlib import Path

import pytest

from test_docs_examples import examples, run_example

pytest.importorskip("jax")

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_jax_example():
    section = README.read_text().split("\n## JAX\n", 1)[1].split("\n## ", 1)[0]
    codes = re.findall(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert codes, "README.md's JAX section has no python example"
    namespace = {}
    for code in codes:
        run_example(code, namespace, "../README.md", keep_names=True)
    assert namespace["grad_weight"].shape == (8, 4, 3, 3)
    assert namespace["grad_offset"].shape == (2, 18, 12, 12)
    assert float(abs(namespace["grad_offset"]).sum()) > 0


def test_docs_jax_example_trains():
    namespace = {}
    for code in examples("jax.md"):
        run_example(code, namespace, "jax.md", keep_names=True)  # checks its print against the page's "# True"
    losses = namespace["losses"]
    assert len(losses) == 5 and all(b < a for a, b in zip(losses, losses[1:]))
