"""Privacy: raw identifiers and the access token never leave the service except hashed.

A corpus with known emails and phones (valid, invalid, in events that sync and in events dead-lettered for
every reason), each event carrying the client's IP address and user agent as Segment records them
(`context.ip`, `context.userAgent`), and a distinctive token run through the live service at LOG_LEVEL=DEBUG,
with a short auth outage so the error paths log too. None of the raw emails (any case), phones (as sent or
E.164), IP addresses, user agents nor the token may appear in the service's whole log (stdout + stderr), the
/metrics text, /healthz, /readyz, or any header of any dead letter. DLQ record values are the original payload
by contract and are not checked.

The test runs with LOG_FORMAT=text and LOG_FORMAT=json; in JSON mode every line of the log must be one JSON
object with `time`, `level`, `logger` and `message`, and the check runs over every key and value of every line.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from service.core.dead_letters import header_value
from service.devtools.broker import LocalBroker
from service.devtools.sample import SampleAudience, SampleEvent, SampleUser, expected_membership, segment_event
from tests.conftest import ServiceProcess, Topics, produce, wait_until
from tests.integration.helpers_failures import (
    ADV_B,
    AUD_A,
    AUD_B,
    AUD_MISSING,
    FAST,
    membership,
    plan,
    read_topic,
    reasons,
    sandbox,
)

pytestmark = pytest.mark.integration

TOKEN = "tok-PRIVACY-s3cr3t-5f1e9c2a7b4d"


def user(name: str, email: str | None, phone: str | None, canonical: list[tuple[str, str]]) -> SampleUser:
    return SampleUser(name, email, phone, None, None, tuple(canonical))


def client(u: SampleUser) -> tuple[str, str]:
    """The user's public IP address (IPv4 or IPv6) and user agent, distinct per user."""
    n = int(hashlib.sha256(u.user_id.encode()).hexdigest()[:8], 16)
    ip = (
        f"81.{2 + n % 200}.{n // 200 % 256}.{n // 51200 % 254 + 1}"
        if n % 2
        else f"2a02:c7f:{n % 65536:x}::{n % 997 + 1:x}"
    )
    ua = (
        f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_{n % 7} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        f"Version/17.0 Mobile/15E{n % 1000:03d} Safari/604.1"
        if n % 3
        else f"PrivApp/{n % 90}.{n % 7} (Android 14; Pixel 8; build PRIV{n % 100000:05d}) okhttp/4.12.0"
    )
    return ip, ua


def with_client(doc: dict[str, Any], u: SampleUser) -> dict[str, Any]:
    doc["context"]["ip"], doc["context"]["userAgent"] = client(u)
    return doc


def ev(u: SampleUser, audience: SampleAudience, entered: bool = True, **mutate: object) -> SampleEvent:
    doc = with_client(segment_event(u, audience, entered), u)
    personas = doc["context"]["personas"]  # type: ignore[index]
    for k, v in mutate.items():
        if k == "no_ids":
            del personas["external_audience_id"], personas["audience_settings"]
        elif k == "no_advertiser":
            del personas["audience_settings"]
        elif k == "audience_id":
            personas["external_audience_id"] = v
        elif k == "advertiser_id":
            personas["audience_settings"] = {"advertiserId": v}
    return SampleEvent(u.user_id.encode(), orjson.dumps(doc), u, audience, entered)


Corpus = tuple[list[SampleEvent], list[tuple[bytes, bytes]], list[str], list[str], list[str], dict[str, int]]


