"""A real Prometheus (Debian's binary) scrapes a real service, loads the project's alert rules, and answers every
query of the Grafana dashboard with data.

The service runs against the real broker (tansu) and the TikTok sandbox, as in tests/integration/test_pipeline.py.
Prometheus uses deploy/prometheus/prometheus.yml with its intervals shortened to 1 s, its target pointed at the
service on 127.0.0.1 and its rule file pointed at deploy/prometheus/alerts.yml.

The dashboard is checked for real: every panel expression is parsed by Prometheus's own parser (`promtool check
rules` on a generated file holding each one as a recording rule), and every panel returns data from the running
Prometheus after traffic that moves it, faults included (a rate-limited answer, dead letters, skipped records,
invalid identifiers, a superseded event), and events of a file audience (`mode: file`: uploaded files, APPEND and
REMOVE updates), since a panel that can never show data is a broken panel. The Refresh runs panels read what
`audience-sync refresh` pushes to a Pushgateway: that test also runs Debian's prometheus-pushgateway, scraped with
honor_labels as a production Prometheus would, and a real refresh pushing to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Consumer

from service.commands.refresh import main as refresh_main
from service.devtools.broker import LocalBroker, free_port, stop_process
from service.devtools.sample import ADVERTISER_ID, DEFAULT_AUDIENCES, make_users, segment_event
from service.devtools.sandbox import SandboxThread
from service.devtools.sandbox.state import FilePart

from ..conftest import Pushgateway, ServiceProcess, Topics, produce, require_tool, wait_until
from . import ALERTS, DASHBOARD, PROMETHEUS_YML, alert_rules, load_yaml
from .test_alert_rules import run_promtool

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

    def range(self, promql: str, start: float, end: float, step_s: float = 1.0) -> list[dict[str, Any]]:
        """The series of a range query, as Grafana's panels ask for them."""
        body = self.get("/api/v1/query_range", query=promql, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step_s:g}")
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float:
        """The instant value of a one-series query; -1 while the query has no result."""
        try:
            body = self.get("/api/v1/query", query=promql)
        except OSError:
            return -1.0
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else -1.0

    def stop(self) -> None:
        stop_process(self.proc)

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


