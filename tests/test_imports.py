"""Imports point one way: cli -> validate/train -> (methods, tasks, data, models) -> config/errors.

Every `import` of the package's own modules is read from the source (function-level ones too,
so a lazy import cannot hide a cycle) and checked against the layers below; no module may
import a module of a higher layer, the module graph has no cycle, tasks never import methods,
and nothing outside a method's package names that method's package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peftrun"

# Highest first; a module belongs to the first entry that is it or its package.
LAYERS = [
    ("entry points", ("peftrun.cli", "peftrun.__main__", "peftrun.serve", "peftrun.evaluate", "peftrun.preview")),
    ("run", ("peftrun.validate", "peftrun.train")),
    ("serving", ("peftrun.multitenant", "peftrun.export", "peftrun.generate")),
    ("parts", ("peftrun.methods", "peftrun.tasks", "peftrun.data", "peftrun.models", "peftrun.model_checks", "peftrun.token_cache",
               "peftrun.distributed", "peftrun.loss", "peftrun.packing", "peftrun.host_memory")),
    ("foundations", ("peftrun.config", "peftrun.errors", "peftrun")),
]
# Every package under peftrun/methods/ but common/ is a method.
METHOD_PACKAGES = sorted(p.parent.name for p in (PACKAGE / "methods").glob("*/__init__.py") if p.parent.name != "common")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or (p != "peftrun" and module.startswith(p + ".")) for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: give it one")


def own_imports(path: Path, name: str | None = None) -> set[str]:
    """The peftrun modules `path` (module `name`) imports, resolved to existing modules (a
    `from X import name` counts as X.name where that is a module, else X)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if exists(f"{stem}.{a.name}") else stem for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "peftrun" or t.startswith("peftrun."))
    return {t if exists(t) else t.rpartition(".")[0] for t in found} - {name}


def exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): own_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, imports in graph().items():
        for target in imports:
            if layer_of(target) < layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_tasks_never_import_methods():
    bad = [f"{m} imports {t}" for m, imports in graph().items() if m.startswith("peftrun.tasks")
           for t in imports if t.startswith("peftrun.methods")]
    assert not bad, "\n".join(bad)


def test_nothing_outside_a_method_names_it():
    """A method is known through the base class and the registry: only its own package (and the
    package that imports every method to register it) reach into it."""
    bad = []
    for module, imports in graph().items():
        for target in imports:
            parts = target.split(".")
            if len(parts) >= 3 and parts[:2] == ["peftrun", "methods"] and parts[2] in METHOD_PACKAGES:
                own = f"peftrun.methods.{parts[2]}"
                # ALoRA is LoRA with gates: it builds on LoRA's package.
                allowed = module == "peftrun.methods" or module.startswith(own) or (
                    parts[2] == "lora" and module.startswith("peftrun.methods.alora"))
                if not allowed:
                    bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """An import inside a function hides a cycle from Python, not from this walk."""
    source = tmp_path / "loop.py"
    source.write_text("from ..loss import label_tokens\n\ndef f():\n    from ..methods.lora import layer\n"
                      "    import peftrun.errors\n")
    assert own_imports(source, "peftrun.train.loop") == {
        "peftrun.loss", "peftrun.methods.lora.layer", "peftrun.errors"}