def corpus() -> Corpus:
    """(events that sync, extra raw records, emails, phones as sent and E.164, IP addresses and user agents,
    dead letters expected by reason)."""
    emails: list[str] = []
    phones: list[str] = []
    good: list[SampleEvent] = []
    bad: list[SampleEvent] = []
    want: dict[str, int] = {}

    def count(reason: str, n: int = 1) -> None:
        want[reason] = want.get(reason, 0) + n

    for i in range(30):  # valid: messy case and spaces, national and international phones
        email = f"  Priv.User{i}@Secret-Corp{i}.Example "
        canonical = [("EMAIL_SHA256", email.strip().lower())]
        phone = None
        if i % 3 == 0:
            phone, e164 = f"(415) 555-{1100 + i:04d}", f"+1415555{1100 + i:04d}"
        elif i % 3 == 1:
            phone, e164 = f"+44 20 7946 {i:04d}", f"+44207946{i:04d}"
        if phone:
            canonical.append(("PHONE_SHA256", e164))
            phones += [phone, e164]
        emails.append(email)
        u = user(f"priv-{i}", email, phone, canonical)
        good.append(ev(u, AUD_A, True))
        if i % 5 == 4:  # this user's last event exits: synced as a delete
            good.append(ev(u, AUD_A, False))
    for i in range(5):  # a valid email next to an invalid phone: synced, the phone counted as a match error
        email, phone = f"Mixed.Person{i}@Privacy-Mail.Example", f"+1 (999) PRIV-{i}"
        emails.append(email)
        phones.append(phone)
        good.append(ev(user(f"mixed-{i}", email, phone, [("EMAIL_SHA256", email.lower())]), AUD_A))
    for i in range(8):  # nothing usable: no_identifiers
        email = f"broken.email{i}@@nowhere-priv" if i % 2 else None
        phone = f"+0 7319 {i}46 (priv)" if i % 3 else None
        if email is None and phone is None:
            email = f"Broken{i}.at.privacy.example"
        emails += [e for e in (email,) if e]
        phones += [p for p in (phone,) if p]
        bad.append(ev(user(f"noid-{i}", email, phone, []), AUD_A))
        count("no_identifiers")
    specials: list[tuple[dict[str, object], str]] = [
        ({"no_ids": True}, "missing_audience_id"),
        ({"no_advertiser": True}, "missing_advertiser_id"),
        ({"audience_id": "leak.audience@priv-corp.example"}, "invalid_payload"),
        ({"advertiser_id": "+1 650 555 0199"}, "invalid_payload"),
    ]
    for j, (mutation, reason) in enumerate(specials):
        for i in range(3):
            email, phone = f"Special{j}.{i}@Dlq-Priv.Example", f"+1 650 555 {2000 + 10 * j + i:04d}"
            emails.append(email)
            phones += [phone, f"+1650555{2000 + 10 * j + i:04d}"]
            bad.append(ev(user(f"special-{j}-{i}", email, phone, []), AUD_A, **mutation))
            count(reason)
    emails.append("leak.audience@priv-corp.example")
    phones.append("+1 650 555 0199")
    for i in range(4):  # TikTok refuses: an audience it does not know, an advertiser it forbids
        for aud, reason in ((AUD_MISSING, "tiktok_rejected"), (AUD_B, "tiktok_permission")):
            email, phone = f"Refused{i}.{aud.key}@TikTok-Priv.Example", f"(212) 555-{3000 + i:04d}"
            emails.append(email)
            phones += [phone, f"+1212555{3000 + i:04d}"]
            bad.append(ev(user(f"refused-{aud.key}-{i}", email, phone, []), aud))
            count(reason)
    raw: list[tuple[bytes, bytes]] = []
    for i in range(4):  # truncated JSON full of identifiers: invalid_payload must not quote it
        email = f"Truncated{i}@Json-Priv.Example"
        emails.append(email)
        u = user(f"trunc-{i}", email, None, [])
        doc = orjson.dumps(with_client(segment_event(u, AUD_A, True), u))
        cut = doc.index(email.encode()) + len(email) + 3
        raw.append((f"trunc-{i}".encode(), doc[:cut]))
        count("invalid_payload")
    raw += [(e.key, e.value) for e in bad]
    clients = sorted({part for e in good + bad for part in client(e.user)})
    return good, raw, emails, phones, clients, want


