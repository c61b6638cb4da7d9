"""Privacy: raw identifiers and the access token never leave the service except hashed.

A corpus with known emails and phones (valid, invalid, in events that sync and in events dead-lettered for
every reason) and a distinctive token run through the live service at LOG_LEVEL=DEBUG, with a short auth
outage so the error paths log too. None of the raw emails (any case), phones (as sent or E.164) nor the token
may appear in the service's whole log (stdout + stderr), the /metrics text, /healthz, /readyz, or any header
of any dead letter. DLQ record values are the original payload by contract and are not checked.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

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


def ev(u: SampleUser, audience: SampleAudience, entered: bool = True, **mutate: object) -> SampleEvent:
    doc = segment_event(u, audience, entered)
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


def corpus() -> tuple[list[SampleEvent], list[tuple[bytes, bytes]], list[str], list[str], dict[str, int]]:
    """(events that sync, extra raw records, emails, phones as sent and E.164, dead letters expected by reason)."""
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
        doc = orjson.dumps(segment_event(user(f"trunc-{i}", email, None, []), AUD_A, True))
        cut = doc.index(email.encode()) + len(email) + 3
        raw.append((f"trunc-{i}".encode(), doc[:cut]))
        count("invalid_payload")
    raw += [(e.key, e.value) for e in bad]
    return good, raw, emails, phones, want


def fetch(port: int, path: str) -> tuple[int, str]:
    """The status and body of an ops endpoint (a 503 has a body too); (-1, "") while it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode("utf-8", "replace")
    except OSError:
        return -1, ""


def test_no_raw_identifier_nor_token_in_logs_metrics_or_dead_letter_headers(
    broker: LocalBroker,
    topics: Topics,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    good, raw, emails, phones, want = corpus()
    records = [(e.key, e.value) for e in good] + raw
    with sandbox(tokens=[TOKEN]) as sb:
        sb.state.add_advertiser(ADV_B, permission_denied=True)
        sb.set_faults(plan({"kind": "code", "code": 40105, "count": 2}))  # a short auth outage at the start
        produce(broker, topics.source, records)
        env = service_env(sb.url, **FAST, LOG_LEVEL="DEBUG", TIKTOK_ACCESS_TOKEN=TOKEN)
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
    assert "DEBUG" in log, "the log was captured at DEBUG level"
    assert "TikTok rejected the access token" in log, "the auth error path was exercised"
    headers = "\n".join(f"{k}={(v or b'').decode('utf-8', 'replace')}" for m in letters for k, v in (m.headers() or []))
    assert header_value(letters[0].headers(), "dlq.error"), "dead letters carry their error text"

    secrets = {f"email {e.strip()!r}": e.strip().lower() for e in emails}
    secrets |= {f"phone {p!r}": p.lower() for p in phones}
    secrets["the access token"] = TOKEN.lower()
    places = {"service log": log.lower(), "/metrics": metrics.lower(), "DLQ headers": headers.lower()}
    places |= {path: "\n".join(seen).lower() for path, seen in bodies.items()}
    leaks = [f"{what} in {where}" for where, text in places.items() for what, s in secrets.items() if s in text]
    print(
        f"\nprivacy: {len(emails)} emails, {len(phones)} phone forms, log {len(log)} chars, "
        f"metrics {len(metrics)} chars, {sum(map(len, bodies.values()))} probe bodies, "
        f"{len(letters)} dead letters {dict(reasons(letters))}"
    )
    assert not leaks, leaks
