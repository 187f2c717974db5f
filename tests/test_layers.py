"""The architecture as a test: the layers of ``src/mamlrun`` and the size of what is in them.

The folder tree is the map a newcomer reads (docs/ARCHITECTURE.md): ``cli/`` on top, then
``training/``, ``results/``, ``algorithms/``, and at the bottom ``models/``, ``data/``,
``config.py`` and ``errors.py``. The map is only true while every import points down, so
these tests read the imports from the source (with ``ast``, including those inside
functions, which a lazy import would otherwise hide) rather than trusting anyone's memory.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mamlrun"

#: Top to bottom. A module may import from its own package and from any layer below it.
LAYERS = ("cli", "training", "results", "algorithms", "bottom")
#: What each top-level entry of ``mamlrun`` is; ``mamlrun`` itself is ``__init__.py`` (the
#: version string).
LAYER_OF = {
    "cli": "cli",
    "training": "training",
    "results": "results",
    "algorithms": "algorithms",
    "models": "bottom",
    "data": "bottom",
    "config": "bottom",
    "errors": "bottom",
    "mamlrun": "bottom",
}
#: The bottom layer's entries stand beside each other: each imports only what is named here.
#: ``config`` turns the ``precision=`` name into a ``models.precision.Precision``.
BESIDE = {
    "models": ("errors",),
    "data": ("errors",),
    "config": ("errors", "models.precision"),
    "errors": (),
    "mamlrun": (),
}
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_ENTRIES = 8  # besides __init__.py


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every mamlrun module ``path`` imports, anywhere in the file.

    ``from a import b`` imports ``a.b`` when that is a module, else ``a``; relative imports are
    resolved against the importing module's package.
    """
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if is_module(full) else base))
    return [(line, name) for line, name in found if name.split(".")[0] == "mamlrun"]


def entry(module: str) -> str:
    """The top-level entry of ``mamlrun`` a module belongs to (``mamlrun`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mamlrun"


def why_not(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None if it may."""
    a, b = entry(importer), entry(imported)
    if a == b:
        return None
    for name in (a, b):
        if name not in LAYER_OF:
            return f"{name} is in no layer: add it to LAYER_OF in tests/test_layers.py"
    if LAYERS.index(LAYER_OF[b]) < LAYERS.index(LAYER_OF[a]):
        return f"{b} is above {a} (layers, top to bottom: {' > '.join(LAYERS)})"
    if LAYER_OF[a] == LAYER_OF[b] == "bottom":
        inside = imported.removeprefix("mamlrun.")
        allowed = BESIDE[a]
        if not any(inside == x or inside.startswith(x + ".") for x in allowed):
            only = ", ".join(allowed) or "nothing of mamlrun"
            return f"{a} stands beside {b} at the bottom and imports only {only}"
    return None


def python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_rule_itself_tells_down_from_up():
    assert why_not("mamlrun.training.trainer", "mamlrun.algorithms.base") is None
    assert why_not("mamlrun.config", "mamlrun.models.precision") is None
    assert why_not("mamlrun.algorithms.maml", "mamlrun.training.episodes") is not None
    assert why_not("mamlrun.config", "mamlrun.models.layers") is not None
    assert why_not("mamlrun.data.sinusoid", "mamlrun.models.mlp") is not None
    assert why_not("mamlrun.models.mlp", "mamlrun.config") is not None


def test_every_import_points_down_the_layers():
    violations = [
        f"{path.relative_to(SRC)}:{line}: {module_name(path)} imports {imported}: {reason}"
        for path in python_files()
        for line, imported in imported_modules(path)
        if (reason := why_not(module_name(path), imported)) is not None
    ]
    assert not violations, "imports that do not point down:\n" + "\n".join(violations)


def test_imports_inside_functions_are_read_too():
    """``cli.main`` imports most of what it runs lazily, inside its functions."""
    imported = {name for _, name in imported_modules(PACKAGE / "cli" / "main.py")}
    assert "mamlrun.training.commands" in imported


def test_no_function_is_longer_than_60_lines():
    long = [
        f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} has "
        f"{node.end_lineno - node.lineno + 1} lines"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_package_has_at_most_8_entries_besides_its_init():
    entries = sorted(
        p.name for p in PACKAGE.iterdir() if p.name not in {"__init__.py", "__pycache__"}
    )
    assert len(entries) <= MAX_TOP_LEVEL_ENTRIES, f"{len(entries)} entries: {', '.join(entries)}"


def test_every_top_level_entry_has_a_layer():
    names = {p.stem for p in PACKAGE.iterdir() if p.name not in {"__init__.py", "__pycache__"}}
    assert names <= LAYER_OF.keys(), f"entries in no layer: {sorted(names - LAYER_OF.keys())}"
