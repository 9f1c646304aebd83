"""environment.yml and the requirements files must list the same packages with the same version ranges."""
import re

import yaml

from conftest import REPO


def requirement_lines(*names: str) -> set[str]:
    lines = set()
    for name in names:
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                lines.add(re.sub(r"\s+", "", line))
    return lines


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert {re.sub(r"\s+", "", p) for p in pip_section} == requirement_lines("requirements.txt",
                                                                             "requirements-dev.txt")


def test_pyproject_installs_the_requirements_runtime_dependencies():
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    required = {line for line in lines if line and not line.startswith("#")}
    assert set(project["dependencies"]) == required - {"pytest>=8.0"}
    assert "pytest>=8.0" in project["optional-dependencies"]["test"]
