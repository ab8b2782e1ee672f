"""The distribution's metadata and every install line a user reads.

``pydeform`` on PyPI is an unrelated project with the same import name, so no page may tell a
user to ``pip install pydeform``: every install line names this checkout (``.``, ``".[extra]"``),
a wheel built from it, or the distribution name of pyproject.toml.
"""

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# One argument of a pip command line: a quoted string or a run of characters that occur in
# requirements, paths and options. The command ends at anything else (a backtick, "#", "&&", ")").
_ARGUMENT = r"""(?:"[^"\n]*"|'[^'\n]*'|[\w.\-/\[\],=<>@:$+*~]+)"""
_PIP_INSTALL = re.compile(rf"pip install((?: {_ARGUMENT})+)")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_install_requirements(text: str) -> list:
    """The requirement arguments (not options) of every ``pip install`` in ``text``."""
    requirements = []
    for match in _PIP_INSTALL.finditer(text):
        arguments = shlex.split(match.group(1))
        for index, argument in enumerate(arguments):
            if argument.startswith("-"):
                continue
            if index > 0 and arguments[index - 1] in ("-r", "-c", "--find-links", "-f", "--target", "-t"):
                continue  # an option's value, not a requirement
            requirements.append(argument)
    return requirements


def requirement_problem(requirement: str, distribution: str, version: str, extras) -> str | None:
    """Why ``requirement`` does not install this project's distribution correctly (None: it does,
    or it names some other project)."""
    base, _, extra_text = requirement.partition("[")
    named_extras = [e.strip() for e in extra_text.rstrip("]").split(",") if e.strip()]
    unknown = [e for e in named_extras if e not in extras]
    if base in (".", "./") or base.endswith(".whl"):
        if base.endswith(".whl"):
            wheel_name, wheel_version = Path(base).name.split("-")[:2]
            if _normalized(wheel_name) != _normalized(distribution) or wheel_version != version:
                return f"{requirement}: not a wheel of {distribution} {version}"
        return f"{requirement}: no extra {unknown} in pyproject.toml" if unknown else None
    name = _normalized(re.split(r"[<>=!~@ ;]", base, maxsplit=1)[0])
    if name.startswith("pydeform") and name != _normalized(distribution):
        return f"{requirement}: installs {name!r} from the index, not this project's {distribution!r}"
    if name == _normalized(distribution) and unknown:
        return f"{requirement}: no extra {unknown} in pyproject.toml"
    return None


def user_facing_files() -> list:
    return ([ROOT / "README.md", ROOT / ".ci" / "run"] + sorted((ROOT / "docs").glob("*.md"))
            + sorted((ROOT / "docs").glob("*.py")) + sorted((ROOT / "pydeform").rglob("*.py"))
            + sorted((ROOT / "asv_benchmarks").rglob("*.py")))


def test_the_checker_rejects_the_names_that_install_another_project():
    extras = set(PROJECT["optional-dependencies"])
    name, version = PROJECT["name"], PROJECT["version"]
    old_readme = ('pip install "pydeform[cuda12]"   # NVIDIA GPU\npip install pydeform   # CPU only\n'
                  'Add the `torch` extra (`pip install "pydeform[cuda12,torch]"`)')
    found = pip_install_requirements(old_readme)
    assert found == ["pydeform[cuda12]", "pydeform", "pydeform[cuda12,torch]"]
    assert all(requirement_problem(r, name, version, extras) for r in found)
    assert requirement_problem(".[nonsense]", name, version, extras)
    assert requirement_problem("dist/pydeform-0.1.0-py3-none-any.whl", name, version, extras)
    good = pip_install_requirements('pip install -e ".[cuda12,test]" torch && pip install .')
    assert good == [".[cuda12,test]", "torch", "."]
    assert not any(requirement_problem(r, name, version, extras) for r in good)


@pytest.mark.parametrize("path", user_facing_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_install_lines_name_this_distribution(path):
    extras = set(PROJECT["optional-dependencies"])
    problems = [problem for requirement in pip_install_requirements(path.read_text())
                if (problem := requirement_problem(requirement, PROJECT["name"], PROJECT["version"], extras))]
    assert not problems, problems


def test_readme_and_getting_started_install_from_a_checkout_and_name_the_future_distribution():
    for page in (ROOT / "README.md", ROOT / "docs" / "getting_started.md"):
        requirements = pip_install_requirements(page.read_text())
        assert ".[cuda12]" in requirements and ".[cuda13]" in requirements and "." in requirements, page
        assert f"{PROJECT['name']}[cuda12]" in requirements, page  # the line for once it is published
        assert any(r.endswith(".whl[cuda12]") for r in requirements), page
        # The clash is explained where the install lines are.
        assert "unrelated project" in page.read_text(), page


def test_license_file_is_the_apache_2_text_the_metadata_names():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
