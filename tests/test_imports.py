"""The engine's modules import each other in one direction: no import circle, even through imports made
inside functions (they hide a circle rather than remove it)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmcompress_core"


def imports_of(path: Path) -> set[str]:
    """Every lmcompress_core module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmcompress_core"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lmcompress_core"))
    return found


def module_graph(folder: Path) -> dict[str, set[str]]:
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in folder.glob("*.py")
             if p.name != "__init__.py"}
    return {name: imports_of(path) & set(files) - {name} for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_runtime_modules_import_in_one_direction():
    graph = module_graph(PACKAGE / "runtime")
    assert graph["lmcompress_core.runtime.bits"] == set()            # the leaf
    assert not circles(graph), circles(graph)


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert not circles({"a": {"b"}, "b": {"c"}, "c": set()})