def fetch(port: int, path: str) -> tuple[int, str]:
    """The status and body of an ops endpoint (a 503 has a body too); (-1, "") while it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode("utf-8", "replace")
    except OSError:
        return -1, ""


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every line of a LOG_FORMAT=json log as its object; fails on the first line that is not one."""
    out = []
    for n, line in enumerate(log.splitlines(), 1):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            pytest.fail(f"log line {n} is not JSON: {line[:300]!r}")
        assert isinstance(obj, dict), f"log line {n} is not a JSON object: {line[:300]!r}"
        missing = {"time", "level", "logger", "message"} - obj.keys()
        assert not missing, f"log line {n} lacks {sorted(missing)}: {line[:300]!r}"
        out.append(obj)
    return out


def strings(value: Any) -> Iterator[str]:
    """Every key and every scalar of a parsed JSON value, as text."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif value is not None:
        yield str(value)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_raw_identifier_nor_token_in_logs_metrics_or_dead_letter_headers(
    broker: LocalBroker,
    topics: Topics,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    log_format: str,
) -> None:
    good, raw, emails, phones, clients, want = corpus()
    records = [(e.key, e.value) for e in good] + raw
    with sandbox(tokens=[TOKEN]) as sb:
        sb.state.add_advertiser(ADV_B, permission_denied=True)
        sb.set_faults(plan({"kind": "code", "code": 40105, "count": 2}))  # a short auth outage at the start
        produce(broker, topics.source, records)
        env = service_env(sb.url, **FAST, LOG_LEVEL="DEBUG", LOG_FORMAT=log_format, TIKTOK_ACCESS_TOKEN=TOKEN)
        svc = services(env)
        bodies: dict[str, list[str]] = {"/healthz": [], "/readyz": []}

        def probe() -> list[int]:
            """Both probes' statuses; their bodies are kept for the leak check."""
            statuses = []
            for path, seen in bodies.items():
                status, body = fetch(svc.port, path)
                seen.append(body)
                statuses.append(status)
            return statuses

        def synced() -> bool:
            probe()  # sampled all along, the auth outage included
            return membership(sb) == expected_membership(good)

        wait_until(synced, 60, "the valid events synced")
        letters = read_topic(broker, topics.dlq, expect=sum(want.values()))
        assert dict(reasons(letters)) == want
        wait_until(lambda: svc.metric("audience_sync_match_errors_total") > 0, 10, "match errors counted")
        metrics = svc.metrics()
        assert probe() == [200, 200]
        assert all(orjson.loads(seen[-1])["ok"] is True for seen in bodies.values()), bodies
        assert svc.stop() == 0
    log = svc.log_path.read_text(errors="replace")
    if log_format == "json":
        lines = json_lines(log)
        assert any(o["level"] == "DEBUG" for o in lines), "the log was captured at DEBUG level"
        assert any("TikTok rejected the access token" in o["message"] for o in lines), "auth error path exercised"
        # The leak check reads the decoded keys and values, so JSON escaping cannot hide a raw identifier.
        log_text = "\n".join(s for o in lines for s in strings(o))
    else:
        assert "DEBUG" in log, "the log was captured at DEBUG level"
        assert "TikTok rejected the access token" in log, "the auth error path was exercised"
        log_text = log
    headers = "\n".join(f"{k}={(v or b'').decode('utf-8', 'replace')}" for m in letters for k, v in (m.headers() or []))
    assert header_value(letters[0].headers(), "dlq.error"), "dead letters carry their error text"

    secrets = {f"email {e.strip()!r}": e.strip().lower() for e in emails}
    secrets |= {f"phone {p!r}": p.lower() for p in phones}
    secrets |= {f"client {c!r}": c.lower() for c in clients}
    secrets["the access token"] = TOKEN.lower()
    places = {"service log": log_text.lower(), "/metrics": metrics.lower(), "DLQ headers": headers.lower()}
    places |= {path: "\n".join(seen).lower() for path, seen in bodies.items()}
    leaks = [f"{what} in {where}" for where, text in places.items() for what, s in secrets.items() if s in text]
    print(
        f"\nprivacy ({log_format}): {len(emails)} emails, {len(phones)} phone forms, {len(clients)} IPs and user "
        f"agents, log {len(log)} chars, metrics {len(metrics)} chars, {sum(map(len, bodies.values()))} probe bodies, "
        f"{len(letters)} dead letters {dict(reasons(letters))}"
    )
    assert not leaks, leaks
