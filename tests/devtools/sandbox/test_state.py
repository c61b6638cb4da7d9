"""Pure tests of the sandbox's state, validation and fault plan (no sockets)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from service.devtools.sandbox.faults import FaultPlan, FaultRule
from service.devtools.sandbox.state import (
    ADVERTISER_NOT_EXIST,
    INVALID_BATCH_SIZE,
    NOT_EXIST,
    PARAM_ERROR,
    PERMISSION_ERROR,
    PII_NOT_HASHED,
    ApiError,
    SandboxState,
    parse_int_param,
    parse_json_list_param,
    truncate_name,
)

from .reference_fixture import EMAIL, MAID, PHONE, fixture_body


@pytest.fixture
def state() -> SandboxState:
    s = SandboxState(clock=lambda: datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))
    s.register_all(["123"], [("123", "12345"), ("999", "55555")])
    return s


def apply(state: SandboxState, body: object) -> None:
    state.apply_mapping(state.validate_mapping(body))


def test_add_then_delete(state: SandboxState) -> None:
    apply(state, fixture_body("add"))
    assert state.members("12345") == {"EMAIL_SHA256": [EMAIL], "PHONE_SHA256": [PHONE], "IDFA_SHA256": [MAID]}
    apply(state, fixture_body("delete"))
    assert state.members("12345") == {}


def test_missing_action_defaults_to_add(state: SandboxState) -> None:
    body = fixture_body()
    del body["action"]
    apply(state, body)
    assert state.members("12345")["EMAIL_SHA256"] == [EMAIL]


def _mutate(path: str, value: Any) -> dict[str, Any]:
    body = fixture_body()
    target: Any = body
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return body


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        ([], PARAM_ERROR, "JSON object"),
        (_mutate("id_schema", KeyError), PARAM_ERROR, "id_schema: required"),
        (_mutate("advertiser_ids", []), PARAM_ERROR, "advertiser_ids"),
        (_mutate("advertiser_ids", "123"), PARAM_ERROR, "advertiser_ids"),
        (_mutate("action", "remove"), PARAM_ERROR, "action"),
        (_mutate("id_schema", ["EMAIL_SHA256", "EMAIL_SHA256", "IDFA_SHA256"]), PARAM_ERROR, "duplicate"),
        (_mutate("id_schema", ["EMAIL_SHA256", "phone_sha256", "GAID_SHA256"]), PARAM_ERROR, "id_schema[2]"),
        (_mutate("id_schema", ["EMAIL_SHA256", "PHONE_SHA256"]), PARAM_ERROR, "row length 3 does not match"),
        (_mutate("batch_data", []), PARAM_ERROR, "batch_data"),
        (_mutate("batch_data.0", [{}, {}, {}]), PARAM_ERROR, "no identifier"),
        (_mutate("batch_data.0.0", {"id": EMAIL, "audience_ids": ["12345"], "x": 1}), PARAM_ERROR, "unknown"),
        (_mutate("batch_data.0.0", {"id": EMAIL}), PARAM_ERROR, "audience_ids"),
        (_mutate("batch_data.0.0", {"id": EMAIL, "audience_ids": []}), PARAM_ERROR, "audience_ids"),
        (_mutate("batch_data.0.0.id", "testing@testing.com"), PII_NOT_HASHED, "batch_data[0][0]"),
        (_mutate("batch_data.0.0.id", EMAIL.upper()), PII_NOT_HASHED, "lowercase"),
        (_mutate("batch_data.0.0.id", EMAIL[:32]), PII_NOT_HASHED, "SHA-256"),
        (_mutate("batch_data.0.0.audience_ids", ["777"]), PARAM_ERROR, "invalid audience ID"),
        (_mutate("batch_data.0.0.audience_ids", ["55555"]), PARAM_ERROR, "invalid audience ID"),
        (_mutate("advertiser_ids", ["123", "404"]), ADVERTISER_NOT_EXIST, "404"),
    ],
)
def test_strictness(state: SandboxState, body: object, code: int, fragment: str) -> None:
    with pytest.raises(ApiError) as err:
        state.validate_mapping(body)
    assert err.value.code == code
    assert fragment in err.value.message


def test_all_or_nothing(state: SandboxState) -> None:
    body = fixture_body()
    bad_row = copy.deepcopy(body["batch_data"][0])
    bad_row[1]["id"] = "+15555555555"
    body["batch_data"].append(bad_row)
    with pytest.raises(ApiError) as err:
        state.validate_mapping(body)
    assert err.value.code == PII_NOT_HASHED
    assert state.members("12345") == {}


def test_permission_denied(state: SandboxState) -> None:
    state.add_advertiser("123", permission_denied=True)
    with pytest.raises(ApiError) as err:
        state.validate_mapping(fixture_body())
    assert err.value.code == PERMISSION_ERROR


def test_batch_size_limit() -> None:
    s = SandboxState(max_rows_per_request=2)
    s.register_all([], [("123", "12345")])
    body = fixture_body()
    body["batch_data"] *= 3
    with pytest.raises(ApiError) as err:
        s.validate_mapping(body)
    assert err.value.code == INVALID_BATCH_SIZE


def test_lowercase_schema_and_md5(state: SandboxState) -> None:
    md5 = "0" * 32
    body = {
        "advertiser_ids": ["123"],
        "action": "add",
        "id_schema": ["email_sha256", "Idfa_Md5"],
        "batch_data": [[{"id": EMAIL, "audience_ids": ["12345"]}, {"id": md5, "audience_ids": ["12345"]}]],
    }
    apply(state, body)
    assert state.members("12345") == {"EMAIL_SHA256": [EMAIL], "IDFA_MD5": [md5]}


def test_auto_create_only_on_success() -> None:
    s = SandboxState(auto_create=True)
    s.add_advertiser("123")
    body = _mutate("batch_data.0.0.audience_ids", ["777"])
    body["batch_data"][0][2]["id"] = "raw"
    with pytest.raises(ApiError):
        s.validate_mapping(body)
    assert "777" not in s.audiences
    body["batch_data"][0][2]["id"] = MAID
    apply(s, body)
    assert s.audiences["777"].advertiser_id == "123"
    assert s.members("777")["EMAIL_SHA256"] == [EMAIL]


def test_segment_audience_create_truncates_and_delete(state: SandboxState) -> None:
    long_name = "x" * 71
    aid = state.segment_audience({"advertiser_id": "123", "custom_audience_name": long_name, "action": "create"})[
        "audience_id"
    ]
    assert isinstance(aid, str) and aid.isdigit()
    assert state.audiences[aid].name == "x" * 67 + "..."
    assert truncate_name("y" * 70) == "y" * 70
    with pytest.raises(ApiError) as err:
        state.segment_audience({"advertiser_id": "404", "custom_audience_name": "n", "action": "create"})
    assert err.value.code == ADVERTISER_NOT_EXIST
    state.segment_audience({"advertiser_id": "123", "action": "delete", "delete_audience_id": aid})
    assert aid not in state.audiences
    with pytest.raises(ApiError) as err:
        state.segment_audience({"advertiser_id": "123", "action": "delete", "delete_audience_id": aid})
    assert err.value.code == NOT_EXIST


def test_get_and_list(state: SandboxState) -> None:
    got = state.get_audiences("123", ["12345"])
    details = got["list"][0]["audience_details"]  # type: ignore[index]
    assert details["type"] == "Partner" and details["create_time"] == "2024-01-02 03:04:05"
    with pytest.raises(ApiError) as err:
        state.get_audiences("123", ["55555"])
    assert err.value.code == PARAM_ERROR
    with pytest.raises(ApiError) as err:
        state.get_audiences("123", ["1"])
    assert err.value.code == NOT_EXIST
    for i in range(4):
        state.add_audience("123", name=f"a{i}")
    page = state.list_audiences("123", 3, 2)
    assert page["page_info"] == {"page": 3, "page_size": 2, "total_number": 5, "total_page": 3}
    assert len(page["list"]) == 1  # type: ignore[arg-type]


def test_params() -> None:
    assert parse_json_list_param('["1", 2]', "ids") == ["1", "2"]
    for raw in (None, "", "1", "[]", "not json", '[""]'):
        with pytest.raises(ApiError):
            parse_json_list_param(raw, "ids")
    assert parse_int_param(None, "page", default=1, lo=1) == 1
    with pytest.raises(ApiError):
        parse_int_param("0", "page", default=1, lo=1)
    with pytest.raises(ApiError):
        parse_int_param("101", "page_size", default=100, lo=1, hi=100)


def test_reset(state: SandboxState) -> None:
    apply(state, fixture_body())
    state.count_request("/segment/mapping/")
    state.reset()
    assert state.members("12345") == {} and "12345" in state.audiences
    assert state.snapshot()["requests"] == {}
    state.reset(everything=True)
    assert state.audiences == {} and state.advertisers == {}


# -- fault plan ---------------------------------------------------------------------------------------------


def test_fault_rule_parsing() -> None:
    plan = FaultPlan.from_json(
        {"seed": 1, "rules": [{"kind": "http", "html": True}, {"kind": "timeout", "path": "*"}]}, seed=9
    )
    assert plan.seed == 9
    assert plan.rules[0].status == 502 and plan.rules[1].delay_s == 3600.0
    for bad in (
        [{"kind": "nope"}],
        [{"kind": "code"}],
        [{"kind": "slow"}],
        [{"kind": "code", "code": 1, "probabilty": 0.5}],
        [{"kind": "code", "code": 1, "probability": 2}],
        {"rules": [], "qps": 3},
        "x",
    ):
        with pytest.raises(ValueError):
            FaultPlan.from_json(bad)


def test_count_and_advertiser_filter() -> None:
    plan = FaultPlan([FaultRule("code", code=50000, count=2, advertiser_id="999")])
    assert plan.decide("/segment/mapping/", ["123"], 0.0) is None
    assert plan.decide("/segment/audience/", ["999"], 0.0) is None  # other path
    hits = [plan.decide("/segment/mapping/", ["999"], 0.0) for _ in range(3)]
    assert [h.code if h else None for h in hits] == [50000, 50000, None]


def test_probability_is_seeded() -> None:
    def run(seed: int) -> list[bool]:
        plan = FaultPlan([FaultRule("code", code=40100, probability=0.3)], seed=seed)
        return [plan.decide("/segment/mapping/", [], 0.0) is not None for _ in range(200)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert 30 <= sum(run(7)) <= 90


def test_rate_limit_sliding_window() -> None:
    plan = FaultPlan(rate_limit_qps=3)
    times = [0.0, 0.1, 0.2, 0.3, 0.9, 1.05, 1.15, 1.25]
    verdicts = [plan.decide("/segment/mapping/", [], t) for t in times]
    assert [v.code if v else 0 for v in verdicts] == [0, 0, 0, 40100, 40100, 0, 0, 0]
    assert plan.decide("/user/info/", [], 1.25) is None  # other paths are not limited


def test_minute_budget_overrun_pauses_the_app_for_the_quota_pause() -> None:
    """TikTok's Basic tier in miniature: 5 per minute; the 6th call starts the pause, which refuses every call
    on the path (even a per-second-legal one) until it is over, and then the minute window applies again."""
    plan = FaultPlan(rate_limit_qps=10, rate_limit_qpm=5, quota_pause_s=30, rate_limit_path="*")
    ok = [plan.decide("/segment/mapping/", [], float(t)) for t in range(5)]
    assert ok == [None] * 5
    sixth = plan.decide("/user/info/", [], 5.0)
    assert sixth is not None and sixth.code == 40100 and sixth.source == "rate_limit"
    assert plan.decide("/segment/mapping/", [], 34.9) is not None, "paused for 30 s"
    assert plan.refused == {"qps": 0, "qpm": 1, "paused": 1}
    assert plan.decide("/segment/mapping/", [], 35.0) is not None, "pause over, but 5 calls still in the minute"
    assert plan.decide("/segment/mapping/", [], 65.5) is None, "the minute window has moved on"


def test_minute_budget_round_trips_through_json() -> None:
    plan = FaultPlan.from_json({"rate_limit_qpm": 600, "quota_pause_s": 12, "rate_limit_path": "*"})
    again = FaultPlan.from_json(plan.to_json())
    assert (again.rate_limit_qpm, again.quota_pause_s, again.rate_limit_path) == (600, 12, "*")
    with pytest.raises(ValueError, match="rate_limit_qpm"):
        FaultPlan(rate_limit_qpm=0)
