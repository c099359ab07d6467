"""The layer rules, checked on the source: what each package may import.

- ``heft_core`` (the engine) imports no UI and no SQL: no gradio, sqlmodel, sqlalchemy, sqlite3,
  ``storage`` or ``app``.
- ``storage`` imports no torch stack, no UI and no engine: no torch, transformers, peft, pyreft,
  gradio, ``heft_core`` or ``app``.
- ``heft_common`` imports the standard library only.
- The plain modules of the app (forms, presentation, service, recording, logs) import no gradio,
  so they stay unit-testable without a UI.

Imports are read with ``ast`` from every module, function-level and ``TYPE_CHECKING`` imports
included, and followed through the project's own modules, so a rule also fails when a module
reaches a forbidden package through another project module.
"""
from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("app", "heft_core", "storage", "heft_common", "bench", "tests")
PLAIN_APP_MODULES = ("app.forms", "app.present", "app.service", "app.recording", "app.logs")


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules: dict[str, Path] = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def imported_names(tree: ast.AST, module: str, is_package: bool = False) -> set[str]:
    """Absolute dotted names a module's source imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


@cache
def direct_imports(module: str) -> frozenset[str]:
    path = MODULES[module]
    return frozenset(imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"))


def _project_module(name: str) -> str | None:
    """The project module a dotted import name refers to (``heft_core.config.RunConfig`` -> ``heft_core.config``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def reachable_imports(module: str) -> dict[str, list[str]]:
    """Every name imported by ``module`` or by project modules it imports, with the chain that imports it."""
    chains: dict[str, list[str]] = {}
    seen = {module}
    queue = [(module, [module])]
    while queue:
        current, chain = queue.pop(0)
        for name in sorted(direct_imports(current)):
            chains.setdefault(name, chain)
            target = _project_module(name)
            if target is not None and target not in seen:
                seen.add(target)
                queue.append((target, chain + [target]))
    return chains


def violations(module: str, forbidden: tuple[str, ...]) -> list[str]:
    """Each forbidden top-level package ``module`` reaches, with the chain of project modules."""
    return sorted(
        f"{' -> '.join(chain)} imports {name}"
        for name, chain in reachable_imports(module).items()
        if name.split(".")[0] in forbidden
    )


def modules_of(package: str) -> list[str]:
    return [name for name in MODULES if name == package or name.startswith(package + ".")]


# --------------------------------------------------------------------------- the checker itself


def test_the_checker_reads_every_import_form():
    source = (
        "import gradio as gr\n"
        "import os.path\n"
        "from storage.db import open_db\n"
        "from . import sibling\n"
        "from .other import thing\n"
        "def later():\n"
        "    import torch\n"
        "if False:\n"
        "    from transformers import AutoModel\n"
    )
    names = imported_names(ast.parse(source), "heft_core.example")
    assert {"gradio", "os.path", "storage.db", "storage.db.open_db", "heft_core", "heft_core.sibling",
            "heft_core.other", "heft_core.other.thing", "torch", "transformers"} <= names
    from_package = imported_names(ast.parse("from .config import RunConfig"), "heft_core", is_package=True)
    assert "heft_core.config" in from_package


def test_the_checker_follows_project_imports():
    # heft_core.train does not import yaml itself; heft_core.config, which it imports, does.
    assert "yaml" not in direct_imports("heft_core.train")
    chains = reachable_imports("heft_core.train")
    assert chains["yaml"][0] == "heft_core.train" and len(chains["yaml"]) > 1
    assert violations("heft_core.train", ("yaml",)) == [f"{' -> '.join(chains['yaml'])} imports yaml"]


def test_every_package_is_seen():
    for package, at_least in (("heft_core", 10), ("storage", 3), ("heft_common", 3), ("app", 3)):
        assert len(modules_of(package)) >= at_least, package


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("module", modules_of("heft_core"))
def test_engine_imports_no_ui_no_sql_no_storage_no_app(module):
    assert violations(module, ("gradio", "sqlmodel", "sqlalchemy", "sqlite3", "storage", "app")) == []


@pytest.mark.parametrize("module", modules_of("storage"))
def test_storage_imports_no_torch_stack_no_ui_no_engine(module):
    assert violations(module, ("torch", "transformers", "peft", "pyreft", "gradio", "heft_core", "app")) == []


@pytest.mark.parametrize("module", modules_of("heft_common"))
def test_heft_common_imports_only_the_standard_library(module):
    outside = sorted(
        name for name in reachable_imports(module)
        if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "heft_common"
    )
    assert outside == []


@pytest.mark.parametrize("module", [m for m in PLAIN_APP_MODULES if m in MODULES])
def test_plain_app_modules_import_no_gradio(module):
    assert violations(module, ("gradio",)) == []
