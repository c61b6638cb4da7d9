"""Live mappings reload: unit level with real files, and in the running service over the real broker."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from service import metrics as m
from service.core.dead_letters import header_value
from service.core.mappings import Mappings
from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID, SampleAudience, make_users, segment_event
from service.devtools.sandbox import SandboxThread
from service.pipeline.mappings_watch import MappingsWatcher
from tests.conftest import ServiceProcess, Topics, produce, read_all, wait_until

GOOD = """audiences:
  vip:
    advertiser_id: "7000000000000000001"
    audience_id: "1100000009"
"""


def _reloads(outcome: str) -> float:
    return m.REGISTRY.get_sample_value("audience_sync_mappings_reloads_total", {"outcome": outcome}) or 0.0


def test_valid_file_is_applied_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "mappings.yaml"
    path.write_text("audiences: {}\n")
    applied: list[Mappings] = []
    watcher = MappingsWatcher(path, applied.append)
    before = _reloads("applied")
    path.write_text(GOOD)
    assert watcher.reload("test") is True
    assert applied[-1].get("vip") is not None
    assert _reloads("applied") == before + 1


def test_invalid_file_is_rejected_and_old_mappings_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mappings.yaml"
    path.write_text(GOOD)
    applied: list[Mappings] = []
    watcher = MappingsWatcher(path, applied.append)
    before = _reloads("rejected")
    path.write_text("audiences:\n  vip:\n    advertiser_id: not-a-number\n    audience_id: '1'\n")
    assert watcher.reload("test") is False
    assert applied == []
    assert _reloads("rejected") == before + 1
    assert any("rejected" in r.message and "vip" in r.message for r in caplog.records)


async def test_file_change_is_noticed_by_polling(tmp_path: Path) -> None:
    path = tmp_path / "mappings.yaml"
    path.write_text("audiences: {}\n")
    applied: list[Mappings] = []
    watcher = MappingsWatcher(path, applied.append, interval_s=0.05)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.1)
        assert applied == []
        path.write_text(GOOD)
        os.utime(path, (1, 1))  # a distinct mtime even on coarse-grained filesystems
        for _ in range(100):
            if applied:
                break
            await asyncio.sleep(0.05)
        assert applied and applied[-1].get("vip") is not None
    finally:
        task.cancel()


@pytest.mark.integration
def test_running_service_picks_up_a_fixed_mapping_without_restart(
    broker: LocalBroker,
    topics: Topics,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
) -> None:
    path = tmp_path / "mappings.yaml"
    path.write_text("audiences: {}\n")
    vip = SampleAudience("vip", "1100000009")
    with SandboxThread(
        host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=[(ADVERTISER_ID, "1100000009")]
    ) as sb:
        svc = services(service_env(sb.url, MAPPINGS_FILE=str(path)))
        wait_until(lambda: svc.http_status("/readyz") == 200, 30, "service ready")
        users = make_users(20, random.Random(1), "email")
        produce(
            broker,
            topics.source,
            [(u.user_id.encode(), orjson.dumps(segment_event(u, vip, True, with_ids=False))) for u in users[:10]],
        )
        letters = read_all(broker, topics.dlq, 10)
        assert len(letters) == 10
        assert {header_value(x.headers(), "dlq.reason") for x in letters} == {"missing_audience_id"}

        path.write_text(GOOD)  # the operator fixes the file: picked up by polling
        wait_until(lambda: svc.metric("audience_sync_mappings_reloads_total", outcome="applied") >= 1, 15, "reload")
        produce(
            broker,
            topics.source,
            [(u.user_id.encode(), orjson.dumps(segment_event(u, vip, True, with_ids=False))) for u in users[10:]],
        )
        wait_until(lambda: len(sb.state.members("1100000009").get("EMAIL_SHA256", [])) == 10, 30, "new events synced")

        path.write_text("audiences: [broken\n")  # a bad edit is refused, the good mappings stay
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: svc.metric("audience_sync_mappings_reloads_total", outcome="rejected") >= 1, 15, "refusal")
        assert svc.metric("audience_sync_mappings_entries") == 1
        assert "keeping the previous mappings" in svc.log()
        assert svc.stop() == 0
