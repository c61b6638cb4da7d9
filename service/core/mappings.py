"""The mappings file: audience key → TikTok advertiser and audience (docs/design.md "Mappings file").

Operators edit this file to fix dead letters, so validation is strict and every error names the file, the
audience key and the field: a typo must fail at load time, not silently route users to the wrong audience.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

import orjson
import yaml

from service.core.customer_files import CONTRACT_FOR_ID_TYPE, FileContract
from service.core.identifiers import is_supported_region
from service.core.model import ID_TYPES, IdType
from service.core.offline import MATCH_KEYS, OfflineSettings, build_event_map


class MappingsError(ValueError):
    """The mappings file is unreadable or invalid; the message names the file, key and field."""


Mode = Literal["stream", "file"]
MODES: Final[tuple[Mode, ...]] = get_args(Mode)

# Accepted in `id_types` for the Android advertising id: the file API's name for it (docs/tiktok-api.md §3.6).
_ID_TYPE_ALIASES: Final[Mapping[str, IdType]] = {"GAID_SHA256": "AAID_SHA256"}

AUDIENCE_NAME_MAX: Final = 128  # customer-file audiences (dmp/custom_audience/create); Partner names are truncated
FILE_INTERVAL_MIN_S: Final = 60.0
FILE_INTERVAL_MAX_S: Final = 7 * 86400.0
FILE_MAX_ROWS_MAX: Final = 1_000_000  # customer_files.DEFAULT_MAX_PENDING_USERS: what one drain may hold


@dataclass(frozen=True, slots=True)
class AudienceMapping:
    """One `audiences.<key>` entry. Ids are digit strings (TikTok ids exceed 2**53, so never floats).

    The per-entry contract (docs/design.md "Mappings file"): `mode` is how the audience is fed (`stream`: a Partner
    audience through `segment/mapping`; `file`: a customer-file audience through file uploads); `id_types` which
    identifier types are sent (None: all of them, for streaming only; a file entry names exactly one);
    `enabled: false` pauses the entry; `phone_region` is its default region for phone numbers without a country
    code (None: PHONE_DEFAULT_REGION); `file_interval_s` / `file_max_rows` override the service's upload cadence
    for a file entry (None: the service's default). Use the accessors rather than the raw fields.
    """

    audience_key: str
    advertiser_id: str | None = None
    audience_id: str | None = None
    audience_name: str | None = None
    create_if_missing: bool = False
    mode: Mode = "stream"
    id_types: tuple[IdType, ...] | None = None
    enabled: bool = True
    phone_region: str | None = None
    file_interval_s: float | None = None
    file_max_rows: int | None = None

    @property
    def restricts(self) -> bool:
        """Whether the entry changes how its records are resolved (disabled, file mode or its own phone region):
        the resolver asks this first, so the common entry costs one attribute read."""
        return not self.enabled or self.mode == "file" or self.phone_region is not None

    @property
    def is_file(self) -> bool:
        return self.mode == "file"

    @property
    def effective_id_types(self) -> tuple[IdType, ...]:
        """The identifier types this entry sends, in `ID_TYPES` order."""
        if self.id_types is None:
            return ID_TYPES
        return tuple(t for t in ID_TYPES if t in self.id_types)

    def sends(self, id_type: IdType) -> bool:
        return id_type in self.effective_id_types

    @property
    def contract(self) -> FileContract | None:
        """The customer-file contract (`calculate_type`) of a file entry; None for a streaming one."""
        if not self.is_file:
            return None
        types = self.effective_id_types
        if len(types) != 1:  # parse_mappings never builds such an entry
            raise ValueError(f"audiences.{self.audience_key}: a file entry needs exactly one id type, has {types}")
        return CONTRACT_FOR_ID_TYPE[types[0]]

    @property
    def effective_audience_name(self) -> str | None:
        """The name an audience created on demand gets: `audience_name`, else the audience key."""
        if self.audience_name is not None:
            return self.audience_name
        return self.audience_key if self.create_if_missing else None

    def effective_phone_region(self, default: str) -> str:
        """This entry's phone region, else `default` (PHONE_DEFAULT_REGION)."""
        return self.phone_region or default


class Mappings:
    """Immutable lookup by audience key; `source` names the file in operator-facing messages.

    `offline` is the file's `offline_events:` section (None when absent: offline events unconfigured).
    """

    __slots__ = ("_audiences", "offline", "source")

    def __init__(
        self,
        audiences: Mapping[str, AudienceMapping],
        source: str | None = None,
        offline: OfflineSettings | None = None,
    ) -> None:
        self._audiences: dict[str, AudienceMapping] = dict(audiences)
        self.source = source
        self.offline = offline

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


_ENTRY_KEYS = frozenset(
    {
        "advertiser_id",
        "audience_id",
        "audience_name",
        "create_if_missing",
        "mode",
        "id_types",
        "enabled",
        "phone_region",
        "file_interval_s",
        "file_max_rows",
    }
)
_FILE_ONLY_KEYS = ("file_interval_s", "file_max_rows")


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


def _id_types(value: object, where: str) -> tuple[IdType, ...]:
    allowed = ", ".join(ID_TYPES)
    if not isinstance(value, list) or not value:
        raise MappingsError(f"{where}: must be a non-empty list of id types ({allowed})")
    known: dict[str, IdType] = {**{t: t for t in ID_TYPES}, **_ID_TYPE_ALIASES}
    out: list[IdType] = []
    for item in value:
        id_type = known.get(item) if isinstance(item, str) else None
        if id_type is None:
            shown = item if isinstance(item, str) else type(item).__name__
            raise MappingsError(
                f"{where}: unknown id type {str(shown)[:40]!r} (allowed: {allowed}; GAID_SHA256 = AAID_SHA256)"
            )
        if id_type in out:
            raise MappingsError(f"{where}: {id_type} listed twice")
        out.append(id_type)
    return tuple(t for t in ID_TYPES if t in out)


def _number(value: object, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise MappingsError(f"{where}: must be a number of seconds between {lo:g} and {hi:g}")
    return float(value)


def _count(value: object, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MappingsError(f"{where}: must be an integer between {lo} and {hi:,}")
    return value


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
    if aud is None and not create:
        raise MappingsError(
            f"{where}.audience_id: missing; set it, or create_if_missing: true (audience_name optional)"
        )

    mode = raw.get("mode", "stream")
    if mode not in MODES:
        raise MappingsError(f"{where}.mode: must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}")
    file = mode == "file"
    id_types = _id_types(raw["id_types"], f"{where}.id_types") if "id_types" in raw else None
    if file and (id_types is None or len(id_types) != 1):
        contracts = ", ".join(f"{t} ({c})" for t, c in CONTRACT_FOR_ID_TYPE.items())
        raise MappingsError(
            f"{where}.id_types: mode: file needs exactly one id type, since a customer-file audience holds one "
            f"calculate_type (one of {contracts})"
        )
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise MappingsError(f"{where}.enabled: must be true or false")

    region = raw.get("phone_region")
    if region is not None:
        if not isinstance(region, str) or not is_supported_region(region.strip().upper()):
            raise MappingsError(
                f"{where}.phone_region: must be a region code phonenumbers knows (e.g. US, GB, DE), "
                f"got {str(region)[:40]!r}"
            )
        region = region.strip().upper()
        if id_types is not None and "PHONE_SHA256" not in id_types:
            raise MappingsError(f"{where}.phone_region: set, but id_types does not include PHONE_SHA256")

    name = audience_name.strip() if audience_name else (key if create else None)
    if file and name is not None and len(name) > AUDIENCE_NAME_MAX:
        raise MappingsError(
            f"{where}.audience_name: {len(name)} characters; a customer-file audience name has at most "
            f"{AUDIENCE_NAME_MAX}"
        )

    for field in _FILE_ONLY_KEYS:
        if field in raw and not file:
            raise MappingsError(f"{where}.{field}: only for mode: file")
    interval = raw.get("file_interval_s")
    max_rows = raw.get("file_max_rows")
    return AudienceMapping(
        key,
        adv,
        aud,
        name,
        create,
        mode=mode,
        id_types=id_types,
        enabled=enabled,
        phone_region=region,
        file_interval_s=None
        if interval is None
        else _number(interval, f"{where}.file_interval_s", FILE_INTERVAL_MIN_S, FILE_INTERVAL_MAX_S),
        file_max_rows=None if max_rows is None else _count(max_rows, f"{where}.file_max_rows", 1, FILE_MAX_ROWS_MAX),
    )


def parse_mappings(data: object, source: str = "<mappings>") -> Mappings:
    """Validate already-parsed file content (what `load_mappings` does after reading YAML or JSON)."""
    if not isinstance(data, dict):
        raise MappingsError(f"{source}: must be a mapping with a top-level 'audiences' key")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise MappingsError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)} (allowed: {', '.join(_TOP_KEYS)})"
        )
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
    offline = _offline(data["offline_events"], f"{source}: offline_events") if "offline_events" in data else None
    return Mappings(result, source, offline)


