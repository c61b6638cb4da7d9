"""The alert rules: valid for promtool, unit-tested with promtool, linked to runbooks, on real metric names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from service.core.model import DlqReason

from ..conftest import require_tool
from . import (
    ALERTS,
    ALERTS_TEST,
    KUBE_STATE_METRICS,
    PROMETHEUS_YML,
    ROOT,
    RUNBOOK_BASE,
    alert_rules,
    exported_metric_names,
    kube_metric_names_in,
    load_yaml,
    metric_names_in,
)

RUNBOOK_ANCHORS = {
    "runbook-consumer-lag",
    "runbook-consumer-stalled",
    "runbook-tiktok-errors",
    "runbook-auth",
    "runbook-dlq-rate",
    "runbook-no-uploads",
    "runbook-dead-letter-write-failures",
    "runbook-dlq-guard",
    "runbook-audience-too-small",
    "runbook-audience-invalid",
    "runbook-audience-expiring",
    "runbook-quota",
    "runbook-refresh-overdue",
    "runbook-offline-errors",
    "runbook-file-updates-refused",
    "runbook-file-audience-waiting",
} | {f"runbook-{r.value}" for r in DlqReason}

PER_REASON_ANCHOR = "runbook-{{ $labels.reason }}"


def promtool() -> str:
    return require_tool("promtool", "install Debian's `prometheus` package (apt-get install -y prometheus)")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules() -> None:
    res = run_promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout


def test_promtool_unit_tests_pass() -> None:
    res = run_promtool("test", "rules", str(ALERTS_TEST))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_config(tmp_path: Path) -> None:
    """prometheus.yml is valid once its rule file path (a container path) points at the repo's alerts.yml."""
    conf = load_yaml(PROMETHEUS_YML)
    assert [Path(p).name for p in conf["rule_files"]] == [ALERTS.name]
    conf["rule_files"] = [str(ALERTS)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(conf))
    res = run_promtool("check", "config", str(local))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_severity_summary_and_a_runbook_in_the_readme() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "alert names are unique"
    used: set[str] = set()
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        url = ann["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), f"{name}: {url}"
        anchor = url.removeprefix(RUNBOOK_BASE)
        if anchor == PER_REASON_ANCHOR:
            assert "reason" in rule["expr"], f"{name} links per reason, so it must keep the reason label"
            used |= {f"runbook-{r.value}" for r in DlqReason}
        else:
            assert anchor in RUNBOOK_ANCHORS, f"{name}: unknown runbook anchor {anchor}"
            used.add(anchor)
    assert used == RUNBOOK_ANCHORS, f"runbook sections no alert links to: {sorted(RUNBOOK_ANCHORS - used)}"


def test_the_readme_has_every_runbook_section() -> None:
    readme = ROOT / "README.md"
    if not readme.is_file() or "runbook-" not in readme.read_text(encoding="utf-8"):
        pytest.skip("README.md has no runbook sections yet (anchors checked once it has)")
    text = readme.read_text(encoding="utf-8")
    anchors = set(re.findall(r'(?:id|name)="([^"]+)"', text))
    for line in text.splitlines():  # GitHub's heading slugs
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    missing = sorted(RUNBOOK_ANCHORS - anchors)
    assert not missing, f"README.md lacks runbook anchors: {missing}"


def test_alert_expressions_use_only_exported_metrics() -> None:
    """The service's own metrics, or (where the service serves none: a scheduled CLI run) kube-state-metrics'."""
    exported = exported_metric_names()
    for rule in alert_rules():
        used = metric_names_in(rule["expr"])
        kube = kube_metric_names_in(rule["expr"])
        assert used or kube, f"{rule['alert']} uses none of the service's metrics"
        assert used <= exported, f"{rule['alert']}: unknown metrics {sorted(used - exported)}"
        assert kube <= KUBE_STATE_METRICS, (
            f"{rule['alert']}: unknown kube-state-metrics {sorted(kube - KUBE_STATE_METRICS)}"
        )


def test_refresh_alert_watches_only_the_refresh_cronjobs() -> None:
    """Every kube-state-metrics selector of the refresh alert names the refresh CronJobs (another team's failing
    CronJob must not page us), and the CronJob manifest's name matches that selector."""
    import re as regex

    from . import K8S, load_yaml_all

    (rule,) = [r for r in alert_rules() if r["alert"] == "AudienceSyncRefreshOverdue"]
    selectors = regex.findall(r"(kube_[a-z_]+)(\{[^}]*\})?", rule["expr"])
    outer = [(name, sel) for name, sel in selectors if sel]
    assert {name for name, _ in outer} == KUBE_STATE_METRICS, outer
    (pattern,) = {sel for _, sel in outer}
    cronjobs = [d for d in load_yaml_all(K8S / "refresh-cronjob.yaml") if d["kind"] == "CronJob"]
    assert cronjobs
    wanted = regex.fullmatch(r'\{cronjob=~"(.+)"\}', pattern)
    assert wanted is not None, pattern
    for cj in cronjobs:
        assert regex.fullmatch(wanted.group(1), cj["metadata"]["name"]), cj["metadata"]["name"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts without a test that fires them"
    assert names - quiet == set(), "alerts without a test where they stay quiet"
    assert (fires | quiet) <= names, "tests name alerts that do not exist"
