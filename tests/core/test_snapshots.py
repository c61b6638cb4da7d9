"""Snapshots for `refresh`: the CSV reader (raw and pre-hashed columns, bad rows, BOM, empty files) and the
reduction of a compacted topic (latest value per key wins, tombstones and delete events leave), as pure code."""

from __future__ import annotations

import copy
import hashlib
import io

import fastavro
import orjson
import pytest

from service.core.customer_files import plan_refresh
from service.core.schemas import load_canonical_schema
from service.core.snapshots import (
    CompactedSnapshot,
    CsvSnapshot,
    SnapshotError,
    reduce_compacted,
    user_of,
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def csv_lines(text: str) -> io.StringIO:
    """What `refresh` hands over: the text decoded as utf-8-sig with errors replaced, newlines kept."""
    return io.StringIO(text.encode().decode("utf-8-sig", errors="replace"), newline="")


# -- CSV ----------------------------------------------------------------------------------------------------------


def test_raw_columns_are_normalised_and_hashed_like_the_stream() -> None:
    snap = CsvSnapshot(csv_lines("user_id,Email , phone\n1, Ann@Example.com ,+44 20 7946 0958\n2,bob@example.com,\n"))
    rows = list(snap)
    assert rows == [
        {"Email": " Ann@Example.com ", "phone": "+44 20 7946 0958"},
        {"Email": "bob@example.com", "phone": ""},
    ]
    assert snap.counts.columns == {"Email": "EMAIL_SHA256", "phone": "PHONE_SHA256"}
    assert snap.counts.ignored_columns == ["user_id"]
    plan = plan_refresh(rows, contracts=["EMAIL_SHA256", "PHONE_SHA256"])
    assert plan.hashed["EMAIL_SHA256"] == {sha("ann@example.com"), sha("bob@example.com")}
    assert plan.hashed["PHONE_SHA256"] == {sha("+442079460958")}


def test_prehashed_columns_pass_through_and_anything_else_there_is_counted_not_hashed() -> None:
    h = sha("ann@example.com")
    md5 = hashlib.md5(b"x", usedforsecurity=False).hexdigest()
    text = f"EMAIL_SHA256\n{h.upper()}\n{md5}\nann@example.com\n\n"
    snap = CsvSnapshot(csv_lines(text), ["EMAIL_SHA256"])
    rows = list(snap)
    assert rows == [{"EMAIL_SHA256": h.upper()}, {}, {}]  # the MD5 and the raw email are dropped, their rows kept
    assert snap.counts.not_sha256 == {"EMAIL_SHA256": 2} and snap.counts.rows == 3
    plan = plan_refresh(rows, contracts=["EMAIL_SHA256"])
    assert plan.hashed["EMAIL_SHA256"] == {h} and plan.users_without_identifier == 2


def test_gaid_and_aaid_columns_feed_the_gaid_contract() -> None:
    snap = CsvSnapshot(csv_lines("aaid,GAID_SHA256,idfa\nAB-CD,,x\n," + sha("ef") + ",y\n"), ["GAID_SHA256"])
    rows = list(snap)
    assert snap.counts.columns == {"aaid": "GAID_SHA256", "GAID_SHA256": "GAID_SHA256"}
    assert snap.counts.ignored_columns == ["idfa"]  # IDFA is not this audience's contract
    assert plan_refresh(rows, contracts=["GAID_SHA256"]).hashed["GAID_SHA256"] == {sha("ab-cd"), sha("ef")}


def test_columns_of_other_contracts_are_ignored() -> None:
    snap = CsvSnapshot(csv_lines("email,phone\na@b.co,+15555550100\n"), ["EMAIL_SHA256"])
    assert list(snap) == [{"email": "a@b.co"}]
    assert snap.counts.ignored_columns == ["phone"]


def test_bad_rows_are_counted_and_skipped_never_fatal() -> None:
    raw = b'email,id\na@b.co,1\nonly-one-field\nc@d.co,3,extra\n"e@f.co,5\n'
    snap = CsvSnapshot(io.StringIO(raw.decode(), newline=""))
    rows = list(snap)
    # The unclosed quote swallows the rest of the file as one field: one bad row (wrong field count).
    assert rows == [{"email": "a@b.co"}]
    assert snap.counts.bad_rows == 3 and snap.counts.bad_rows_by_reason == {"field_count": 3}
    latin1 = "email,id\nj\xf6rg@example.com,1\nok@example.com,2\n".encode("latin-1")
    snap = CsvSnapshot(io.StringIO(latin1.decode("utf-8-sig", errors="replace"), newline=""))
    assert list(snap) == [{"email": "ok@example.com"}]
    assert snap.counts.bad_rows_by_reason == {"not_utf8": 1} and snap.counts.rows == 1


def test_bom_blank_lines_and_crlf() -> None:
    text = "\ufeffemail\r\n\r\na@b.co\r\n   \r\nc@d.co\r\n"
    snap = CsvSnapshot(csv_lines(text))
    assert list(snap) == [{"email": "a@b.co"}, {"email": "c@d.co"}]
    assert snap.counts.rows == 2 and snap.counts.bad_rows == 0
    # A BOM the caller did not strip (opened as plain utf-8) is removed from the first header too.
    assert list(CsvSnapshot(io.StringIO("\ufeffemail\na@b.co\n", newline=""))) == [{"email": "a@b.co"}]


def test_empty_file_header_only_and_no_usable_column() -> None:
    for empty in ("", "\n\n", "\ufeff"):
        with pytest.raises(SnapshotError, match="empty: expected a header row"):
            CsvSnapshot(csv_lines(empty))
    header_only = CsvSnapshot(csv_lines("email,phone\n"))
    assert list(header_only) == [] and header_only.counts.rows == 0
    with pytest.raises(SnapshotError, match=r"no identifier column .*columns: user_id, name.*expected one of: email"):
        CsvSnapshot(csv_lines("user_id,name\n1,x\n"), ["EMAIL_SHA256"])
    with pytest.raises(SnapshotError, match="expected one of: email, EMAIL_SHA256"):
        CsvSnapshot(csv_lines("phone\n+15555550100\n"), ["EMAIL_SHA256"])  # phones only, for an email audience
    with pytest.raises(SnapshotError, match="twice"):
        CsvSnapshot(csv_lines("email,EMAIL\na,b\n"))


def test_no_identifier_reaches_a_count_or_an_error() -> None:
    secret = "very.secret.person@example.com"
    snap = CsvSnapshot(csv_lines(f"email,x\n{secret},1\n{secret}\n"))
    list(snap)
    assert secret not in repr(snap.counts.document())
    with pytest.raises(SnapshotError) as info:
        CsvSnapshot(csv_lines(f"{secret}\n"), ["EMAIL_SHA256"])
    assert "columns: " in str(info.value)  # the header is named: a header is not an identifier row


# -- compacted topic ----------------------------------------------------------------------------------------------


def event(user: str, action: str = "add", key: str = "vip", **ids: str) -> bytes:
    return orjson.dumps({"audience_key": key, "action": action, "user_id": user, **ids})


def k(user: str, audience: str = "vip") -> bytes:
    return f"{audience}:{user}".encode()


def test_latest_value_per_key_wins() -> None:
    rows, counts = reduce_compacted(
        [
            (k("u1"), event("u1", email="old@example.com")),
            (k("u2"), event("u2", email="two@example.com")),
            (k("u1"), event("u1", email="new@example.com", phone="+15555550100")),
            (k("u3"), event("u3", action="delete", email="three@example.com")),
            (k("u4"), event("u4", action="delete")),
            (k("u4"), event("u4", idfa="AAAA-BBBB")),  # left, then back
        ],
        "vip",
    )
    assert sorted(map(orjson.dumps, rows)) == sorted(
        map(
            orjson.dumps,
            [
                {"email": "new@example.com", "phone": "+15555550100"},
                {"email": "two@example.com"},
                {"idfa": "AAAA-BBBB"},
            ],
        )
    )
    assert (counts.records, counts.keys, counts.members, counts.left, counts.invalid) == (6, 4, 3, 1, 0)


def test_tombstones_mean_left_and_a_later_value_brings_the_user_back() -> None:
    rows, counts = reduce_compacted(
        [
            (k("u1"), event("u1", email="a@example.com")),
            (k("u1"), None),
            (k("u2"), event("u2", email="b@example.com")),
            (k("u2"), None),
            (k("u2"), event("u2", email="b2@example.com")),
            (k("u3"), None),  # compaction kept only the tombstone
        ],
        "vip",
    )
    assert rows == [{"email": "b2@example.com"}]
    assert (counts.keys, counts.members, counts.left) == (3, 1, 2)


def test_other_audiences_and_bad_keys_are_not_this_snapshot() -> None:
    rows, counts = reduce_compacted(
        [
            (k("u1", "vip_plus"), event("u1", key="vip_plus", email="x@example.com")),  # "vip_plus:" is not "vip:"
            (k("u1", "other"), event("u1", key="other", email="y@example.com")),
            (None, event("u9", email="z@example.com")),
            (b"vip:", event("", email="w@example.com")),
            (b"vip:\xff", event("u5", email="v@example.com")),
            (k("a:b"), event("a:b", email="colon@example.com")),  # a user id may hold colons
        ],
        "vip",
    )
    assert rows == [{"email": "colon@example.com"}]
    assert (counts.other_audiences, counts.bad_keys, counts.members) == (3, 2, 1)
    assert user_of(b"vip:a:b", "vip") == "a:b" and user_of(b"vipx:a", "vip") is None and user_of(None, "vip") is None


def test_an_unreadable_latest_value_leaves_the_user_out_and_is_counted() -> None:
    rows, counts = reduce_compacted(
        [
            (k("u1"), event("u1", email="a@example.com")),
            (k("u1"), b"{not json"),
            (k("u2"), event("u2", key="other", email="b@example.com")),  # the value names another audience
            (k("u3"), event("someone-else", email="c@example.com")),
            (k("u4"), event("u4", action="maybe", email="d@example.com")),
            (k("u5"), orjson.dumps({"type": "track", "event": "Audience Entered", "userId": "u5"})),
            (k("u6"), b""),  # zero bytes is not a tombstone
            (k("u7"), orjson.dumps({"audience_key": "vip", "action": "add", "email": "e@example.com"})),  # no user_id
        ],
        "vip",
    )
    assert rows == [{"email": "e@example.com"}]
    assert counts.invalid == 6 and counts.members == 1
    assert counts.invalid_by_reason == {
        "undecodable": 2,
        "audience_key_mismatch": 1,
        "user_id_mismatch": 1,
        "unknown_action": 1,
        "not_canonical": 1,
    }


def test_identifier_fields_are_limited_and_hashing_follows_the_canonical_rules() -> None:
    snap = CompactedSnapshot("vip", fields=("email",))
    snap.add(k("u1"), event("u1", email=" Ann@Example.COM ", phone="+15555550100"))
    snap.add(k("u2"), event("u2", email=sha("bob@example.com").upper()))
    rows = list(snap.rows())
    assert rows == [{"email": " Ann@Example.COM "}, {"email": sha("bob@example.com").upper()}]
    plan = plan_refresh(rows, contracts=["EMAIL_SHA256"])
    assert plan.hashed["EMAIL_SHA256"] == {sha("ann@example.com"), sha("bob@example.com")}


def test_avro_values_with_the_content_type_header() -> None:
    record = {"audience_key": "vip", "action": "add", "user_id": "u1", "email": "a@example.com"}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(load_canonical_schema())), record)
    snap = CompactedSnapshot("vip")
    snap.add(k("u1"), buf.getvalue(), [("content-type", b"application/avro")])
    snap.add(k("u2"), b"\x00\x00\x00\x00\x07rest", None)  # Confluent framing needs the registry: not read here
    assert list(snap.rows()) == [{"email": "a@example.com"}]
    assert snap.counts.invalid_by_reason == {"undecodable": 1}