def scrape_config(service_port: int, pushgateway_port: int | None = None) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, pointed at this machine and made fast; with a Pushgateway, that too, with
    honor_labels (README "Refresh runs (Pushgateway)")."""
    conf: dict[str, Any] = load_yaml(PROMETHEUS_YML)
    conf["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    conf["rule_files"] = [str(ALERTS)]
    (job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "audience-sync"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    conf["scrape_configs"] = [job]
    if pushgateway_port is not None:
        conf["scrape_configs"].append(
            {
                "job_name": "pushgateway",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{pushgateway_port}"]}],
            }
        )
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


# ---------------------------------------------------------------------------------------------------- dashboard

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"label_values\((\w+),\s*(\w+)\)")

# What the parse check puts in place of Grafana's variables (any valid value will do).
PARSE_VARIABLES = {"job": ".*", "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


@dataclasses.dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str

    @property
    def name(self) -> str:
        return f"panel {self.panel!r} query {self.ref}"


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def dashboard_queries() -> list[PanelQuery]:
    return [PanelQuery(p["title"], t["refId"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Grafana's variables replaced by `values`; a variable the checks do not know fails, so it gets a value."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise AssertionError(f"dashboard variable ${name} in {expr!r}: give the checks a value for it")
        return values[name]

    return _VARIABLE.sub(one, expr)


def rules_file(path: Path, exprs: list[str]) -> Path:
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


def test_every_dashboard_expression_parses_as_promql(tmp_path: Path) -> None:
    """promtool has no query parser of its own, but `check rules` parses each rule's expression with
    Prometheus's: every panel query becomes a recording rule."""
    queries = dashboard_queries()
    assert queries
    exprs = [substitute(q.expr, PARSE_VARIABLES) for q in queries]
    res = run_promtool("check", "rules", str(rules_file(tmp_path / "dashboard.yml", exprs)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout
    # The check catches what it should: an unbalanced parenthesis, an unknown function.
    for bad in ("sum(rate(audience_sync_events_consumed_total[1m])", "rate_of(audience_sync_events_consumed_total)"):
        res = run_promtool("check", "rules", str(rules_file(tmp_path / "bad.yml", [bad])))
        assert res.returncode != 0 and "parse error" in res.stdout + res.stderr, bad


# Queries whose value stays 0 through a healthy run: their panels still draw a zero line, which is data.
# Everything else must show a non-zero value at some point of the run.
MAY_STAY_ZERO = {
    ("Pending events", "A"): "gauge: drained between two scrapes",
    ("Paused partitions", "A"): "gauge: nothing pauses in a healthy run",
    ("Consumer lag (records)", "A"): "gauge: the consumer catches up between librdkafka's statistics",
    ("Consumer lag per partition", "A"): "gauge: as above",
    ("Batches and rows sent", "C"): "in-flight gauge: requests end between two scrapes",
    ("Dead letters by reason", "B"): "DLQ write failures: the broker acknowledges every dead letter",
    ("Time waiting on the rate limiter", "A"): "the limiter's burst covers this little traffic",
    ("Pending events and paused partitions", "A"): "gauge: drained between two scrapes",
    ("Pending events and paused partitions", "B"): "gauge: nothing pauses in a healthy run",
    ("Audiences invalid or missing", "A"): "every mapped audience is valid",
    ("Users pending a file upload", "A"): "gauge: FILE_INTERVAL_S=1 uploads them between two scrapes",
    ("File audiences waiting for 1,000 users", "A"): "the file audience exists: nothing waits to be created",
}

# A customer-file audience (`mode: file`) fed by events: seeded with TikTok's minimum of 1,000 users, so its
# REMOVE updates stay above it; uploaded every second (FILE_INTERVAL_S=1).
FILE_KEY = "dash_crm"
FILE_SEED = 1000


def email_hash(email: str) -> str:
    return hashlib.sha256(email.encode()).hexdigest()


def seed_file_audience(sandbox: SandboxThread, name: str = FILE_KEY) -> str:
    """A customer-file audience of FILE_SEED email hashes, made through the sandbox's own upload and create."""
    content = "".join(email_hash(f"seed-{i}@example.com") + "\n" for i in range(FILE_SEED)).encode()
    path = sandbox.state.upload_file(
        {
            "advertiser_id": ADVERTISER_ID,
            "calculate_type": "EMAIL_SHA256",
            "file_signature": hashlib.md5(content, usedforsecurity=False).hexdigest(),
            "file": FilePart("seed.csv", content),
        }
    )["file_path"]
    created = sandbox.state.create_file_audience(
        {
            "advertiser_id": ADVERTISER_ID,
            "custom_audience_name": name,
            "calculate_type": "EMAIL_SHA256",
            "file_paths": [path],
        }
    )
    return str(created["custom_audience_id"])


def mappings_yaml(file_audience_id: str) -> str:
    lines = ["audiences:"]
    for a in DEFAULT_AUDIENCES:
        lines += [f"  {a.key}:", f'    advertiser_id: "{a.advertiser_id}"', f'    audience_id: "{a.audience_id}"']
    lines += [
        f"  {FILE_KEY}:",
        f'    advertiser_id: "{ADVERTISER_ID}"',
        f'    audience_id: "{file_audience_id}"',
        "    mode: file",
        "    id_types: [EMAIL_SHA256]",
    ]
    lines += ["offline_events:", '  default_event_set_id: "7100000000000000001"']  # the offline panels
    return "\n".join(lines) + "\n"


def offline_records(wave: int) -> list[tuple[bytes, bytes]]:
    """Conversions for the offline panels: sent ones (with match keys) and one dead-lettered `invalid_event`."""
    now_ms = int(time.time() * 1000)
    records = []
    for i in range(5):
        event = {
            "offline_event": True,
            "event": "CompletePayment" if i else "NotATikTokEvent",
            "event_time": now_ms - 60_000,
            "event_id": f"dash-{wave}-{i}",
            "email": f"dash-{wave}-{i}@example.com",
            "currency": "USD",
            "value": 9.5,
        }
        records.append((f"dash-offline-{wave}-{i}".encode(), orjson.dumps(event)))
    return records


def file_records(wave: int) -> list[tuple[bytes, bytes]]:
    """Canonical events of the file audience: three new users enter (APPEND), a seeded one exits (REMOVE)."""
    now_ms = int(time.time() * 1000)
    changes = [(f"dash-file-{wave}-{i}", f"dash-file-{wave}-{i}@example.com", "add") for i in range(3)]
    changes.append((f"dash-seed-{wave}", f"seed-{wave}@example.com", "delete"))
    return [
        (
            user.encode(),
            orjson.dumps(
                {"audience_key": FILE_KEY, "action": action, "user_id": user, "email": email, "event_time": now_ms}
            ),
        )
        for user, email, action in changes
    ]


# The Refresh runs panels: a real `audience-sync refresh` of a customer-file audience of its own (outside the
# service's mappings file, so the audience health panels do not change) pushes to the Pushgateway.
REFRESH_KEY = "dash_refresh"
REFRESH_USERS = 1200


def refresh_pushing_to(
    pushgateway: Pushgateway, sandbox: SandboxThread, env: Mapping[str, str], tmp_path: Path
) -> None:
    audience_id = seed_file_audience(sandbox, REFRESH_KEY)
    mappings = tmp_path / "refresh-mappings.yaml"
    entry = {"advertiser_id": ADVERTISER_ID, "audience_id": audience_id, "mode": "file", "id_types": ["EMAIL_SHA256"]}
    mappings.write_text(json.dumps({"audiences": {REFRESH_KEY: entry}}))
    snapshot = tmp_path / "refresh.csv"
    snapshot.write_text("email\n" + "".join(f"refresh-{i}@example.com\n" for i in range(REFRESH_USERS)))
    refresh_env = {**env, "MAPPINGS_FILE": str(mappings), "REFRESH_PUSHGATEWAY_URL": pushgateway.url}
    args = ["--audience-key", REFRESH_KEY, "--from", f"csv:{snapshot}", "--json", "--no-progress"]
    assert refresh_main(args, refresh_env) == 0
    assert pushgateway.pushes() == 1


WAVES = 2


def dashboard_wave(wave: int) -> list[tuple[bytes, bytes]]:
    """One wave of traffic: uploads, dead letters, a skipped record, an invalid identifier, a superseded event,
    offline conversions and file-audience events.

    Two waves, because a labelled series (a dead-letter reason, a status class) is born with the count of its first
    scrape and a burst can fit between two scrapes: only the second wave's increments move its rate."""
    good = good_records()
    half = len(good) // WAVES
    records = good[wave * half : (wave + 1) * half]
    records[10:10] = [(f"bad-{wave}-{i}".encode(), v) for i, v in enumerate(BAD)]
    extra = make_users(2, random.Random(11 + wave))
    audience = DEFAULT_AUDIENCES[0]
    bad_email = dataclasses.replace(extra[0], user_id=f"dash-bad-email-{wave}", email="not-an-email")
    flip = dataclasses.replace(extra[1], user_id=f"dash-flip-{wave}")  # entered and exited at once: superseded
    for user, entered in ((bad_email, True), (flip, True), (flip, False)):
        records.append((user.user_id.encode(), orjson.dumps(segment_event(user, audience, entered=entered))))
    page = f"dash-page-{wave}"
    records.append((page.encode(), orjson.dumps({"type": "page", "userId": page, "name": "Home"})))
    records += offline_records(wave)
    records += file_records(wave)
    return records


def join_and_leave(broker: LocalBroker, topics: Topics) -> None:
    """A second member joins the service's group, takes partitions and leaves: a revoke and an assign."""
    c = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": topics.group,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
        }
    )
    try:
        c.subscribe([topics.source])
        deadline = time.monotonic() + 30
        while not c.assignment() and time.monotonic() < deadline:
            c.poll(0.2)
        assert c.assignment(), "the second member never got a partition"
    finally:
        c.close()


