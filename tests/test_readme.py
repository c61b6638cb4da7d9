"""The README stays true: every setting and every metric the code defines is documented there."""

import re
from pathlib import Path

from service import metrics as m
from service.config import Settings
from service.core.model import DlqReason

from .deploy import RUNBOOK_BASE, alert_rules

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_environment_variable_is_in_the_configuration_table() -> None:
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in README]
    assert missing == []


def test_every_metric_is_in_the_metrics_list() -> None:
    """The service's metrics and those `refresh` pushes to a Pushgateway (README "Refresh runs (Pushgateway)")."""
    names = set()
    for family in [*m.REGISTRY.collect(), *m.REFRESH_REGISTRY.collect()]:
        if family.name.startswith("audience_sync_"):
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            names.add(family.name + suffix)
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert missing == []


def test_every_dead_letter_reason_has_a_runbook_entry() -> None:
    missing = [r.value for r in DlqReason if f'id="runbook-{r.value}"' not in README]
    assert missing == []


def test_every_alert_is_in_the_alerts_table_with_its_runbook_link() -> None:
    section = README.split("\n### Alerts\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and cells:
            rows[cells[0].strip("`")] = line
    rules = {r["alert"]: r for r in alert_rules()}
    assert sorted(rows) == sorted(rules), "the README alerts table lists exactly the alerts of alerts.yml"
    for name, rule in rules.items():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), f"{name}: {url}"
        anchor = url.removeprefix(RUNBOOK_BASE)
        anchors = [f"runbook-{r.value}" for r in DlqReason] if "{{" in anchor else [anchor]
        for a in anchors:
            assert f"(#{a})" in rows[name], f"{name}: its row does not link to #{a}"
            assert f'<a id="{a}"></a>' in README, f"{name}: README has no runbook anchor {a}"


def test_quick_start_shows_the_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick and "make test" in quick


def test_every_repository_path_the_readme_names_exists() -> None:
    """The module map and architecture name real files: a rename that forgets the README fails here."""
    root = Path(__file__).resolve().parent.parent
    named = set(re.findall(r"(?<![\w/.])((?:service|tests|docs|deploy|bench|schemas)/[\w./-]*\w)", README))
    missing = sorted(p for p in named if not (root / p).exists() and not any(ch in p for ch in "*<"))
    assert not missing, f"README names paths that do not exist: {missing}"


def test_the_repository_stands_alone() -> None:
    """Code, tests and docs cite only files in the repository (docs/design.md, docs/tiktok-api.md), never the
    workspace's shared documents."""
    root = Path(__file__).resolve().parent.parent
    outside = re.compile(r"DESIGN\.md|\.\./shared|reference/tiktok-api|sink-anchors|reference §")
    offenders = [
        str(path.relative_to(root))
        for folder in ("service", "tests", "docs", "deploy", "bench")
        for path in (root / folder).rglob("*")
        if path.is_file()
        and path.suffix in {".py", ".md", ".yaml", ".yml", ".json"}
        and path != Path(__file__)
        and outside.search(path.read_text(errors="replace"))
    ]
    assert not offenders, offenders
