"""The pure customer-file core: contracts, file writing, net changes and the refresh plan."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.customer_files import (
    CONTRACT_FOR_ID_TYPE,
    FILE_CONTRACTS,
    FILE_HEADERS,
    ID_TYPE_FOR_CONTRACT,
    LINE_BYTES,
    MAX_FILE_BYTES,
    MIN_AUDIENCE_SIZE,
    BelowMinimumSize,
    FileAction,
    FileContract,
    NetChanges,
    NetChangesFull,
    files_from_hashes,
    plan_refresh,
    rows_per_file,
    snapshot_contract,
    write_files,
)
from service.core.model import ID_TYPES, Action, AudienceChange, IdType

# Vectors of docs/tiktok-api.md §1.7 (also in tests/core/test_identifiers.py).
TESTING_EMAIL = "584c4423c421df49955759498a71495aba49b8780eb9387dff333b6f0982c777"
PLUS_15555555555 = "910a625c4ba147b544e6bd2f267e130ae14c591b6ba9c25cb8573322dedbebd0"
MAID = "83dc3f5f32b9472613b0f038d36f22585a609d018af6f6067f50da318bf354bd"
MAID_RAW = "5f3a2b18-9c4d-4e7f-b8e2-17d3a1e69b25"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hashes(n: int, salt: str = "") -> list[str]:
    return [sha(f"{salt}user-{i}@example.com") for i in range(n)]


def lines(content: bytes) -> list[str]:
    text = content.decode()
    assert text.endswith("\n")
    return text[:-1].split("\n")


# -- contracts ----------------------------------------------------------------------------------------------


def test_contracts_are_tiktoks_calculate_types() -> None:
    assert FILE_CONTRACTS == ("EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "GAID_SHA256")
    assert dict(CONTRACT_FOR_ID_TYPE) == {
        "EMAIL_SHA256": "EMAIL_SHA256",
        "PHONE_SHA256": "PHONE_SHA256",
        "IDFA_SHA256": "IDFA_SHA256",
        "AAID_SHA256": "GAID_SHA256",  # same Android id, the file API's name for it
    }
    assert set(CONTRACT_FOR_ID_TYPE) == set(ID_TYPES)
    assert all(CONTRACT_FOR_ID_TYPE[ID_TYPE_FOR_CONTRACT[c]] == c for c in FILE_CONTRACTS)
    assert FILE_HEADERS["IDFA_SHA256"] == FILE_HEADERS["GAID_SHA256"] == "MAID_SHA256"
    assert MAX_FILE_BYTES == 50_000_000 and MIN_AUDIENCE_SIZE == 1000


# -- file writer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("contract", "raw", "expected"),
    [
        ("EMAIL_SHA256", " Testing@Testing.COM ", TESTING_EMAIL),
        ("PHONE_SHA256", "(555) 555-5555", PLUS_15555555555),
        ("IDFA_SHA256", MAID_RAW.upper(), MAID),
        ("GAID_SHA256", f"  {MAID_RAW}  ", MAID),
    ],
)
def test_every_contract_normalises_and_hashes(contract: FileContract, raw: str, expected: str) -> None:
    other = {"EMAIL_SHA256": "b@example.com", "PHONE_SHA256": "+442079460958"}.get(contract, "aa-bb")
    result = write_files([raw, other], contract, stem="vip")
    assert result.contract == contract and result.written == 2
    [f] = result.files
    assert f.contract == contract and f.rows == 2
    assert expected in lines(f.content)
    assert lines(f.content) == sorted(lines(f.content))
    assert all(re.fullmatch(r"[0-9a-f]{64}", line) for line in lines(f.content))
    assert f.content.count(b"\r") == 0


@pytest.mark.parametrize("contract", FILE_CONTRACTS)
def test_prehashed_values_pass_through_lowercased(contract: FileContract) -> None:
    digest = sha(f"already hashed for {contract}")
    result = write_files([digest.upper(), digest, f" {digest} "], contract)
    assert result.written == 1 and result.duplicates == 2
    assert lines(result.files[0].content) == [digest]


def test_invalid_values_are_counted_never_written() -> None:
    emails = ["a@example.com", "not-an-email", "two@@example.com", 42, None, "", "   ", "A@Example.com"]
    result = write_files(emails, "EMAIL_SHA256")
    assert result.written == 1
    assert result.invalid == {"invalid_email": 2, "not_a_string": 1}
    assert result.invalid_total == 3 and result.missing == 3 and result.duplicates == 1
    assert lines(result.files[0].content) == [sha("a@example.com")]
    ads = write_files(["00000000-0000-0000-0000-000000000000", MAID_RAW], "GAID_SHA256")
    assert ads.invalid == {"zero_ad_id": 1} and ads.written == 1
    phones = write_files(["12", "+1 555 555 5555"], "PHONE_SHA256", phone_region="US")
    assert phones.invalid_total == 1 and lines(phones.files[0].content) == [PLUS_15555555555]
    for f in (*result.files, *ads.files, *phones.files):
        assert b"example" not in f.content


def test_nothing_valid_writes_no_file() -> None:
    result = write_files([None, "bad"], "EMAIL_SHA256")
    assert result.files == () and result.written == 0 and result.invalid_total == 1


def test_chunking_exactly_at_the_size_limit() -> None:
    ids = hashes(7)
    exact = files_from_hashes(ids, "EMAIL_SHA256", max_bytes=3 * LINE_BYTES)
    assert [f.rows for f in exact] == [3, 3, 1]
    assert [f.size for f in exact] == [3 * LINE_BYTES, 3 * LINE_BYTES, LINE_BYTES]
    one_short = files_from_hashes(ids, "EMAIL_SHA256", max_bytes=3 * LINE_BYTES - 1)
    assert [f.rows for f in one_short] == [2, 2, 2, 1]
    assert all(f.size <= 3 * LINE_BYTES - 1 for f in one_short)
    # Every identifier exactly once across the files, in sorted order.
    for files in (exact, one_short):
        assert [line for f in files for line in lines(f.content)] == sorted(ids)
    single = files_from_hashes(ids, "EMAIL_SHA256", max_bytes=7 * LINE_BYTES)
    assert len(single) == 1 and single[0].size == 7 * LINE_BYTES


def test_chunking_counts_the_header() -> None:
    head = len("Phone_SHA256\n")
    assert rows_per_file(head + 2 * LINE_BYTES, "PHONE_SHA256", header=True) == 2
    assert rows_per_file(head + 2 * LINE_BYTES - 1, "PHONE_SHA256", header=True) == 1
    files = files_from_hashes(hashes(3), "PHONE_SHA256", max_bytes=head + 2 * LINE_BYTES, header=True)
    assert [f.rows for f in files] == [2, 1]
    assert files[0].size == head + 2 * LINE_BYTES
    assert all(lines(f.content)[0] == "Phone_SHA256" for f in files)
    with pytest.raises(ValueError, match="cannot hold one identifier line"):
        rows_per_file(LINE_BYTES - 1, "EMAIL_SHA256")
    with pytest.raises(ValueError):
        files_from_hashes(hashes(1), "EMAIL_SHA256", max_bytes=head + LINE_BYTES - 1, header=True)


def test_md5_signature_is_hashlibs() -> None:
    for f in files_from_hashes(hashes(10), "IDFA_SHA256", max_bytes=4 * LINE_BYTES):
        assert f.md5 == hashlib.md5(f.content).hexdigest()
        assert re.fullmatch(r"[0-9a-f]{32}", f.md5)


def test_names_are_deterministic_and_distinct() -> None:
    ids = hashes(5)
    first = files_from_hashes(ids, "GAID_SHA256", stem="Summer sale/VIP", max_bytes=2 * LINE_BYTES)
    again = files_from_hashes(list(reversed(ids)) + ids[:2], "GAID_SHA256", stem="Summer sale/VIP", max_bytes=130)
    assert first == again  # same set → same bytes, names and signatures, whatever the order
    names = [f.name for f in first]
    assert len(set(names)) == 3
    for i, (f, name) in enumerate(zip(first, names, strict=True), start=1):
        assert name == f"Summer_sale_VIP-gaid_sha256-{i:04d}-of-0003-{f.md5[:8]}.csv"
    other = files_from_hashes(hashes(5, "x"), "GAID_SHA256", stem="Summer sale/VIP", max_bytes=130)
    assert not set(names) & {f.name for f in other}
    assert files_from_hashes(ids, "EMAIL_SHA256", stem="///")[0].name.startswith("audience-email_sha256-0001-of-0001-")


def test_unhashed_value_refused_by_low_level_writer() -> None:
    with pytest.raises(ValueError, match="not 64 lowercase hex"):
        files_from_hashes(["a@example.com"], "EMAIL_SHA256")
    with pytest.raises(ValueError):
        files_from_hashes([TESTING_EMAIL.upper()], "EMAIL_SHA256")


# -- net changes --------------------------------------------------------------------------------------------

A, B, C = sha("a@example.com"), sha("b@example.com"), sha("c@example.com")


def email(h: str) -> list[tuple[IdType, str]]:
    return [("EMAIL_SHA256", h)]


def test_last_action_wins_per_user() -> None:
    net: NetChanges[int] = NetChanges(["EMAIL_SHA256"])
    net.record(Action.ADD, email(A), 1)  # enter → exit: REMOVE
    net.record(Action.DELETE, email(A), 2)
    net.record(Action.ADD, email(B), 3)  # enter → exit → enter: APPEND
    net.record(Action.DELETE, email(B), 4)
    net.record(Action.ADD, email(B), 5)
    net.record(Action.ADD, email(C), 6)  # enter only
    assert net.pending_users == 3 and net.pending_records == 6
    batch = net.drain()
    assert batch.append == {"EMAIL_SHA256": {B, C}}
    assert batch.remove == {"EMAIL_SHA256": {A}}
    assert batch.handles == (1, 2, 3, 4, 5, 6) and batch.users == 3
    assert batch.updates() == [
        ("EMAIL_SHA256", FileAction.APPEND, frozenset({B, C})),
        ("EMAIL_SHA256", FileAction.REMOVE, frozenset({A})),
    ]
    assert net.pending_users == 0 and net.pending_records == 0
    assert net.drain().handles == ()


def test_settled_only_after_the_updates_carrying_each_record() -> None:
    net: NetChanges[str] = NetChanges(["EMAIL_SHA256"])
    net.record(Action.ADD, email(A), "r1")
    net.record(Action.DELETE, email(A), "r2")  # supersedes r1: both wait for the REMOVE
    net.record(Action.ADD, email(B), "r3")
    net.record(Action.ADD, [("PHONE_SHA256", PLUS_15555555555)], "r4")  # no email: nothing to wait for
    batch = net.drain()
    append: tuple[FileContract, FileAction] = ("EMAIL_SHA256", FileAction.APPEND)
    remove: tuple[FileContract, FileAction] = ("EMAIL_SHA256", FileAction.REMOVE)
    assert batch.settled([]) == ("r4",)
    assert batch.settled([append]) == ("r3", "r4")
    assert batch.settled([remove]) == ("r1", "r2", "r4")
    assert batch.settled([append, remove]) == ("r1", "r2", "r3", "r4")
    assert batch.settled([("PHONE_SHA256", FileAction.APPEND)]) == ("r4",)


def test_contracts_filter_and_multi_contract_audience() -> None:
    net: NetChanges[int] = NetChanges(["GAID_SHA256", "IDFA_SHA256"])
    both: list[tuple[IdType, str]] = [("EMAIL_SHA256", A), ("IDFA_SHA256", B), ("AAID_SHA256", C)]
    assert net.record(Action.ADD, both, 1) == 2
    assert net.record(Action.ADD, email(A), 2) == 0  # email is not this audience's contract
    change = AudienceChange("1", "2", Action.DELETE, (("AAID_SHA256", C),))
    assert net.record_change(change, 3) == 1
    batch = net.drain()
    assert batch.append == {"IDFA_SHA256": {B}} and batch.remove == {"GAID_SHA256": {C}}
    assert batch.needs[0] == {("IDFA_SHA256", FileAction.APPEND), ("GAID_SHA256", FileAction.REMOVE)}
    assert batch.needs[1] == frozenset()
    with pytest.raises(ValueError):
        NetChanges([])
    with pytest.raises(ValueError):
        NetChanges(["AAID_SHA256"])  # type: ignore[list-item]


def test_only_bare_records_make_an_empty_batch() -> None:
    net: NetChanges[int] = NetChanges(["PHONE_SHA256"])
    net.record(Action.ADD, email(A), 7)
    batch = net.drain()
    assert batch.empty and batch.updates() == [] and batch.settled([]) == (7,)


def test_bounds_refuse_without_changing_anything() -> None:
    net: NetChanges[int] = NetChanges(["EMAIL_SHA256"], max_users=2, max_records=4)
    net.record(Action.ADD, email(A), 1)
    net.record(Action.ADD, email(B), 2)
    assert net.room() == 0
    with pytest.raises(NetChangesFull, match="drain"):
        net.record(Action.ADD, email(C), 3)
    net.record(Action.DELETE, email(A), 4)  # a known user always fits
    net.record(Action.ADD, [("PHONE_SHA256", C)], 5)  # a record without a user still counts as a record
    with pytest.raises(NetChangesFull):
        net.record(Action.ADD, email(B), 6)  # max_records
    batch = net.drain()
    assert batch.handles == (1, 2, 4, 5)
    assert batch.append == {"EMAIL_SHA256": {B}} and batch.remove == {"EMAIL_SHA256": {A}}
    assert net.room() == 2
    with pytest.raises(ValueError):
        NetChanges(["EMAIL_SHA256"], max_users=0)


_USERS = [sha(f"u{i}") for i in range(5)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), max_size=40), st.integers(1, 40))
def test_netting_matches_last_action_model(events: list[tuple[int, bool]], drain_every: int) -> None:
    """Applying batches in drain order to any starting membership gives the same end state as applying every
    event one by one: what makes netting safe under at-least-once delivery."""
    net: NetChanges[int] = NetChanges(["EMAIL_SHA256"])
    start = {_USERS[0], _USERS[3]}
    expected, members = set(start), set(start)
    for i, (user, enter) in enumerate(events):
        (expected.add if enter else expected.discard)(_USERS[user])
        net.record(Action.ADD if enter else Action.DELETE, email(_USERS[user]), i)
        if (i + 1) % drain_every == 0 or i == len(events) - 1:
            batch = net.drain()
            append = batch.append.get("EMAIL_SHA256", frozenset())
            remove = batch.remove.get("EMAIL_SHA256", frozenset())
            assert not append & remove
            members = (members | append) - remove
            assert batch.settled([("EMAIL_SHA256", FileAction.APPEND), ("EMAIL_SHA256", FileAction.REMOVE)]) == (
                batch.handles
            )
    assert members == expected


# -- refresh plan -------------------------------------------------------------------------------------------


def test_refresh_plan_counts_for_dry_run() -> None:
    snapshot: list[dict[str, object]] = [
        {"user_id": "1", "email": "A@example.com", "phone": "+1 555 555 5555", "gaid": MAID_RAW},
        {"user_id": "2", "email": "a@example.com", "phone": "nope", "idfa": None},  # duplicate email
        {"user_id": "3", "Email_SHA256": sha("b@example.com"), "aaid": MAID_RAW.upper()},  # pre-hashed, alias
        {"user_id": "4", "email": "", "phone": "12"},  # nothing valid
        {"user_id": "5"},
    ]
    plan = plan_refresh(snapshot, phone_region="US")
    assert plan.users == 5 and plan.users_without_identifier == 2
    assert plan.hashed["EMAIL_SHA256"] == {sha("a@example.com"), sha("b@example.com")}
    assert plan.hashed["PHONE_SHA256"] == {PLUS_15555555555}
    assert plan.hashed["GAID_SHA256"] == {MAID} and plan.hashed["IDFA_SHA256"] == frozenset()
    counts = plan.counts
    assert (counts["EMAIL_SHA256"].identifiers, counts["EMAIL_SHA256"].duplicates) == (2, 1)
    assert counts["PHONE_SHA256"].invalid_total == 2 and counts["PHONE_SHA256"].identifiers == 1
    assert (counts["GAID_SHA256"].identifiers, counts["GAID_SHA256"].duplicates) == (1, 1)
    summary = plan.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["users"] == 5
    contracts = summary["contracts"]
    assert isinstance(contracts, dict)
    assert contracts["EMAIL_SHA256"] == {
        "identifiers": 2,
        "duplicates": 1,
        "invalid": 0,
        "invalid_by_reason": {},
        "below_minimum": True,
    }
    assert "example" not in json.dumps(summary) and sha("b@example.com") not in json.dumps(summary)


def test_refresh_plan_limited_to_contracts() -> None:
    plan = plan_refresh([{"email": "a@example.com", "phone": "+15555555555"}], contracts=["PHONE_SHA256"])
    assert list(plan.hashed) == ["PHONE_SHA256"] and plan.users_without_identifier == 0
    only_email = plan_refresh([{"phone": "+15555555555"}], contracts=["EMAIL_SHA256"])
    assert only_email.users_without_identifier == 1 and only_email.size("EMAIL_SHA256") == 0
    assert snapshot_contract(" GAID ") == "GAID_SHA256" and snapshot_contract("user_id") is None
    with pytest.raises(ValueError):
        plan_refresh([], contracts=[])


def test_minimum_audience_size_refused_before_any_call() -> None:
    short = plan_refresh({"email": h} for h in hashes(MIN_AUDIENCE_SIZE - 1))
    refusal = short.check_minimum("EMAIL_SHA256")
    assert isinstance(refusal, BelowMinimumSize)
    assert (refusal.count, refusal.minimum, refusal.contract) == (999, 1000, "EMAIL_SHA256")
    assert "999 distinct EMAIL_SHA256 identifiers" in str(refusal) and "fewer than 1,000 users" in str(refusal)
    with pytest.raises(BelowMinimumSize) as raised:
        short.require_minimum("EMAIL_SHA256")
    assert raised.value.count == 999
    assert short.check_minimum("PHONE_SHA256") is not None  # no phone at all: 0
    # Duplicates do not count towards the minimum.
    padded = plan_refresh({"email": h} for h in [*hashes(999), hashes(1)[0]])
    assert padded.check_minimum("EMAIL_SHA256") is not None
    enough = plan_refresh({"email": h} for h in hashes(MIN_AUDIENCE_SIZE))
    assert enough.check_minimum("EMAIL_SHA256") is None
    assert enough.require_minimum("EMAIL_SHA256") == frozenset(hashes(1000))
    assert enough.check_minimum("EMAIL_SHA256", minimum=1001) is not None
