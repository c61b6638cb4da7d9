"""The mappings file: the docs/design.md example loads; every mistake names the file, key and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.mappings import AudienceMapping, Mappings, MappingsError, load_mappings, parse_mappings
from service.core.model import ID_TYPES

DESIGN_EXAMPLE = """\
audiences:
  high_value_customers:            # Segment computation_key / audience_key
    advertiser_id: "7654321098765432109"
    audience_id: "1234567"          # TikTok audience id
  new_lookalike_seed:
    advertiser_id: "7654321098765432109"
    audience_name: "Lookalike seed - Q4"   # created on first use, id stored durably
    create_if_missing: true
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_design_example_yaml(tmp_path: Path) -> None:
    mappings = load_mappings(write(tmp_path, "mappings.yaml", DESIGN_EXAMPLE))
    assert len(mappings) == 2
    assert mappings.get("high_value_customers") == AudienceMapping(
        "high_value_customers", "7654321098765432109", "1234567"
    )
    seed = mappings.get("new_lookalike_seed")
    assert seed == AudienceMapping(
        "new_lookalike_seed", "7654321098765432109", None, "Lookalike seed - Q4", create_if_missing=True
    )
    assert mappings.get("nope") is None
    assert "high_value_customers" in mappings
    assert {m.audience_key for m in mappings} == {"high_value_customers", "new_lookalike_seed"}
    assert mappings.source == str(tmp_path / "mappings.yaml")


def test_json_by_extension_and_by_content(tmp_path: Path) -> None:
    text = '{"audiences": {"a": {"advertiser_id": 7654321098765432109, "audience_id": 1234567}}}'
    for name in ("m.json", "m.conf"):
        mappings = load_mappings(write(tmp_path, name, text))
        # Ints (unquoted YAML/JSON numbers) become digit strings.
        assert mappings.get("a") == AudienceMapping("a", "7654321098765432109", "1234567")


def test_unquoted_yaml_ids_become_strings(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yml", "audiences:\n  a:\n    advertiser_id: 7654321098765432109\n    audience_id: 42\n")
    assert load_mappings(path).get("a") == AudienceMapping("a", "7654321098765432109", "42")


def test_advertiser_id_is_optional_for_default_advertiser() -> None:
    mappings = parse_mappings({"audiences": {"a": {"audience_id": "1"}}})
    assert mappings.get("a") == AudienceMapping("a", None, "1")


def test_empty_and_null_audiences() -> None:
    assert len(Mappings.empty()) == 0
    assert Mappings.empty().source is None
    assert len(parse_mappings({"audiences": None})) == 0
    assert len(parse_mappings({"audiences": {}})) == 0


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"audiences": {"a": {"advertiser_id": "12x", "audience_id": "1"}}}, "audiences.a.advertiser_id"),
        ({"audiences": {"a": {"advertiser_id": "1", "audience_id": "abc"}}}, "audiences.a.audience_id"),
        ({"audiences": {"a": {"advertiser_id": 1.5, "audience_id": "1"}}}, "audiences.a.advertiser_id"),
        ({"audiences": {"a": {"advertiser_id": True, "audience_id": "1"}}}, "audiences.a.advertiser_id"),
        ({"audiences": {"a": {"advertiser_id": "1", "audience_id": ["1"]}}}, "audiences.a.audience_id"),
        ({"audiences": {"a": {"advertiser_id": "1"}}}, "audiences.a.audience_id: missing"),
        (
            {"audiences": {"a": {"advertiser_id": "1", "audience_name": "x"}}},
            "audiences.a.audience_id: missing",
        ),
        (
            {"audiences": {"a": {"advertiser_id": "1", "audience_name": "", "create_if_missing": True}}},
            "audience_name",
        ),
        (
            {"audiences": {"a": {"advertiser_id": "1", "audience_id": "2", "create_if_missing": "yes"}}},
            "audiences.a.create_if_missing",
        ),
        ({"audiences": {"a": {"advertiser_id": "1", "audience_id": "2", "audienceid": "3"}}}, "audienceid"),
        ({"audiences": {"a": "1234"}}, "audiences.a: must be a mapping"),
        ({"audiences": ["a"]}, "audiences: must be a mapping"),
        ({"audiences": {"a": {"audience_id": "1"}}, "extra": 1}, "unknown top-level key(s) extra"),
        ({"audience": {}}, "unknown top-level key(s) audience"),
        ({}, "missing top-level 'audiences'"),
        (["audiences"], "must be a mapping"),
        ({"audiences": {True: {"audience_id": "1"}}}, "must be a string"),
        ({"audiences": {" ": {"audience_id": "1"}}}, "empty audience key"),
    ],
)
def test_invalid_content_names_file_key_and_field(data: object, fragment: str) -> None:
    with pytest.raises(MappingsError) as info:
        parse_mappings(data, "/etc/audience-sync/mappings.yaml")
    message = str(info.value)
    assert message.startswith("/etc/audience-sync/mappings.yaml: ")
    assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MappingsError, match=r"nope\.yaml: cannot read mappings file"):
        load_mappings(tmp_path / "nope.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", "audiences:\n  a: [unclosed\n")
    with pytest.raises(MappingsError, match=r"m\.yaml: invalid YAML: .*line"):
        load_mappings(path)


