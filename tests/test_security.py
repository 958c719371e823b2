"""Model output is hostile input; weights load without pickles; the local dashboard stays on loopback."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("common", "rollout", "learner", "driver") for p in (REPO / d).rglob("*.py")]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield node, f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def test_no_source_evaluates_strings_as_code():
    offenders = []
    for path in SOURCES:
        for node, name in _calls(ast.parse(path.read_text())):
            if name in {"eval", "exec", "compile"} and isinstance(node.func, ast.Name):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_torch_load_only_with_weights_only_and_no_pickle_modules():
    offenders = []
    for path in SOURCES:
        text = path.read_text()
        if "import pickle" in text or "from pickle" in text:
            offenders.append(f"{path.relative_to(REPO)}: imports pickle")
        for node, name in _calls(ast.parse(text)):
            if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_a_countdown_completion_that_tries_code_gets_zero_and_runs_nothing(tmp_path):
    from common.config import TaskConfig
    from common.tasks import get_task

    marker = tmp_path / "pwned"
    task = get_task(TaskConfig(name="countdown"))
    item = task.eval_items(1)[0]
    attacks = [f"__import__('os').system('touch {marker}')", f"open('{marker}','w')", "9**9**9**9",
               "(" * 10_000 + "1" + ")" * 10_000, "1/0", "\x00" * 100, b"\xff\xfe".decode("utf-8", "replace")]
    for attack in attacks:
        reward = task.reward(attack, item)
        assert not reward.correct and reward.total <= task.reward("1+1", item).total
    assert not marker.exists()


def test_local_ray_dashboard_binds_loopback_only():
    import inspect

    from driver import runtime

    source = inspect.getsource(runtime.connect_ray)
    assert 'dashboard_host="127.0.0.1"' in source
