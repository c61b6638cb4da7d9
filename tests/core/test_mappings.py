"""The mappings file: the docs/design.md example loads; every mistake names the file, key and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.mappings import AudienceMapping, Mappings, MappingsError, load_mappings, parse_mappings

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
            {"audiences": {"a": {"advertiser_id": "1", "create_if_missing": True}}},
            "audiences.a.audience_name",
        ),
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
