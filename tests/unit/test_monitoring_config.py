"""The checked-in Grafana dashboard and Prometheus alert rules read metrics that exist."""

import json
import re
from pathlib import Path

import yaml

from feedrec.serving.feed_metrics import METRIC_NAMES

MONITORING = Path(__file__).resolve().parents[2] / "apps" / "feed_service" / "monitoring"
# Ray Serve built-ins the config uses; the e2e test scrapes a live cluster for these names.
SERVE_METRICS = {
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_deployment_replica_healthy",
}
DRIFT_METRICS = {"feedrec_drift_psi"}
_NAME = re.compile(r"\b((?:ray_)?(?:feedrec|serve)_[a-z_]+)\b")
_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def _expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs


def used_metric_names() -> set[str]:
    return {m for e in _expressions() for m in _NAME.findall(e)}


def base_name(name: str) -> str:
    """``ray_feedrec_stage_latency_ms_bucket`` -> ``feedrec_stage_latency_ms``."""
    name = name.removeprefix("ray_")
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def test_every_metric_used_is_exported() -> None:
    used = used_metric_names()
    assert len(used) >= 8
    for name in used:
        if name.startswith("ray_serve_"):
            assert name in SERVE_METRICS, name
        elif name.startswith("ray_feedrec_"):
            assert base_name(name) in METRIC_NAMES, name
        else:
            assert name in DRIFT_METRICS, name


def test_every_feedrec_metric_is_on_the_dashboard() -> None:
    dashboard = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    on_dashboard = {
        base_name(m)
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        for m in _NAME.findall(t["expr"])
    }
    assert set(METRIC_NAMES) <= on_dashboard, set(METRIC_NAMES) - on_dashboard


def test_alert_rules_are_well_formed() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in {"page", "ticket"}
            assert rule["annotations"]["summary"]
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            names.add(rule["alert"])
    assert {"FeedLatencyP99High", "FeedFallbackRateHigh", "FeatureDrift"} <= names
