"""The monitoring profile, checked without Prometheus or Grafana: alert rules and the dashboard.

promtool is not available here, so the rule file and the dashboard are read as data: their
structure is checked, and every metric their PromQL names must be one that an rnnserve server
exports (read from a live MetricsObserver registry), so a renamed metric fails here rather than
leaving an alert that can never fire or a panel that stays empty.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from serving.ops.metrics import MetricsObserver
from serving.ops.runtime_metrics import register_runtime_metrics
from tests.support.deploy import COMPOSE_FILE, PROMETHEUS_CONFIG, REPO_ROOT

RULES_FILE = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "rnnserve.json"
DATASOURCES_FILE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_FILE = GRAFANA / "provisioning" / "dashboards" / "rnnserve.yml"
DEPLOYMENT_DOC = REPO_ROOT / "docs" / "deployment.md"

# Series that Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# The standard gRPC server metrics (the names go-grpc-prometheus and the Grafana gRPC dashboards
# use) and their labels, which the rules and the dashboard rely on.
GRPC_SERIES = {
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
    "grpc_server_handling_seconds_count",
    "grpc_server_handling_seconds_sum",
}
GRPC_LABELS = {"grpc_service", "grpc_method", "grpc_code", "grpc_type"}
SEVERITIES = {"critical", "warning"}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}


def exported_series() -> set[str]:
    """Every series name a server's /metrics can carry: families expanded to their samples."""
    observer = MetricsObserver()
    observer.state_store_availability(True)  # registered on first use, as on a server with Redis
    idle_runtime = SimpleNamespace(registry=SimpleNamespace(all_loaded=list), draining=False, sessions={})
    register_runtime_metrics(observer.registry, idle_runtime)  # type: ignore[arg-type]
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
    }
    names = set()
    for family in observer.registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def promql_series(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a reader good enough for our rules)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings may hold anything
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(match.group(0))
    return names


def promql_labels(expr: str, series: str) -> set[str]:
    """Label names matched on SERIES, or used in by/without/on clauses anywhere in EXPR."""
    labels = set()
    for matchers in re.findall(rf"\b{re.escape(series)}\{{([^}}]*)\}}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    return labels - {"le", "instance", "job", "service"}


def assert_known_series(expr: str, where: str, known: set[str]) -> None:
    used = promql_series(expr)
    assert used, f"{where}: {expr!r} selects no metric"
    unknown = used - known - PROMETHEUS_SERIES
    assert not unknown, f"{where}: {sorted(unknown)} are not exported by rnnserve (serving/ops/metrics.py)"
    for series in used & GRPC_SERIES:
        extra = {label for label in promql_labels(expr, series) if label.startswith("grpc_")} - GRPC_LABELS
        assert not extra, f"{where}: {series} has no labels {sorted(extra)}"


@pytest.fixture(scope="module")
def known_series() -> set[str]:
    return exported_series()


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    config = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in config["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    ("expr", "series"),
    [
        ('sum by (c) (rate(grpc_server_handled_total{c!="OK"}[5m]))', {"grpc_server_handled_total"}),
        ("time() - rnnserve_snapshot_seconds", {"rnnserve_snapshot_seconds"}),
        ("a / clamp_min(b, 1e-9) > 0.01", {"a", "b"}),
        ("histogram_quantile(0.99, sum by (le) (rate(x_bucket[$__rate_interval])))", {"x_bucket"}),
        ('up{job="a-b c"} == 0 and on (instance) y', {"up", "y"}),
    ],
)
def test_promql_reader(expr: str, series: set[str]) -> None:
    assert promql_series(expr) == series


def test_the_reader_knows_real_metrics_from_made_up_ones(known_series: set[str]) -> None:
    assert {"rnnserve_queue_depth", "rnnserve_batch_size_bucket", "rnnserve_tokens_in_total"} <= known_series
    assert known_series >= GRPC_SERIES
    with pytest.raises(AssertionError, match="grpc_requests_total"):
        assert_known_series("rate(grpc_requests_total[5m])", "made up", known_series)
    with pytest.raises(AssertionError, match="grpc_status"):
        assert_known_series('grpc_server_handled_total{grpc_status="OK"}', "made up", known_series)


def test_prometheus_loads_the_rule_file_that_compose_mounts() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    mounted = {
        volume.split(":")[1]: volume.split(":")[0] for volume in compose["services"]["prometheus"]["volumes"]
    }
    for path in config["rule_files"]:
        assert path in mounted, f"prometheus.yml loads {path}, which compose does not mount"
        assert (REPO_ROOT / mounted[path]).resolve() == RULES_FILE


def test_alert_rules_are_complete_and_use_exported_metrics(
    rules: list[dict[str, Any]], known_series: set[str]
) -> None:
    assert rules
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), f"alert names repeat: {names}"
    for rule in rules:
        name = rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name}: for: {rule['for']!r}"
        assert_known_series(rule["expr"], f"alert {name}", known_series)


def test_the_deployment_guide_explains_every_alert(rules: list[dict[str, Any]]) -> None:
    guide = DEPLOYMENT_DOC.read_text()
    missing = [rule["alert"] for rule in rules if f"`{rule['alert']}`" not in guide]
    assert not missing, f"docs/deployment.md does not explain {missing}"


def test_grafana_provisions_the_dashboard_and_the_data_source() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    mounted = {volume.split(":")[1]: Path(volume.split(":")[0]) for volume in grafana["volumes"]}
    assert (REPO_ROOT / mounted["/etc/grafana/provisioning/datasources/prometheus.yml"]).resolve() == (
        DATASOURCES_FILE
    )
    assert (REPO_ROOT / mounted["/etc/grafana/provisioning/dashboards/rnnserve.yml"]).resolve() == (
        DASHBOARD_PROVIDER_FILE
    )
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDER_FILE.read_text())["providers"]
    dashboards = [target for target in mounted if target.startswith(provider["options"]["path"] + "/")]
    assert [(REPO_ROOT / mounted[target]).resolve() for target in dashboards] == [DASHBOARD_FILE]
    (source,) = yaml.safe_load(DATASOURCES_FILE.read_text())["datasources"]
    assert source["type"] == "prometheus"
    port = int(compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1])
    assert source["url"] == f"http://prometheus:{port}"


def test_dashboard_panels_query_exported_metrics(known_series: set[str]) -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    (source,) = yaml.safe_load(DATASOURCES_FILE.read_text())["datasources"]
    assert dashboard["uid"] == "rnnserve" and dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    queried = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the dashboard"
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == panel["datasource"]["uid"] == source["uid"]
            assert_known_series(target["expr"], f"panel {panel['title']!r}", known_series)
            queried |= promql_series(target["expr"])
    # The headline signals all have a panel.
    assert {
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "rnnserve_sessions_active",
        "rnnserve_queue_depth",
        "rnnserve_batch_size_sum",
    } <= queried