_TOP_KEYS: Final = ("audiences", "offline_events")
_OFFLINE_KEYS: Final = ("default_event_set_id", "event_sets", "event_names", "match_keys")


def _offline(raw: object, where: str) -> OfflineSettings:
    """The `offline_events:` section (docs/design.md "Mappings file"); every error names the field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MappingsError(f"{where}: must be a mapping ({', '.join(_OFFLINE_KEYS)})")
    unknown = sorted(str(k) for k in raw if k not in _OFFLINE_KEYS)
    if unknown:
        raise MappingsError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(_OFFLINE_KEYS)})")
    default = raw.get("default_event_set_id")
    default_id = None if default is None else _digits(default, f"{where}.default_event_set_id")
    sets = raw.get("event_sets") or {}
    if not isinstance(sets, dict):
        raise MappingsError(f"{where}.event_sets: must be a mapping of advertiser id to event set id")
    event_sets: dict[str, str] = {}
    for adv, set_id in sets.items():
        adv_id = _digits(adv, f"{where}.event_sets: advertiser id")
        event_sets[adv_id] = _digits(set_id, f"{where}.event_sets.{adv_id}")
    names = raw.get("event_names") or {}
    if not isinstance(names, dict):
        raise MappingsError(f"{where}.event_names: must be a mapping of upstream event name to TikTok event or null")
    for name, target in names.items():
        if not isinstance(name, str) or (target is not None and not isinstance(target, str)):
            raise MappingsError(f"{where}.event_names: {str(name)[:40]!r} must map a name to a TikTok event or null")
    try:
        event_map = build_event_map(names)
    except ValueError as exc:
        raise MappingsError(f"{where}.event_names: {exc}") from None
    keys = raw.get("match_keys")
    enabled = frozenset(MATCH_KEYS)
    if keys is not None:
        if not isinstance(keys, list) or not keys:
            raise MappingsError(f"{where}.match_keys: must be a non-empty list of {', '.join(MATCH_KEYS)}")
        for k in keys:
            if k not in MATCH_KEYS:
                raise MappingsError(
                    f"{where}.match_keys: unknown key {str(k)[:40]!r} (allowed: {', '.join(MATCH_KEYS)})"
                )
        enabled = frozenset(keys)
    return OfflineSettings(
        event_map=event_map, enabled_keys=enabled, event_set_ids=event_sets, default_event_set_id=default_id
    )


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
