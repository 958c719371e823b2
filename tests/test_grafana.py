"""The shipped Grafana dashboard queries only metrics the code exports, under the names Ray gives them."""
import ast
import json
import re
from pathlib import Path

from common.metrics import METRICS

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "unmask_dashboard.json"
# Labels Ray 2.60 puts on every application metric (seen on a node's /metrics), plus the histogram bucket.
RAY_LABELS = {"SessionName", "NodeAddress", "WorkerId", "Component", "Version", "instance", "job", "le"}


def defined_metrics() -> dict[str, tuple[str, set[str]]]:
    """{unmask metric name: (kind, tag keys)} from the code: ``common.metrics.METRICS`` and every
    ``ray.util.metrics.Gauge/Counter/Histogram("unmask_...")`` construction in the packages."""
    found = {f"unmask_{name}": (kind, set(tags)) for name, (kind, _, tags) in METRICS.items()}
    for package in ("common", "rollout", "learner", "driver"):
        for file in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("Gauge", "Counter", "Histogram") and node.args
                        and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("unmask_")):
                    continue
                tags = next((kw.value for kw in node.keywords if kw.arg == "tag_keys"), None)
                if tags is None and len(node.args) > 3:  # Histogram(name, description, boundaries, tag_keys)
                    tags = node.args[3]
                keys = {e.value for e in tags.elts} if isinstance(tags, ast.Tuple) else set()
                name = node.args[0].value
                kind = node.func.attr.lower()
                found[name] = (kind, found.get(name, (kind, set()))[1] | keys)
    return found


def prometheus_names(metrics: dict[str, tuple[str, set[str]]]) -> dict[str, set[str]]:
    """What Ray's Prometheus export calls each series (measured on Ray 2.60: counters get ``_total``,
    histograms ``_bucket`` / ``_sum`` / ``_count``), with the labels it may carry."""
    suffixes = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {f"ray_{name}{suffix}": tags | RAY_LABELS for name, (kind, tags) in metrics.items()
            for suffix in suffixes[kind]}


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def test_the_code_defines_the_metrics_the_parser_reads():
    metrics = defined_metrics()
    assert metrics["unmask_rollout_tokens_per_s"] == ("gauge", {"worker"})
    assert metrics["unmask_queue_producer_wait_s"] == ("histogram", {"queue"})
    assert metrics["unmask_queue_admitted"][0] == "counter"


def test_every_metric_the_dashboard_queries_is_one_we_export():
    exported = prometheus_names(defined_metrics())
    referenced = set()
    for expr in expressions():
        names = set(re.findall(r"\bray_unmask_\w+", expr))
        assert names, f"panel query without an unmask metric: {expr}"
        unknown = names - set(exported)
        assert not unknown, f"{sorted(unknown)} in {expr!r} are not exported (exported: {sorted(exported)})"
        labels = set(re.findall(r"by \(([^)]*)\)", expr)) | set(re.findall(r"[{,]\s*(\w+)\s*=~?", expr))
        labels = {label.strip() for group in labels for label in group.split(",")}
        allowed = set.union(*(exported[name] for name in names))
        assert labels <= allowed, f"{expr!r} uses labels {sorted(labels - allowed)} its metrics do not carry"
        referenced |= names
    # What the dashboard is for: each of these has a panel.
    for name in ("rollout_tokens_per_s", "queue_depth", "staleness", "learner_step_seconds_bucket", "reward",
                 "accuracy", "eval_accuracy", "weight_sync_seconds"):
        assert f"ray_unmask_{name}" in referenced, name


def test_tokens_per_second_has_a_series_per_worker():
    per_worker = [e for e in expressions() if "ray_unmask_rollout_tokens_per_s" in e and "by (worker)" in e]
    assert per_worker


def test_dashboard_uses_a_datasource_variable_not_a_fixed_uid():
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {"${datasource}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_name_the_readme_gives_is_one_we_export():
    """README's Monitoring section names metrics as a user greps them in the export (braces expand)."""
    text = (REPO / "README.md").read_text()
    named = set()
    for match in re.finditer(r"ray_unmask_[a-z_]*(?:\{[a-z_,]+\}[a-z_]*)*", text):
        names = [""]
        for literal, group in re.findall(r"([a-z_]*)(?:\{([a-z_,]+)\})?", match.group(0)):
            names = [n + literal + (alt if group else "") for n in names for alt in (group.split(",") if group else [""])]
        named |= set(names)
    exported = prometheus_names(defined_metrics())
    assert len(named) >= 15 and not named - set(exported), sorted(named - set(exported))
