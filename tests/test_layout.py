"""The package's layers: imports flow cli → steps → stage packages → engines/models → core.

Read from the source with `ast` (no import runs), so a forbidden import fails here even when it
sits inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pkd"
# hub: the Hub commit and card lines that the cache, the student and the teacher samples share
CORE = {"answers", "config", "console", "errors", "hub", "progress", "records", "store", "fingerprint"}
HEAVY = {"torch", "transformers", "vllm", "openai", "trl", "peft", "accelerate", "datasets"}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out.append((".".join(p for p in parts if p != "__init__"), path))
    return out


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` blocks are not imports
            continue
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "pkd"
    return parts[1] if parts[1] in {"steps", "align", "student", "toy", "cache", "teacher", "models", "engines", "cli"} else "core"


# Which layers each layer may import from (besides itself).
ALLOWED = {
    "core": {"core", "pkd"},
    "cache": {"core", "pkd"},
    "teacher": {"core", "pkd", "models"},
    "models": {"core", "pkd"},
    "engines": {"core", "pkd", "models"},
    "student": {"core", "pkd", "cache", "models"},
    "align": {"core", "pkd", "models", "engines", "teacher"},
    "steps": {"core", "pkd", "cache", "teacher", "models", "engines", "student", "align"},
    "toy": {"core", "pkd", "models", "engines", "teacher", "steps", "cache"},
    "cli": {"core", "pkd", "steps", "cache", "toy", "teacher", "models", "engines", "align", "student"},
    "pkd": {"pkd"},
}


# Recipe validation (pkd.config, the core) applies two stage rules that are plain data and import
# nothing heavy: the split ratios and which LoRA adapters vLLM can serve. Those two modules are the
# only way down into a stage package from the core.
RULES_FOR_CONFIG = {"pkd.teacher.splits", "pkd.models.lora"}


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_imports_flow_one_way(module: str, path: Path) -> None:
    layer = _layer(module)
    for name in _imports(path):
        if not name.startswith("pkd.") or name == "pkd.__version__":
            continue
        if module == "pkd.config" and any(name == r or name.startswith(r + ".") for r in RULES_FOR_CONFIG):
            continue
        target = _layer(name)
        assert target in ALLOWED[layer] | {layer}, f"{module} ({layer}) imports {name} ({target})"
        if layer == "steps" and target == "steps":
            assert name.split(".")[2] == module.split(".")[2], f"step {module} imports step {name}"
        assert not name.startswith("pkd.cli") or layer == "cli", f"{module} imports the CLI"


@pytest.mark.parametrize(
    ("module", "path"),
    [(m, p) for m, p in _modules() if _layer(m) in {"core", "cache"}],
    ids=[m for m, _ in _modules() if _layer(m) in {"core", "cache"}],
)
def test_core_and_cache_import_no_heavy_library_at_module_level(module: str, path: Path) -> None:
    heavy = {n for n in _imports(path, top_level_only=True) if n.split(".")[0] in HEAVY}
    assert not heavy, f"{module} imports {sorted(heavy)} at module level: `pkd cache ...` and --help must start instantly"


def test_no_module_is_left_at_the_package_root_but_the_core() -> None:
    root = {p.stem for p in PKG.glob("*.py")} - {"__init__", "cli"}
    assert root == CORE, f"root modules beyond the shared core: {sorted(root - CORE)}"


def test_every_package_says_which_stage_it_is() -> None:
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(PKG.parent)} has no docstring"
