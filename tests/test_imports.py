"""An in-repo import that fails is a failure: no test skips on it or falls back to a local copy."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_REPO = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} | {"tests"}


def _top(name: str) -> str:
    return name.split(".")[0]


def _imported(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            names |= {_top(a.name) for a in sub.names}
        elif isinstance(sub, ast.ImportFrom) and sub.module and not sub.level:
            names.add(_top(sub.module))
    return names


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types)


def test_no_test_skips_or_falls_back_when_an_in_repo_module_fails_to_import():
    assert {"common", "driver", "learner", "rollout"} <= IN_REPO
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant) and _top(node.args[0].value) in IN_REPO):
                found.append(f"{path.name}:{node.lineno} importorskip({node.args[0].value!r})")
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers if h.type):
                local = _imported(ast.Module(body=node.body, type_ignores=[])) & IN_REPO
                if local:
                    found.append(f"{path.name}:{node.lineno} try/except ImportError around {sorted(local)}")
    assert not found, found


# A package's __init__ re-exporting a submodule that imports the package back (lazily): not a cycle between rooms.
_PACKAGE_REEXPORTS = {frozenset({"common.config", "common.config.loader"})}  # load_config builds UnmaskConfig


def _import_graph() -> dict[str, set[str]]:
    """Module -> the in-repo modules it imports, at module level or inside functions (a lazy import that closes
    a cycle still ties the two modules together); ``if TYPE_CHECKING:`` blocks left out."""
    files = {}
    for pkg in ("common", "driver", "learner", "rollout"):
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        deps = set()
        stack = [ast.parse(path.read_text())]
        while stack:
            for node in ast.iter_child_nodes(stack.pop()):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                if isinstance(node, ast.Import):
                    deps |= {resolve(a.name) for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    deps |= {resolve(f"{node.module}.{a.name}") for a in node.names}
                stack.append(node)
        graph[module] = {d for d in deps if d and d != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        reach[start] = seen
    return list({frozenset({m} | {o for o in reach[m] if m in reach[o]}) for m in graph if m in reach[m]})


def test_no_import_cycles_between_in_repo_modules():
    graph = _import_graph()
    assert {"common.tasks.base", "common.tasks.guard", "common.model.io"} <= set(graph)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]  # the check finds one
    cycles = [sorted(c) for c in _cycles(graph) if c not in _PACKAGE_REEXPORTS]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("first,second", [("common.tasks.base", "common.tasks.guard"),
                                          ("common.model.io", "common.model.llada.modeling")])
def test_modules_once_in_a_cycle_import_alone_in_either_order(first, second):
    for order in ((first, second), (second, first)):
        code = "; ".join(f"import {m}" for m in order)
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{code}: {out.stderr.strip().splitlines()[-1:]}"


def test_each_room_imports_only_what_the_layout_allows():
    """common/ imports none of the others; rollout/ and learner/ never import each other (DESIGN.md)."""
    forbidden = {"common": {"rollout", "learner", "driver"}, "rollout": {"learner", "driver"},
                 "learner": {"rollout", "driver"}, "driver": set()}
    wrong = sorted(f"{m} -> {d}" for m, deps in _import_graph().items() for d in deps
                   if d.split(".")[0] in forbidden[m.split(".")[0]])
    assert not wrong, wrong
