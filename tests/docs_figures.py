"""The figure scripts of docs/: every ``docs/*.py`` but Sphinx's ``conf.py`` draws
``docs/<name>.png`` when run, and exposes the positions or results it draws as functions."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCRIPTS = tuple(sorted(path.stem for path in DOCS.glob("*.py") if path.name != "conf.py"))


def load_script(name):
    """``docs/<name>.py`` as a module (drawing needs matplotlib; the positions do not)."""
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
