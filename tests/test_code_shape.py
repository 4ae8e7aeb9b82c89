"""The code's shape, held: lines a reader can follow, no import circles, the math file torch-only.

STYLE.md asks for code that can be audited line by line; these are its checkable parts.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minigrpo", "recipes", "benchmarks", "examples")
MAX_COLUMNS = 120


def _python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts)


def test_no_line_over_120_columns_and_no_fmt_skip():
    too_wide, skipped = [], []
    for path in _python_files(*PACKAGES):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if len(line) > MAX_COLUMNS:
                too_wide.append(f"{where} ({len(line)})")
            if "fmt: skip" in line:
                skipped.append(where)
    assert not too_wide, "lines over 120 columns:\n" + "\n".join(too_wide)
    assert not skipped, "`# fmt: skip` lines:\n" + "\n".join(skipped)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports, at module level or inside functions (both make a circle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def test_no_import_circle():
    files = {_module_name(p): p for p in _python_files("minigrpo", "recipes")}
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    # a package's __init__ re-exporting its own modules is not a circle through them
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [name, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_grpo_math_imports_only_torch():
    tree = ast.parse((ROOT / "minigrpo" / "grpo.py").read_text(encoding="utf-8"))
    allowed = {"torch", "math", "__future__", "typing", "dataclasses"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
        else:
            continue
        assert roots <= allowed, f"minigrpo/grpo.py imports {roots - allowed}"
