"""/readyz follows the broker: not ready while it is down, ready again when it is back, with no restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from service.devtools.broker import LocalBroker
from service.devtools.sample import expected_membership, generate
from service.devtools.sandbox.server import SandboxThread
from tests.conftest import ServiceProcess, Topics, produce, wait_until
from tests.integration.test_pipeline import membership

pytestmark = pytest.mark.integration


def test_readyz_follows_the_broker_down_and_back(
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
) -> None:
    own = LocalBroker(log_path=tmp_path / "tansu.log").start()  # this test stops its broker: not the shared one
    try:
        topics = Topics(own, 2)
        env = service_env(
            sandbox.url,
            KAFKA_BOOTSTRAP_SERVERS=own.bootstrap,
            SOURCE_TOPIC=topics.source,
            DLQ_TOPIC=topics.dlq,
            CONSUMER_GROUP=topics.group,
            KAFKA_STATISTICS_INTERVAL_MS="500",
            KAFKA_RECONNECT_BACKOFF_MAX_MS="500",
        )
        svc = services(env)
        wait_until(lambda: svc.http_status("/readyz") == 200, 30, "ready on a healthy broker")

        own.stop()
        wait_until(lambda: svc.http_status("/readyz") == 503, 30, "/readyz 503 with the broker down")
        assert "broker unreachable" in svc.http_body("/readyz")
        assert svc.http_status("/healthz") == 200, "a broker outage is not a reason to restart the process"

        own.start()  # same port; tansu keeps no state, so the topics come back empty
        own.create_topics({env["SOURCE_TOPIC"]: 2, env["DLQ_TOPIC"]: 1})
        wait_until(lambda: svc.http_status("/readyz") == 200, 60, "/readyz 200 once the broker is back")
        events = list(generate(50, seed=5, users=20))
        produce(own, env["SOURCE_TOPIC"], [(e.key, e.value) for e in events])
        wait_until(lambda: membership(sandbox) == expected_membership(events), 60, "traffic flows again")
        assert svc.proc is not None and svc.proc.poll() is None, "no restart"
        assert svc.stop() == 0
    finally:
        own.stop()