def test_every_dashboard_panel_shows_data_after_traffic_that_moves_it(
    prometheus_binary: str,
    tmp_path: Path,
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    pushgateway: Pushgateway,
) -> None:
    started = time.monotonic()
    mappings = tmp_path / "mappings.yaml"
    mappings.write_text(mappings_yaml(seed_file_audience(sandbox)))
    env = service_env(
        sandbox.url,
        MAPPINGS_FILE=str(mappings),
        AUDIENCE_HEALTH_INTERVAL_S="1",
        FILE_INTERVAL_S="1",  # the file audience's events are uploaded within the wave
        KAFKA_STATISTICS_INTERVAL_MS="1000",  # lag per partition within the test, not after 15 s
    )
    svc = services(env)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(svc.port, pushgateway.port)))
    prom = Prometheus(prometheus_binary, config, tmp_path / "tsdb", tmp_path / "prometheus.log")
    try:
        wait_until(prom.ready, 20, "prometheus to be ready")
        since = time.time()
        refresh_pushing_to(pushgateway, sandbox, env, tmp_path)
        wait_until(lambda: svc.http_status("/readyz") == 200, 30, f"service ready; log: {svc.log()}")
        wait_until(lambda: prom.value('up{job="audience-sync"}') == 1.0, 15, "target up", interval_s=0.5)
        wait_until(
            lambda: (
                prom.value(
                    f'audience_sync_refresh_identifiers{{job="audience-sync-refresh",audience_key="{REFRESH_KEY}"}}'
                )
                == REFRESH_USERS
            ),
            15,
            "Prometheus to see the refresh's push on the Pushgateway",
            interval_s=0.5,
        )
        for wave in range(WAVES):
            # The wave's first mapping request is rate-limited: retries, the lowered QPS limit, TikTok's codes.
            sandbox.set_faults([{"kind": "code", "code": 40100, "count": 1}])
            produce(broker, topics.source, dashboard_wave(wave))
            n = wave + 1
            moved = {
                "uploads": f"sum(audience_sync_events_uploaded_total) >= {n * GOOD // WAVES}",
                "rate-limited answers": f'sum(audience_sync_tiktok_answers_total{{code="40100"}}) >= {n}',
                "retries": f"sum(audience_sync_upload_retries_total) >= {n}",
                "dead letters": f"sum(audience_sync_events_dead_lettered_total) >= {n * len(BAD)}",
                "skipped records": f"sum(audience_sync_events_skipped_total) >= {n}",
                "invalid identifiers": f"sum(audience_sync_match_errors_total) >= {n}",
                "superseded events": f"sum(audience_sync_events_superseded_total) >= {n}",
                "lag per partition": "count(audience_sync_consumer_lag_records) >= 1",
                "audience health": f"count(audience_sync_audience_members > 0) == {len(DEFAULT_AUDIENCES) + 1}",
                "file-audience updates": f'sum(audience_sync_file_updates_total{{outcome="accepted"}}) >= {2 * n}',
                "a complete health poll": "max(audience_sync_audience_health_last_poll_timestamp_seconds) > 0",
            }
            for what, query in moved.items():
                wait_until(lambda q=query: prom.value(q) >= 0, 30, f"wave {n}: Prometheus to see {what} ({query})", 0.5)
            time.sleep(2)  # a couple of scrapes more: rates over 4 s windows see the last increments
        # Rebalances: the startup assignment is counted before the first scrape, so drive one more.
        assigns = prom.value('sum(audience_sync_rebalances_total{event="assign"})')
        join_and_leave(broker, topics)
        wait_until(
            lambda: prom.value('sum(audience_sync_rebalances_total{event="assign"})') > assigns,
            30,
            "Prometheus to see the service take its partitions back",
            interval_s=0.5,
        )
        time.sleep(2)
        until = time.time()

        # Grafana's $__rate_interval is max($__interval + scrape interval, 4 * scrape interval): 4 s for a 1 s
        # scrape interval and a 1 s step; the range is the whole run.
        values = {
            "job": "audience-sync",
            "__rate_interval": "4s",
            "__interval": "1s",
            "__range": f"{until - since:.0f}s",
        }
        empty, flat = [], []
        for q in dashboard_queries():
            series = prom.range(substitute(q.expr, values), since, until)
            points = [float(v) for s in series for _, v in s["values"]]
            finite = [v for v in points if math.isfinite(v)]
            if not finite:
                empty.append(f"{q.name}: {q.expr}")
            elif not any(finite) and (q.panel, q.ref) not in MAY_STAY_ZERO:
                flat.append(f"{q.name}: {q.expr}")
        assert not empty, "dashboard queries without data after the traffic:\n" + "\n".join(empty)
        assert not flat, "dashboard queries that stayed at zero through the traffic:\n" + "\n".join(flat)
        stale = [k for k in MAY_STAY_ZERO if k not in {(q.panel, q.ref) for q in dashboard_queries()}]
        assert not stale, f"MAY_STAY_ZERO names queries the dashboard no longer has: {stale}"

        for var in dashboard()["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.fullmatch(query)
            assert match, f"template variable {var['name']}: only label_values(metric, label) is checked: {query}"
            metric, label = match.groups()
            got = prom.get("/api/v1/query", query=metric)["data"]["result"]
            assert any(label in s["metric"] for s in got), f"template variable {var['name']}: {query} is empty"
        assert svc.stop() == 0
    finally:
        prom.stop()
    assert time.monotonic() - started < 90