def test_invalid_json(tmp_path: Path) -> None:
    path = write(tmp_path, "m.json", '{"audiences": {,}}')
    with pytest.raises(MappingsError, match=r"m\.json: invalid JSON: .*line 1"):
        load_mappings(path)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(MappingsError, match="file is empty"):
        load_mappings(write(tmp_path, "m.yaml", "# nothing yet\n"))


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = (
        "audiences:\n"
        "  a:\n    advertiser_id: '1'\n    audience_id: '2'\n"
        "  a:\n    advertiser_id: '1'\n    audience_id: '3'\n"
    )
    with pytest.raises(MappingsError, match="duplicate key 'a'"):
        load_mappings(write(tmp_path, "m.yaml", text))


def test_yaml_is_safe_loaded(tmp_path: Path) -> None:
    text = "audiences: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(MappingsError, match="invalid YAML"):
        load_mappings(write(tmp_path, "m.yaml", text))


# -- the per-entry contract: mode, id_types, enabled, audience_name, phone_region, file cadence ---------------

FILE_EXAMPLE = """\
audiences:
  crm_buyers:
    advertiser_id: "7654321098765432109"
    mode: file
    id_types: [EMAIL_SHA256]
    create_if_missing: true            # named "crm_buyers" (no audience_name)
    file_interval_s: 3600
    file_max_rows: 50000
  app_users:
    advertiser_id: "7654321098765432109"
    audience_id: "1234567"
    id_types: [PHONE_SHA256, IDFA_SHA256]
    phone_region: gb
    enabled: false
"""


def one(entry: dict[str, object], key: str = "a") -> AudienceMapping:
    got = parse_mappings({"audiences": {key: entry}}, "m.yaml").get(key)
    assert got is not None
    return got


def test_defaults_are_todays_behaviour() -> None:
    entry = one({"audience_id": "1"})
    assert entry == AudienceMapping("a", None, "1")
    assert (entry.mode, entry.id_types, entry.enabled, entry.phone_region) == ("stream", None, True, None)
    assert entry.effective_id_types == ID_TYPES and all(entry.sends(t) for t in ID_TYPES)
    assert entry.contract is None and not entry.is_file
    assert entry.effective_phone_region("US") == "US"
    assert entry.effective_audience_name is None  # not created on demand: it has an id
    assert (entry.file_interval_s, entry.file_max_rows) == (None, None)


def test_file_and_stream_entries(tmp_path: Path) -> None:
    mappings = load_mappings(write(tmp_path, "m.yaml", FILE_EXAMPLE))
    crm = mappings.get("crm_buyers")
    assert crm == AudienceMapping(
        "crm_buyers",
        "7654321098765432109",
        None,
        "crm_buyers",
        True,
        mode="file",
        id_types=("EMAIL_SHA256",),
        file_interval_s=3600.0,
        file_max_rows=50000,
    )
    assert crm.is_file and crm.contract == "EMAIL_SHA256" and crm.effective_audience_name == "crm_buyers"
    app = mappings.get("app_users")
    assert app is not None and app.mode == "stream" and app.enabled is False
    assert app.effective_id_types == ("PHONE_SHA256", "IDFA_SHA256")
    assert app.sends("PHONE_SHA256") and not app.sends("EMAIL_SHA256") and not app.sends("AAID_SHA256")
    assert app.phone_region == "GB" and app.effective_phone_region("US") == "GB"
    assert app.contract is None


def test_id_types_come_out_in_canonical_order_and_gaid_is_aaid() -> None:
    entry = one({"audience_id": "1", "id_types": ["AAID_SHA256", "EMAIL_SHA256"]})
    assert entry.effective_id_types == ("EMAIL_SHA256", "AAID_SHA256")
    android = one({"audience_id": "1", "mode": "file", "id_types": ["GAID_SHA256"]})
    assert android.id_types == ("AAID_SHA256",) and android.contract == "GAID_SHA256"  # the file API's name
    assert one({"audience_id": "1", "mode": "file", "id_types": ["IDFA_SHA256"]}).contract == "IDFA_SHA256"
    assert one({"audience_id": "1", "mode": "file", "id_types": ["PHONE_SHA256"]}).contract == "PHONE_SHA256"


def test_audience_name_defaults_to_the_key_only_when_created_on_demand() -> None:
    assert one({"create_if_missing": True}, "seed_q4").audience_name == "seed_q4"
    assert one({"create_if_missing": True, "audience_name": "  Seed  "}).audience_name == "Seed"
    assert one({"audience_id": "1", "create_if_missing": True}).audience_name == "a"
    assert AudienceMapping("k", create_if_missing=True).effective_audience_name == "k"  # built without the parser
    # A streaming name may be long (TikTok keeps 67 characters + "..."); a customer-file name is refused over 128.
    assert one({"create_if_missing": True, "audience_name": "x" * 200}).audience_name == "x" * 200


