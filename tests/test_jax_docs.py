"""The JAX examples of README.md and docs/jax.md run and show what they say."""

import re
from pathlib import Path

import pytest

pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def run_examples(text):
    namespace = {}
    for code in _FENCE.findall(text):
        exec(compile(code, "example", "exec"), namespace)
    return namespace


def test_readme_jax_example():
    section = (ROOT / "README.md").read_text().split("\n## JAX\n", 1)[1].split("\n## ", 1)[0]
    namespace = run_examples(section)
    assert namespace["grad_weight"].shape == (8, 4, 3, 3)
    assert namespace["grad_offset"].shape == (2, 18, 12, 12)
    assert float(abs(namespace["grad_offset"]).sum()) > 0


def test_docs_jax_example_trains(capsys):
    namespace = run_examples((ROOT / "docs" / "jax.md").read_text())
    assert capsys.readouterr().out.splitlines() == ["True"]
    losses = namespace["losses"]
    assert len(losses) == 5 and all(b < a for a, b in zip(losses, losses[1:]))
