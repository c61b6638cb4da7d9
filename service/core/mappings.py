"""The mappings file: audience key → TikTok advertiser and audience (docs/design.md "Mappings file").

Operators edit this file to fix dead letters, so validation is strict and every error names the file, the
audience key and the field: a typo must fail at load time, not silently route users to the wrong audience.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml


class MappingsError(ValueError):
    """The mappings file is unreadable or invalid; the message names the file, key and field."""


@dataclass(frozen=True, slots=True)
class AudienceMapping:
    """One `audiences.<key>` entry. Ids are digit strings (TikTok ids exceed 2**53, so never floats)."""

    audience_key: str
    advertiser_id: str | None = None
    audience_id: str | None = None
    audience_name: str | None = None
    create_if_missing: bool = False


class Mappings:
    """Immutable lookup by audience key; `source` names the file in operator-facing messages."""

    __slots__ = ("_audiences", "source")

    def __init__(self, audiences: Mapping[str, AudienceMapping], source: str | None = None) -> None:
        self._audiences: dict[str, AudienceMapping] = dict(audiences)
        self.source = source

    @classmethod
    def empty(cls) -> Mappings:
        return cls({})

    def get(self, audience_key: str) -> AudienceMapping | None:
        return self._audiences.get(audience_key)

    def __len__(self) -> int:
        return len(self._audiences)

    def __contains__(self, audience_key: object) -> bool:
        return audience_key in self._audiences

    def __iter__(self) -> Iterator[AudienceMapping]:
        return iter(self._audiences.values())

    def __repr__(self) -> str:
        return f"Mappings({len(self._audiences)} audiences from {self.source or '<none>'})"


_ENTRY_KEYS = frozenset({"advertiser_id", "audience_id", "audience_name", "create_if_missing"})


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: YAML would otherwise keep the last one without a word."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: let the default constructor report it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _digits(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise MappingsError(f"{where}: must be a TikTok id (a string of digits), got {type(value).__name__}")
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        raise MappingsError(f"{where}: must be a TikTok id (a string of digits), got {text[:40]!r}")
    return text


def _entry(key: str, raw: object, where: str) -> AudienceMapping:
    if not isinstance(raw, dict):
        raise MappingsError(f"{where}: must be a mapping with advertiser_id and audience_id")
    unknown = sorted(str(k) for k in raw if k not in _ENTRY_KEYS)
    if unknown:
        raise MappingsError(
            f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_ENTRY_KEYS))})"
        )
    advertiser_id = raw.get("advertiser_id")
    audience_id = raw.get("audience_id")
    audience_name = raw.get("audience_name")
    create = raw.get("create_if_missing", False)
    if not isinstance(create, bool):
        raise MappingsError(f"{where}.create_if_missing: must be true or false")
    if audience_name is not None and (not isinstance(audience_name, str) or not audience_name.strip()):
        raise MappingsError(f"{where}.audience_name: must be a non-empty string")
    adv = None if advertiser_id is None else _digits(advertiser_id, f"{where}.advertiser_id")
    aud = None if audience_id is None else _digits(audience_id, f"{where}.audience_id")
    if aud is None:
        if create and audience_name is None:
            raise MappingsError(f"{where}.audience_name: required with create_if_missing: true")
        if not create:
            raise MappingsError(f"{where}.audience_id: missing; set it, or audience_name with create_if_missing: true")
    return AudienceMapping(key, adv, aud, audience_name.strip() if audience_name else None, create)


def parse_mappings(data: object, source: str = "<mappings>") -> Mappings:
    """Validate already-parsed file content (what `load_mappings` does after reading YAML or JSON)."""
    if not isinstance(data, dict):
        raise MappingsError(f"{source}: must be a mapping with a top-level 'audiences' key")
    unknown = sorted(str(k) for k in data if k != "audiences")
    if unknown:
        raise MappingsError(f"{source}: unknown top-level key(s) {', '.join(unknown)} (allowed: audiences)")
    if "audiences" not in data:
        raise MappingsError(f"{source}: missing top-level 'audiences' key")
    audiences = data["audiences"]
    if audiences is None:  # `audiences:` with every entry removed
        audiences = {}
    if not isinstance(audiences, dict):
        raise MappingsError(f"{source}: audiences: must be a mapping of audience key to entry")
    result: dict[str, AudienceMapping] = {}
    for raw_key, raw in audiences.items():
        if isinstance(raw_key, bool) or not isinstance(raw_key, str | int):
            raise MappingsError(f"{source}: audiences: key {raw_key!r} must be a string")
        key = str(raw_key)
        if not key.strip():
            raise MappingsError(f"{source}: audiences: empty audience key")
        result[key] = _entry(key, raw, f"{source}: audiences.{key}")
    return Mappings(result, source)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line (config errors are one line each): the problem and where, without PyYAML's source excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem or exc.context or 'syntax error'}{where}"
    return str(exc).replace("\n", " ")


def load_mappings(path: str | Path) -> Mappings:
    """Read a YAML or JSON mappings file (by extension; otherwise JSON when it starts with "{")."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise MappingsError(f"{source}: cannot read mappings file: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    as_json = suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip()[:1] == b"{")
    try:
        if as_json:
            data: Any = orjson.loads(text)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except orjson.JSONDecodeError as exc:
        raise MappingsError(f"{source}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except yaml.YAMLError as exc:
        raise MappingsError(f"{source}: invalid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        raise MappingsError(f"{source}: file is empty; expected a top-level 'audiences' mapping")
    return parse_mappings(data, source)