def test_contract_of_an_entry_built_wrongly_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="exactly one id type"):
        _ = AudienceMapping("k", audience_id="1", mode="file").contract


FIELD_ERRORS = [
    ({"audience_id": "1", "mode": "files"}, "audiences.a.mode: must be one of stream, file"),
    ({"audience_id": "1", "mode": None}, "audiences.a.mode"),
    ({"audience_id": "1", "mode": "file"}, "audiences.a.id_types: mode: file needs exactly one id type"),
    (
        {"audience_id": "1", "mode": "file", "id_types": ["EMAIL_SHA256", "PHONE_SHA256"]},
        "audiences.a.id_types: mode: file needs exactly one id type",
    ),
    ({"audience_id": "1", "id_types": []}, "audiences.a.id_types: must be a non-empty list"),
    ({"audience_id": "1", "id_types": None}, "audiences.a.id_types: must be a non-empty list"),
    ({"audience_id": "1", "id_types": "EMAIL_SHA256"}, "audiences.a.id_types: must be a non-empty list"),
    ({"audience_id": "1", "id_types": ["EMAIL"]}, "audiences.a.id_types: unknown id type 'EMAIL'"),
    ({"audience_id": "1", "id_types": ["email_sha256"]}, "audiences.a.id_types: unknown id type"),
    ({"audience_id": "1", "id_types": [8]}, "audiences.a.id_types: unknown id type 'int'"),
    (
        {"audience_id": "1", "id_types": ["AAID_SHA256", "GAID_SHA256"]},
        "audiences.a.id_types: AAID_SHA256 listed twice",
    ),
    ({"audience_id": "1", "enabled": "no"}, "audiences.a.enabled: must be true or false"),
    ({"audience_id": "1", "enabled": 0}, "audiences.a.enabled: must be true or false"),
    ({"audience_id": "1", "phone_region": "XX"}, "audiences.a.phone_region: must be a region code"),
    ({"audience_id": "1", "phone_region": 44}, "audiences.a.phone_region: must be a region code"),
    (
        {"audience_id": "1", "id_types": ["EMAIL_SHA256"], "phone_region": "GB"},
        "audiences.a.phone_region: set, but id_types does not include PHONE_SHA256",
    ),
    (
        {"mode": "file", "id_types": ["EMAIL_SHA256"], "create_if_missing": True, "audience_name": "n" * 129},
        "audiences.a.audience_name: 129 characters; a customer-file audience name has at most 128",
    ),
    ({"audience_id": "1", "file_interval_s": 600}, "audiences.a.file_interval_s: only for mode: file"),
    ({"audience_id": "1", "file_max_rows": 10}, "audiences.a.file_max_rows: only for mode: file"),
    (
        {"audience_id": "1", "mode": "file", "id_types": ["EMAIL_SHA256"], "file_interval_s": 5},
        "audiences.a.file_interval_s: must be a number of seconds between 60 and 604800",
    ),
    (
        {"audience_id": "1", "mode": "file", "id_types": ["EMAIL_SHA256"], "file_interval_s": "1h"},
        "audiences.a.file_interval_s: must be a number",
    ),
    (
        {"audience_id": "1", "mode": "file", "id_types": ["EMAIL_SHA256"], "file_max_rows": 0},
        "audiences.a.file_max_rows: must be an integer between 1 and 1,000,000",
    ),
    (
        {"audience_id": "1", "mode": "file", "id_types": ["EMAIL_SHA256"], "file_max_rows": 2.5},
        "audiences.a.file_max_rows: must be an integer",
    ),
    (
        {"audience_id": "1", "mode": "file", "id_types": ["EMAIL_SHA256"], "file_max_rows": True},
        "audiences.a.file_max_rows: must be an integer",
    ),
    ({"audience_id": "1", "modes": "file"}, "audiences.a: unknown field(s) modes"),
]


@pytest.mark.parametrize(("entry", "message"), FIELD_ERRORS, ids=[m for _, m in FIELD_ERRORS])
def test_each_contract_field_error_names_file_key_and_field(entry: dict[str, object], message: str) -> None:
    with pytest.raises(MappingsError) as info:
        parse_mappings({"audiences": {"a": entry}}, "/etc/audience-sync/mappings.yaml")
    text = str(info.value)
    assert text.startswith("/etc/audience-sync/mappings.yaml: ") and message in text, text


def test_file_fields_accepted_at_their_bounds() -> None:
    base = {"audience_id": "1", "mode": "file", "id_types": ["EMAIL_SHA256"]}
    low = one({**base, "file_interval_s": 60, "file_max_rows": 1})
    high = one({**base, "file_interval_s": 604800.0, "file_max_rows": 1_000_000})
    assert (low.file_interval_s, low.file_max_rows) == (60.0, 1)
    assert (high.file_interval_s, high.file_max_rows) == (604800.0, 1_000_000)
