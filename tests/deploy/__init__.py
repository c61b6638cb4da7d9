"""Checks of deploy/: manifests, alert rules and a real Prometheus scraping the service.

Shared helpers live here so the three test modules agree on paths, binaries and metric names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "audience-sync.json"

# The README sections the alerts link to (runbook_url anchors), one per alert plus one per dead-letter reason.
RUNBOOK_BASE = "https://github.com/OWNER/tiktok-audience-sync/blob/main/README.md#"

_METRIC_RE = re.compile(r"\baudience_sync_[a-zA-Z0-9_]+\b")
_KUBE_METRIC_RE = re.compile(r"\bkube_[a-zA-Z0-9_]+\b")

# Series of other exporters an alert may use where the service has none: kube-state-metrics' CronJob metrics for
# the scheduled `refresh` (a CLI run serves no /metrics). Names as kube-state-metrics v2 exports them.
KUBE_STATE_METRICS = frozenset(
    {
        "kube_cronjob_status_last_successful_time",
        "kube_cronjob_status_last_schedule_time",
        "kube_cronjob_next_schedule_time",
        "kube_cronjob_created",
    }
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def exported_metric_names() -> set[str]:
    """Every series name service/metrics.py's REGISTRY can expose, with the suffixes prometheus_client adds."""
    from service.metrics import REGISTRY

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(s.name for s in family.samples)
    return names


def pushed_metric_names() -> set[str]:
    """The series `audience-sync refresh` pushes to a Pushgateway (service/metrics.py REFRESH_REGISTRY): no scrape of
    the service shows them, a Prometheus scraping the Pushgateway does (README "Refresh runs (Pushgateway)")."""
    from service.metrics import REFRESH_REGISTRY

    return {family.name for family in REFRESH_REGISTRY.collect()}


def metric_names_in(expr: str) -> set[str]:
    """The project's metric names a PromQL expression mentions."""
    return set(_METRIC_RE.findall(expr))


def kube_metric_names_in(expr: str) -> set[str]:
    """The kube-state-metrics names a PromQL expression mentions."""
    return set(_KUBE_METRIC_RE.findall(expr))


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(ALERTS)
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
