"""The Grafana dashboard (cluster/grafana/diffusion-serve.json) is importable and queries only
metrics that exist: the product's own, derived from the constructors in serve_app/metrics.py and
deployments/common/weights_cache.py the way Ray's metrics agent exports them, or Ray Serve
built-ins checked against the installed Ray source. Every product metric has a panel.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import ray

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "cluster" / "grafana" / "diffusion-serve.json"
METRIC_SOURCES = [ROOT / "serve_app" / "metrics.py", ROOT / "deployments" / "common" / "weights_cache.py"]
RAY_SERVE_PRIVATE = Path(ray.__file__).parent / "serve" / "_private"

# Ray Serve built-ins the dashboard uses: exported name -> (file in ray/serve/_private, the name as
# that file's constructor spells it; the HTTP metrics are made per protocol from an f-string).
RAY_SERVE_BUILTINS = {
    "ray_serve_deployment_replica_healthy": ("deployment_state.py", '"serve_deployment_replica_healthy"'),
    "ray_serve_autoscaling_target_replicas": ("deployment_state.py", '"serve_autoscaling_target_replicas"'),
    "ray_serve_replica_processing_queries": ("replica.py", '"serve_replica_processing_queries"'),
    "ray_serve_deployment_processing_latency_ms_bucket": ("replica.py", '"serve_deployment_processing_latency_ms"'),
    "ray_serve_num_deployment_http_error_requests_total": (
        "request_ingress_metrics.py",
        'f"serve_num_deployment_{protocol_name}_error_requests"',
    ),
}

KINDS = {"Counter", "Gauge", "Histogram"}
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
SERVE_LABELS = ("application", "deployment", "replica")
METRIC_NAME = re.compile(r"ray_[a-z0-9_]+")


def defined_metrics(source: Path) -> dict[str, str]:
    """{name: kind} for each "diffusion_serve_..." literal passed to a metric constructor: either
    `metrics.Counter("name", ...)` or the product's `_metric("Counter", "name", ...)`."""
    found = {}
    for call in ast.walk(ast.parse(source.read_text())):
        if not isinstance(call, ast.Call):
            continue
        literals = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        names = [s for s in literals if s.startswith("diffusion_serve_")]
        if not names:
            continue
        func = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        kind = func if func in KINDS else next((s for s in literals if s in KINDS), None)
        assert kind, f"{source.name}: can't tell the kind of {names[0]}"
        found[names[0]] = kind
    return found


def exported(name: str, kind: str) -> set[str]:
    """The series names Ray's metrics agent exports for a metric."""
    return {f"ray_{name}{suffix}" for suffix in SUFFIXES[kind]}


PRODUCT = {source: defined_metrics(source) for source in METRIC_SOURCES}
PRODUCT_NAMES = {e for metrics in PRODUCT.values() for name, kind in metrics.items() for e in exported(name, kind)}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows included, and those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def graphs(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def exprs(dashboard: dict) -> list[str]:
    panels = [t["expr"] for p in graphs(dashboard) for t in p["targets"]]
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return panels + variables


def test_the_sources_define_the_metrics_their_docs_list():
    assert set(PRODUCT[METRIC_SOURCES[0]]) == set(re.findall(r"^\| (diffusion_serve_[a-z_]+) \|", METRIC_SOURCES[0].read_text(), re.M))
    assert PRODUCT[METRIC_SOURCES[0]]["diffusion_serve_requests"] == "Counter"
    assert PRODUCT[METRIC_SOURCES[1]]["diffusion_serve_weights_cache_fetch_seconds"] == "Histogram"
    assert len(PRODUCT[METRIC_SOURCES[1]]) == 5


def test_dashboard_is_an_importable_model_with_datasource_and_label_variables(dashboard):
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("application", "deployment"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert re.fullmatch(rf"label_values\(.+, {name}\)", variables[name]["definition"])
        assert variables[name]["query"]["query"] == variables[name]["definition"]


def test_panels_have_unique_ids_and_titles_and_prometheus_targets(dashboard):
    panels = all_panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    assert len({p["title"] for p in panels}) == len(panels)
    assert {p["title"] for p in panels if p["type"] == "row"} == {"Overview", "Traffic", "Queue", "Models", "Adapters", "Capacity"}
    for panel in graphs(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit") or panel["type"] == "heatmap", panel["title"]


def test_every_metric_a_query_names_is_exported(dashboard):
    used = {name for expr in exprs(dashboard) for name in METRIC_NAME.findall(expr)}
    unknown = used - PRODUCT_NAMES - set(RAY_SERVE_BUILTINS)
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(RAY_SERVE_BUILTINS))
def test_ray_serve_builtins_are_defined_in_the_installed_ray(name):
    file, spelled = RAY_SERVE_BUILTINS[name]
    assert spelled in (RAY_SERVE_PRIVATE / file).read_text(), f"{name}: Ray {ray.__version__} no longer defines {spelled} in {file}"


def test_every_product_metric_has_a_panel(dashboard):
    text = "\n".join(exprs(dashboard))
    used = set(METRIC_NAME.findall(text))
    missing = [name for metrics in PRODUCT.values() for name, kind in metrics.items() if not exported(name, kind) & used]
    assert not missing, f"metrics with no panel: {missing}"


def test_counters_and_histograms_are_queried_as_rates_and_buckets_by_le(dashboard):
    cumulative = re.compile(r"ray_[a-z0-9_]+_(total|bucket|sum|count)\b")
    for expr in exprs(dashboard):
        if expr.startswith("label_values"):
            continue
        for m in cumulative.finditer(expr):
            assert re.search(r"rate\(\s*$", expr[: m.start()]), f"{m.group()} is not inside rate(): {expr}"
        if "_bucket" in expr:
            assert re.search(r"by \([^)]*\ble\b[^)]*\)", expr), f"bucket query not summed by le: {expr}"


def test_weights_cache_queries_filter_by_no_serve_label(dashboard):
    """Weights-cache metrics come from ray.util.metrics, tagged `cache` only: a Serve label in their
    selector would match nothing."""
    cache_names = {e for name, kind in PRODUCT[METRIC_SOURCES[1]].items() for e in exported(name, kind)}
    for expr in exprs(dashboard):
        for m in re.finditer(r"(ray_[a-z0-9_]+)(\{[^}]*\})?", expr):
            if m.group(1) in cache_names and m.group(2):
                assert not any(label in m.group(2) for label in SERVE_LABELS), expr
