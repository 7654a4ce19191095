"""Packaging: setup.py without torch stops with one line saying what to run; every declared runtime dependency is
imported by the package; the Python floor covers what the code uses (tomllib)."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def _imported_top_level_modules(*packages: str) -> set[str]:
    names: set[str] = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def test_setup_without_torch_exits_with_one_line_naming_the_install_commands() -> None:
    blocked_torch = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", blocked_torch], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "torch" in lines[0] and "pip install --no-build-isolation -e ." in lines[0]


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    imported = _imported_top_level_modules("engine", "sif_kernels")
    module_to_dists = importlib.metadata.packages_distributions()
    imported_dists = {_normalise(d) for module in imported for d in module_to_dists.get(module, [])}
    installed = {_normalise(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    declared = [_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]]
    unused = [d for d in declared if d in installed and d not in imported_dists]
    assert unused == [], f"declared in pyproject.toml but imported by neither engine/ nor sif_kernels/: {unused}"


def test_python_floor_covers_tomllib_and_matches_ruff_target() -> None:
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"  # engine.config reads TOML with tomllib (3.11+)
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


def test_readme_extras_exist() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    readme = (ROOT / "README.md").read_text()
    for extra in re.findall(r'-e "\.\[([a-z,]+)\]"', readme):
        assert set(extra.split(",")) <= extras.keys(), extra


def test_no_top_level_package_of_ours_shadows_another_installed_distribution() -> None:
    """Our import names are ours alone: a top-level package named like another distribution's (``kernels``, which
    transformers depends on) makes whichever comes first on sys.path win, and the other's importers break."""
    ours = sorted({name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]})
    assert all((ROOT / name / "__init__.py").is_file() for name in ours), ours
    owners = importlib.metadata.packages_distributions()
    clashes = {name: owners[name] for name in ours if set(map(_normalise, owners.get(name, []))) - {"sif-engine"}}
    assert clashes == {}, f"these import names are also installed by other distributions: {clashes}"
