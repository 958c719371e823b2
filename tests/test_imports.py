"""An in-repo import that fails is a failure: no test skips on it or falls back to a local copy."""
import ast
from pathlib import Path

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
