"""pyproject.toml declares the runtime dependencies (lower-bounded), requirements.txt pins the set the suite
runs on: every pin must satisfy the declared range, and each list must name the same packages. The tests
import only pinned packages and never skip on a missing one (CI installs everything: a missing install fails)."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import tomllib
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def declared(pyproject: dict) -> dict[str, Requirement]:
    """Package -> requirement of ``[project] dependencies`` and every optional extra (self-references out)."""
    project = pyproject["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        requirements += [Requirement(r) for r in extra]
    own = canonicalize_name(project["name"])
    return {canonicalize_name(r.name): r for r in requirements if canonicalize_name(r.name) != own}


def pinned(text: str) -> dict[str, Requirement]:
    """Package -> ``name==version`` line of a requirements file."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {canonicalize_name(r.name): r for r in (Requirement(line) for line in lines if line)}


def mismatches(declared_: dict[str, Requirement], pinned_: dict[str, Requirement]) -> list[str]:
    """What disagrees between the declared ranges and the pins ([] when they agree)."""
    problems = [f"{name}: declared in pyproject.toml, not pinned in requirements.txt"
                for name in sorted(set(declared_) - set(pinned_))]
    problems += [f"{name}: pinned in requirements.txt, not declared in pyproject.toml"
                 for name in sorted(set(pinned_) - set(declared_))]
    for name in sorted(set(declared_) & set(pinned_)):
        want, pin = declared_[name], pinned_[name]
        (version,) = [spec.version for spec in pin.specifier if spec.operator == "=="] or [None]
        if version is None:
            problems.append(f"{name}: requirements.txt must pin an exact version (==), has {pin}")
        elif not want.specifier.contains(version, prereleases=True):
            problems.append(f"{name}: pin {version} is outside the declared {want.specifier}")
        elif not any(spec.operator in (">=", "~=", "==") for spec in want.specifier):
            problems.append(f"{name}: pyproject.toml must give a lower bound, has {want.specifier or 'none'}")
        if set(want.extras) != set(pin.extras):
            problems.append(f"{name}: extras {sorted(want.extras)} declared, {sorted(pin.extras)} pinned")
    return problems


def test_pyproject_declares_what_requirements_pins():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    problems = mismatches(declared(pyproject), pinned((REPO_ROOT / "requirements.txt").read_text()))
    assert not problems, "\n".join(problems)
    assert pyproject["project"]["dependencies"], "runtime dependencies must be declared"


def test_disagreements_are_caught():
    """Negative control: a pin outside the range, a missing pin, an unbounded declaration, a lost extra."""
    want = {"numpy": Requirement("numpy>=1.26.4,<2"), "torch": Requirement("torch"),
            "tritonclient": Requirement("tritonclient[all]>=2.51.0"), "scipy": Requirement("scipy>=1.0")}
    pins = {"numpy": Requirement("numpy==2.0.0"), "torch": Requirement("torch==2.13.0"),
            "tritonclient": Requirement("tritonclient==2.51.0"), "pandas": Requirement("pandas==2.3.3")}
    problems = mismatches(want, pins)
    assert any(p.startswith("numpy: pin 2.0.0 is outside") for p in problems)
    assert any(p.startswith("torch: pyproject.toml must give a lower bound") for p in problems)
    assert any(p.startswith("tritonclient: extras") for p in problems)
    assert any(p.startswith("scipy: declared in pyproject.toml, not pinned") for p in problems)
    assert any(p.startswith("pandas: pinned in requirements.txt, not declared") for p in problems)


#: test helpers that run under $GFTRITON_HELICAL_PYTHON (the helical venv, `make helical-venv`), not this venv
HELICAL_VENV_FILES = {"helical_reference.py", "upstream_isp_driver.py", "upstream_stats_driver.py"}
#: imported only where present, and the test checks both cases (TensorRT: GPU hosts, tests/test_deploy.py)
OPTIONAL_MODULES = {"tensorrt"}
SKIP_ON_IMPORT = "import" + "orskip"  # spelled in two halves so this file does not match itself


def import_problems(files: list[Path], pins: dict[str, Requirement]) -> list[str]:
    """What the test files import that is neither standard library, first party, a test helper nor a pinned
    distribution, and every skip-on-missing-import ([] when clean)."""
    local = {f.stem for f in files} | {"conftest", "geneformer_triton"}
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for file in files:
        source = file.read_text()
        if SKIP_ON_IMPORT in source:
            problems.append(f"{file.name}: pytest.{SKIP_ON_IMPORT} hides a missing install; import the package")
        modules = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
        for module in sorted(modules - local - OPTIONAL_MODULES - set(sys.stdlib_module_names)):
            owners = {canonicalize_name(d) for d in distributions.get(module, [])}
            if not owners & set(pins):
                problems.append(f"{file.name}: imports {module} (distribution {sorted(owners) or 'not installed'}), "
                                "which requirements.txt does not pin")
    return problems


def test_tests_import_only_pinned_packages_and_never_skip_on_a_missing_one():
    files = [f for f in sorted((REPO_ROOT / "tests").glob("*.py")) if f.name not in HELICAL_VENV_FILES]
    problems = import_problems(files, pinned((REPO_ROOT / "requirements.txt").read_text()))
    assert not problems, "\n".join(problems)


def test_unpinned_imports_and_skips_are_caught(tmp_path):
    """Negative control: an unpinned import (numpy with an empty pin list), an unknown module, a skip."""
    case = tmp_path / "test_case.py"
    case.write_text(f"import numpy\nimport no_such_module_here\nimport pytest\nx = pytest.{SKIP_ON_IMPORT}('pandas')\n")
    problems = import_problems([case], {"pytest": Requirement("pytest==9.2.0")})
    assert any("imports numpy" in p for p in problems), problems
    assert any("imports no_such_module_here (distribution not installed)" in p for p in problems), problems
    assert any(f"pytest.{SKIP_ON_IMPORT} hides" in p for p in problems), problems
    assert not any("imports pytest" in p for p in problems), problems
