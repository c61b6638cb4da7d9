"""The README stays true: every setting and every metric the code defines is documented there."""

from pathlib import Path

from service import metrics as m
from service.config import Settings
from service.model import DlqReason

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_environment_variable_is_in_the_configuration_table() -> None:
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in README]
    assert missing == []


def test_every_metric_is_in_the_metrics_list() -> None:
    names = set()
    for family in m.REGISTRY.collect():
        if family.name.startswith("audience_sync_"):
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            names.add(family.name + suffix)
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert missing == []


def test_every_dead_letter_reason_has_a_runbook_entry() -> None:
    missing = [r.value for r in DlqReason if f'id="runbook-{r.value}"' not in README]
    assert missing == []


def test_quick_start_shows_the_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick and "make test" in quick
