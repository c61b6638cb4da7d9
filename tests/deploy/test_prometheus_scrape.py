"""A real Prometheus (Debian's binary) scrapes a real service and loads the project's alert rules.

The service runs against the real broker (tansu) and the TikTok sandbox, as in tests/integration/test_pipeline.py.
Prometheus uses deploy/prometheus/prometheus.yml with its intervals shortened to 1 s, its target pointed at the
service on 127.0.0.1 and its rule file pointed at deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from service.devtools.broker import LocalBroker, free_port
from service.devtools.sample import ADVERTISER_ID, DEFAULT_AUDIENCES, make_users, segment_event
from service.devtools.sandbox import SandboxThread

from ..conftest import ServiceProcess, Topics, produce, require_tool, wait_until
from . import ALERTS, PROMETHEUS_YML, alert_rules, load_yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

GOOD = 120
BAD = [b"{not json", b"\xff\xfe\xfd", b'{"type": "track", "context": ']


class Prometheus:
    def __init__(self, binary: str, config: Path, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=out,
            )

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=3) as r:
            return json.loads(r.read())

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def value(self, promql: str) -> float:
        """The instant value of a one-series query; -1 while the query has no result."""
        try:
            body = self.get("/api/v1/query", query=promql)
        except OSError:
            return -1.0
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else -1.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture
def prometheus_binary() -> str:
    return require_tool("prometheus", "install Debian's `prometheus` package (apt-get install -y prometheus)")


@pytest.fixture
def sandbox() -> Iterator[SandboxThread]:
    audiences = [(a.advertiser_id, a.audience_id) for a in DEFAULT_AUDIENCES]
    with SandboxThread(host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=audiences) as s:
        yield s


def scrape_config(service_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, pointed at this machine and made fast."""
    conf: dict[str, Any] = load_yaml(PROMETHEUS_YML)
    conf["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    conf["rule_files"] = [str(ALERTS)]
    (job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "audience-sync"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    conf["scrape_configs"] = [job]
    return conf


def good_records() -> list[tuple[bytes, bytes]]:
    """One event per user, so no event supersedes another and every one is uploaded on its own."""
    users = make_users(GOOD, random.Random(7))
    out = []
    for i, user in enumerate(users):
        doc = segment_event(user, DEFAULT_AUDIENCES[i % len(DEFAULT_AUDIENCES)], entered=True)
        out.append((user.user_id.encode(), orjson.dumps(doc)))
    return out


def test_prometheus_scrapes_the_service_and_loads_the_alert_rules(
    prometheus_binary: str,
    tmp_path: Path,
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    started = time.monotonic()
    svc = services(service_env(sandbox.url))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(svc.port)))
    prom = Prometheus(prometheus_binary, config, tmp_path / "tsdb", tmp_path / "prometheus.log")
    try:
        wait_until(prom.ready, 20, "prometheus to be ready")
        wait_until(lambda: svc.http_status("/readyz") == 200, 30, f"service ready; log: {svc.log()}")

        records = good_records()
        records[40:40] = [(f"bad-{i}".encode(), v) for i, v in enumerate(BAD)]
        produce(broker, topics.source, records)

        wait_until(
            lambda: prom.value('up{job="audience-sync"}') == 1.0, 15, f"target up; log: {prom.log()}", interval_s=0.5
        )
        wait_until(
            lambda: prom.value("sum(audience_sync_events_uploaded_total)") == GOOD,
            40,
            f"Prometheus to see {GOOD} uploads (service says {svc.metric('audience_sync_events_uploaded_total')})",
            interval_s=0.5,
        )
        wait_until(
            lambda: prom.value('sum(audience_sync_events_dead_lettered_total{reason="invalid_payload"})') == len(BAD),
            15,
            f"Prometheus to see {len(BAD)} invalid_payload dead letters",
            interval_s=0.5,
        )
        assert prom.value("sum(audience_sync_events_consumed_total)") == GOOD + len(BAD)
        assert prom.value("audience_sync_auth_ok") == 1.0

        names = {r["alert"] for r in alert_rules()}

        def rules_healthy() -> bool:
            groups = prom.get("/api/v1/rules")["data"]["groups"]
            got = {r["name"]: r for g in groups for r in g["rules"]}
            return set(got) == names and all(r["health"] == "ok" for r in got.values())

        wait_until(rules_healthy, 15, "every alert rule loaded and evaluated with health ok", interval_s=0.5)
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        assert [g["file"] for g in groups] == [str(ALERTS)]
        firing = [a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["data"]["alerts"]]
        assert "AudienceSyncAuthFailing" not in firing
        assert svc.stop() == 0
    finally:
        prom.stop()
    assert time.monotonic() - started < 90
