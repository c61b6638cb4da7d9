"""Resolve a decoded event into an `AudienceChange` (hashed identifiers), `Skipped` or `Rejected`.

`Resolver.process` is the single entry point of the front half of the pure core. It never raises for any
input bytes except `SchemaNotLoaded` (the I/O edge fetches the schema and retries), because one bad record
must not stop a partition: it becomes a dead letter with an operator-readable reason instead.

Resolution order (docs/design.md "Input events"):
- audience id: explicit field (canonical `audience_id`; Segment `properties.external_audience_id` on track,
  `traits.external_audience_id` on identify) → `context.personas.external_audience_id` → MAPPINGS_FILE entry
  of the audience key (canonical `audience_key`; Segment `context.personas.computation_key`, else
  `properties.audience_key` / `traits.audience_key`).
- advertiser id: explicit field (canonical `advertiser_id`; Segment `properties.advertiser_id` /
  `traits.advertiser_id`) → `context.personas.audience_settings.advertiserId` → MAPPINGS_FILE entry →
  DEFAULT_ADVERTISER_ID.
Segment's `properties.audience_id` is deliberately not read: Engage ids there look like "aud_..." and are not
TikTok ids.

When several things are wrong, the reported reason is the first of: invalid_payload, no_identifiers,
missing_audience_id, missing_advertiser_id, so a record is only sent to operators for a mapping fix when the
fix will make it go through.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

from service.core.events import SEGMENT, Undecodable, decode_event
from service.core.file_batcher import FileChange
from service.core.identifiers import hash_ad_id, hash_email, hash_phone, is_supported_region
from service.core.mappings import AudienceMapping, Mappings
from service.core.model import (
    ID_TYPES,
    Action,
    AudienceChange,
    AudienceNeeded,
    DlqReason,
    IdType,
    MatchError,
    Rejected,
    Skipped,
)
from service.core.offline import OfflineEvent, OfflineParser, OfflineSettings, is_canonical_offline
from service.core.schemas import SchemaNotLoaded, SchemaStore
from service.core.types import new_tuple

NOT_AUDIENCE_EVENT: Final = Skipped("not_audience_event")

_AUDIENCE_CLASSES: Final = ("audience", "journey_step")  # a tuple: `in` must not hash arbitrary JSON values
_EMPTY: Final[dict[str, Any]] = {}
_ID_CACHE_SIZE: Final = 10_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_INVALID = DlqReason.INVALID_PAYLOAD
_ACTIONS: Final = {"add": Action.ADD, "delete": Action.DELETE}
_JSON_NAMES: Final[dict[type, str]] = {
    list: "an array",
    dict: "an object",
    float: "a non-integer number",
    bool: "a boolean",
    str: "a string",
}


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    """The environment-driven knobs of resolution (validated by `Resolver`, so bad config fails at startup)."""

    enter_event_names: tuple[str, ...] = ("Audience Entered",)
    exit_event_names: tuple[str, ...] = ("Audience Exited",)
    default_advertiser_id: str | None = None
    phone_default_region: str = "US"
    send_email: bool = True
    send_phone: bool = True
    send_idfa: bool = True
    send_aaid: bool = True
    max_record_bytes: int = 1_048_576


class Processed(NamedTuple):
    """What the pipeline needs per record: the outcome, match errors to count, and the format for metrics."""

    outcome: AudienceChange | Skipped | Rejected | AudienceNeeded | OfflineEvent | FileChange
    match_errors: tuple[MatchError, ...]
    event_format: str  # "segment" | "canonical_json" | "canonical_avro" | "confluent_avro" | "unknown"


def _is_digits(text: str) -> bool:
    return text.isdigit() and text.isascii()


def _tiktok_id(value: object, field: str) -> str | Rejected | None:
    """A digit string or non-negative int from JSON/Avro; None when absent. Never echoes the value."""
    if value is None:
        return None
    if type(value) is str:
        text = value.strip()
        if not text:
            return None
        if _is_digits(text):
            return text
        return Rejected(_INVALID, f"{field} must be a TikTok id (digits only), got a non-numeric string")
    if type(value) is int and value >= 0:
        return str(value)
    kind = "a negative number" if type(value) is int else _JSON_NAMES.get(type(value), type(value).__name__)
    return Rejected(_INVALID, f"{field} must be a TikTok id (digits only), got {kind}")


def _present(value: object) -> bool:
    return value is not None and not (type(value) is str and not value.strip())


def _first(a: object, b: object, c: object) -> object:
    if _present(a):
        return a
    if _present(b):
        return b
    return c


def _iso_ms(value: object) -> int | None:
    if type(value) is not str:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS


def _canonical_time(value: object) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, datetime):  # resolved Confluent records keep the writer's timestamp logical type
        return ((value if value.tzinfo else value.replace(tzinfo=UTC)) - _EPOCH) // _MS
    return _iso_ms(value)


def _dict(value: object) -> dict[str, Any]:
    return value if type(value) is dict else _EMPTY


class Resolver:
    """Decode → resolve membership, audience, advertiser → normalise and hash identifiers; or an offline event.

    `mappings` is a plain attribute so a reloaded mappings file can be swapped in between records; the offline
    settings used are always those of the current mappings (`Mappings.offline`), else `offline`, else none.

    Routing (invariant: neither kind is ever mistaken for the other): a canonical offline record (JSON with
    `offline_event` and no membership key, Avro of the offline schema) is always parsed as an offline event
    (unconfigured, it dead-letters `missing_event_set_id`); a Segment `track` event without `context.personas`
    is an offline event only while offline events are enabled (an event set is configured), else
    `not_audience_event` as before; Segment events with `context.personas` are always membership events.
    """

    def __init__(
        self,
        settings: ResolverSettings,
        mappings: Mappings,
        schemas: SchemaStore,
        *,
        offline: OfflineSettings | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not is_supported_region(settings.phone_default_region):
            raise ValueError(f"PHONE_DEFAULT_REGION: unknown region {settings.phone_default_region!r}")
        both = set(settings.enter_event_names) & set(settings.exit_event_names)
        if both:
            raise ValueError(f"event name(s) {sorted(both)} are both enter and exit names")
        default = settings.default_advertiser_id
        if default is not None and not _is_digits(default):
            raise ValueError("DEFAULT_ADVERTISER_ID must be a TikTok advertiser id (digits only)")
        if settings.max_record_bytes <= 0:
            raise ValueError("max_record_bytes must be positive")
        self.settings = settings
        self.mappings = mappings
        self.offline = offline
        self._wall = wall
        self._offline_for: object = ()  # the settings object `_offline_parser` was built for
        self._offline_parser: OfflineParser | None = None
        self._offline_enabled = False
        # (advertiser id, audience name) → id of an audience created on demand; shared with the audience store.
        self.created_audiences: Mapping[tuple[str, str], str] = {}
        self._schemas = schemas
        self._ids: dict[str, str] = {}  # raw id string → validated TikTok id (`_id`)
        self._enter = frozenset(settings.enter_event_names)
        self._exit = frozenset(settings.exit_event_names)
        self._default_advertiser = default
        self._region = settings.phone_default_region
        self._max_bytes = settings.max_record_bytes
        self._email = settings.send_email
        self._phone = settings.send_phone
        self._idfa = settings.send_idfa
        self._aaid = settings.send_aaid
        disabled = [
            t
            for t, on in zip(
                ID_TYPES,
                (self._email, self._phone, self._idfa, self._aaid),
                strict=True,
            )
            if not on
        ]
        self._disabled_note = f"; not sending {', '.join(disabled)} (settings)" if disabled else ""
        segment_fields = []
        if self._email:
            segment_fields += ["context.traits.email", "traits.email", "properties.email"]
        if self._phone:
            segment_fields += ["context.traits.phone", "traits.phone", "properties.phone"]
        if self._idfa or self._aaid:
            segment_fields.append("context.device.advertisingId")
        self._segment_fields = ", ".join(segment_fields) or "nothing"
        canonical_fields = [
            name
            for name, on in zip(
                ("email", "phone", "idfa", "aaid"),
                (self._email, self._phone, self._idfa, self._aaid),
                strict=True,
            )
            if on
        ]
        self._canonical_fields = ", ".join(canonical_fields) or "nothing"

    def process(self, value: bytes | None, headers: list[tuple[str, bytes | None]] | None) -> Processed:
        """One record → outcome; raises only `SchemaNotLoaded`."""
        fmt = "unknown"
        try:
            decoded = decode_event(value, headers, self._schemas, self._max_bytes)
            fmt = decoded.format
            if isinstance(decoded, Undecodable):
                return Processed(Rejected(_INVALID, decoded.error), (), fmt)
            data = decoded.data
            if fmt == SEGMENT:
                if data.get("type") == "track" and "personas" not in _dict(data.get("context")):
                    parser = self._offline()
                    if self._offline_enabled:
                        parsed = parser.parse(data, now=self._wall())
                        return Processed(parsed.outcome, parsed.match_errors, fmt)
                outcome, errors = self._segment(data)
            elif "offline_event" in data and is_canonical_offline(data):
                parsed = self._offline().parse(data, now=self._wall())
                return Processed(parsed.outcome, parsed.match_errors, fmt)
            else:
                outcome, errors = self._canonical(data)
            return new_tuple(Processed, (outcome, errors, fmt))
        except SchemaNotLoaded:
            raise
        except Exception as exc:  # last line of defence: a bug must dead-letter one record, not stop the partition
            return Processed(Rejected(_INVALID, f"event could not be processed ({type(exc).__name__})"), (), fmt)

    def _offline(self) -> OfflineParser:
        """The parser for the current mappings' offline settings (rebuilt only when they change)."""
        settings = self.mappings.offline or self.offline
        if settings is not self._offline_for or self._offline_parser is None:
            base = settings or OfflineSettings()
            self._offline_parser = OfflineParser(replace(base, phone_default_region=self._region))
            self._offline_enabled = settings is not None and bool(
                settings.default_event_set_id or settings.event_set_ids
            )
            self._offline_for = settings
        return self._offline_parser

    # -- Segment Engage --------------------------------------------------------------------------------------

    def _segment(
        self, ev: dict[str, Any]
    ) -> tuple[AudienceChange | Skipped | Rejected | AudienceNeeded | FileChange, tuple[MatchError, ...]]:
        etype = ev.get("type")
        if etype == "track":
            bag_name = "properties"
        elif etype == "identify":
            bag_name = "traits"
        else:
            return NOT_AUDIENCE_EVENT, ()
        context = ev.get("context")
        if type(context) is not dict:
            return NOT_AUDIENCE_EVENT, ()
        personas = context.get("personas")
        if type(personas) is not dict:
            return NOT_AUDIENCE_EVENT, ()
        computation_class = personas.get("computation_class")
        # Absent is accepted (Segment's own TikTok fixtures omit it); another class (e.g. "trait") is not.
        if computation_class is not None and computation_class not in _AUDIENCE_CLASSES:
            return NOT_AUDIENCE_EVENT, ()
        properties = _dict(ev.get("properties"))
        traits = _dict(ev.get("traits"))
        bag = properties if bag_name == "properties" else traits

        key = personas.get("computation_key")
        if type(key) is not str or not key:
            key = None
        membership = bag.get(key) if key is not None else None
        if membership is True:
            action = Action.ADD
        elif membership is False:
            action = Action.DELETE
        else:
            name = ev.get("event")
            if type(name) is not str:
                return NOT_AUDIENCE_EVENT, ()
            if name in self._enter:
                action = Action.ADD
            elif name in self._exit:
                action = Action.DELETE
            else:
                return NOT_AUDIENCE_EVENT, ()
        audience_key = key
        if audience_key is None:
            fallback = bag.get("audience_key")
            if type(fallback) is str and fallback:
                audience_key = fallback

        # Ids: explicit → personas → mappings (→ default for the advertiser).
        explicit_aud = self._id(bag.get("external_audience_id"), bag_name, ".external_audience_id")
        if isinstance(explicit_aud, Rejected):
            return explicit_aud, ()
        personas_aud = self._id(personas.get("external_audience_id"), "context.personas", ".external_audience_id")
        if isinstance(personas_aud, Rejected):
            return personas_aud, ()
        explicit_adv = self._id(bag.get("advertiser_id"), bag_name, ".advertiser_id")
        if isinstance(explicit_adv, Rejected):
            return explicit_adv, ()
        settings = personas.get("audience_settings")
        personas_adv = None
        segment_type: IdType | None = None
        if type(settings) is dict:
            personas_adv = self._id(settings.get("advertiserId"), "context.personas.audience_settings", ".advertiserId")
            id_type = settings.get("idType")
            if id_type is not None:
                segment_type = _SEGMENT_ID_TYPES.get(id_type) if type(id_type) is str else None
        if isinstance(personas_adv, Rejected):
            return personas_adv, ()

        # Identifiers.
        ctx_traits = _dict(context.get("traits"))
        email = phone = idfa = aaid = None
        if self._email:
            email = ctx_traits.get("email")
            if not _present(email):
                email = _first(None, traits.get("email"), properties.get("email"))
        if self._phone:
            phone = ctx_traits.get("phone")
            if not _present(phone):
                phone = _first(None, traits.get("phone"), properties.get("phone"))
        if self._idfa or self._aaid:
            device = context.get("device")
            if type(device) is dict:
                ad_id = device.get("advertisingId")
                if ad_id is not None:
                    device_type = device.get("type")
                    if device_type is None:  # some SDKs only fill context.os.name
                        device_type = _dict(context.get("os")).get("name")
                    if type(device_type) is str and device_type.lower() == "android":
                        aaid = ad_id if self._aaid else None
                    elif self._idfa:
                        idfa = ad_id
        mapping = self.mappings.get(audience_key) if audience_key is not None else None
        hashed = self._entry_identifiers(mapping, email, phone, idfa, aaid)
        if isinstance(hashed, Skipped):
            return hashed, ()
        identifiers, errors = hashed
        if segment_type is not None and (mapping is None or mapping.id_types is None):
            # Segment's audience "ID Type" (audience_settings.idType); the mappings entry's id_types wins.
            identifiers = _contract(identifiers, (segment_type,))
            if not identifiers:
                return self._no_identifiers(
                    self._segment_fields + f"; context.personas.audience_settings.idType sends only {segment_type}",
                    errors,
                    mapping,
                ), errors
        if not identifiers:
            return self._no_identifiers(self._segment_fields, errors, mapping), errors

        audience_id = explicit_aud or personas_aud
        if audience_id is None:
            audience_id = mapping.audience_id if mapping is not None else None
            if audience_id is None and not _creatable(mapping):
                looked = f"{bag_name}.external_audience_id (absent), context.personas.external_audience_id (absent)"
                return self._missing_audience(audience_key, looked, True, mapping is not None), errors
        advertiser_id = explicit_adv or personas_adv
        if advertiser_id is None:
            advertiser_id = mapping.advertiser_id if mapping is not None else None
            if advertiser_id is None:
                advertiser_id = self._default_advertiser
                if advertiser_id is None:
                    looked = (
                        f"{bag_name}.advertiser_id (absent), context.personas.audience_settings.advertiserId (absent)"
                    )
                    return self._missing_advertiser(audience_key, looked, mapping is not None), errors
        event_time = _iso_ms(ev.get("timestamp"))
        if event_time is None:
            event_time = _iso_ms(ev.get("originalTimestamp"))
        if mapping is not None and mapping.mode == "file":
            return self._file_change(mapping, advertiser_id, audience_id, action, identifiers, event_time), errors
        if audience_id is None:
            created = self._created_audience(mapping, audience_key, advertiser_id)
            if not isinstance(created, str):
                return created, errors
            audience_id = created
        return new_tuple(
            AudienceChange, (advertiser_id, audience_id, action, identifiers, audience_key, event_time)
        ), errors

    # -- canonical event (JSON or Avro) ----------------------------------------------------------------------

    def _canonical(
        self, ev: dict[str, Any]
    ) -> tuple[AudienceChange | Skipped | Rejected | AudienceNeeded | FileChange, tuple[MatchError, ...]]:
        audience_key = ev.get("audience_key")
        if type(audience_key) is not str or not audience_key:
            return Rejected(_INVALID, 'canonical event: "audience_key" must be a non-empty string'), ()
        action_value = ev.get("action")
        action = _ACTIONS.get(action_value) if type(action_value) is str else None
        if action is None:
            return Rejected(_INVALID, 'canonical event: "action" must be "add" or "delete"'), ()
        explicit_aud = _tiktok_id(ev.get("audience_id"), "audience_id")
        if isinstance(explicit_aud, Rejected):
            return explicit_aud, ()
        explicit_adv = _tiktok_id(ev.get("advertiser_id"), "advertiser_id")
        if isinstance(explicit_adv, Rejected):
            return explicit_adv, ()

        mapping = self.mappings.get(audience_key)
        hashed = self._entry_identifiers(
            mapping,
            ev.get("email") if self._email else None,
            ev.get("phone") if self._phone else None,
            ev.get("idfa") if self._idfa else None,
            ev.get("aaid") if self._aaid else None,
        )
        if isinstance(hashed, Skipped):
            return hashed, ()
        identifiers, errors = hashed
        if not identifiers:
            return self._no_identifiers(self._canonical_fields, errors, mapping), errors

        audience_id = explicit_aud
        if audience_id is None:
            audience_id = mapping.audience_id if mapping is not None else None
            if audience_id is None and not _creatable(mapping):
                return self._missing_audience(audience_key, "audience_id (absent)", False, mapping is not None), errors
        advertiser_id = explicit_adv
        if advertiser_id is None:
            advertiser_id = mapping.advertiser_id if mapping is not None else None
            if advertiser_id is None:
                advertiser_id = self._default_advertiser
                if advertiser_id is None:
                    return self._missing_advertiser(audience_key, "advertiser_id (absent)", mapping is not None), errors
        event_time = _canonical_time(ev.get("event_time"))
        if mapping is not None and mapping.mode == "file":
            return self._file_change(mapping, advertiser_id, audience_id, action, identifiers, event_time), errors
        if audience_id is None:
            created = self._created_audience(mapping, audience_key, advertiser_id)
            if not isinstance(created, str):
                return created, errors
            audience_id = created
        return new_tuple(
            AudienceChange, (advertiser_id, audience_id, action, identifiers, audience_key, event_time)
        ), errors

    # -- shared ----------------------------------------------------------------------------------------------

    def _entry_identifiers(
        self, mapping: AudienceMapping | None, email: object, phone: object, idfa: object, aaid: object
    ) -> Skipped | tuple[tuple[tuple[IdType, str], ...], tuple[MatchError, ...]]:
        """The hashed identifiers the mappings entry sends (`id_types`, `phone_region`), or why it takes none."""
        region = self._region
        if mapping is not None and mapping.restricts:
            skip = _entry_skip(mapping)
            if skip is not None:
                return skip
            region = mapping.effective_phone_region(region)
        identifiers, errors = self._hash(email, phone, idfa, aaid, region)
        if mapping is not None and mapping.id_types is not None:
            identifiers = _contract(identifiers, mapping.id_types)
        return identifiers, errors

    def _hash(
        self, email: object, phone: object, idfa: object, aaid: object, region: str
    ) -> tuple[tuple[tuple[IdType, str], ...], tuple[MatchError, ...]]:
        """Hashed identifiers in `ID_TYPES` order, and the ones dropped as invalid."""
        ids: list[tuple[IdType, str]] = []
        errors: list[MatchError] = []
        if email is not None:
            result = hash_email(email)
            if isinstance(result, str):
                ids.append(("EMAIL_SHA256", result))
            elif result is not None:
                errors.append(result)
        if phone is not None:
            result = hash_phone(phone, region)
            if isinstance(result, str):
                ids.append(("PHONE_SHA256", result))
            elif result is not None:
                errors.append(result)
        if idfa is not None:
            result = hash_ad_id(idfa, "IDFA_SHA256")
            if isinstance(result, str):
                ids.append(("IDFA_SHA256", result))
            elif result is not None:
                errors.append(result)
        if aaid is not None:
            result = hash_ad_id(aaid, "AAID_SHA256")
            if isinstance(result, str):
                ids.append(("AAID_SHA256", result))
            elif result is not None:
                errors.append(result)
        return tuple(ids), tuple(errors)

    def _id(self, value: object, where: str, field: str) -> str | Rejected | None:
        """`_tiktok_id` of `where + field`, with valid string ids remembered: the same few ids recur on every
        record, and the field name is built only for an error message."""
        if value is None:
            return None
        if type(value) is str:
            hit = self._ids.get(value)
            if hit is not None:
                return hit
        result = _tiktok_id(value, where + field)
        if type(value) is str and type(result) is str and len(self._ids) < _ID_CACHE_SIZE:
            self._ids[value] = result
        return result

    def _no_identifiers(
        self, fields: str, errors: tuple[MatchError, ...], mapping: AudienceMapping | None = None
    ) -> Rejected:
        if errors:
            dropped = ", ".join(f"{e.id_type}: {e.reason}" for e in errors)
            detail = f"{len(errors)} dropped as invalid ({dropped})"
        else:
            detail = "none present"
        contract = ""
        if mapping is not None and mapping.id_types is not None:
            contract = (
                f"; MAPPINGS_FILE entry audiences.{_short(mapping.audience_key)}.id_types sends only "
                f"{', '.join(mapping.id_types)}"
            )
        return Rejected(
            DlqReason.NO_IDENTIFIERS,
            f"no usable identifier: looked at {fields}; {detail}{self._disabled_note}{contract}",
        )

    def _mapping_status(self, has_entry: bool, field: str) -> str:
        if has_entry:
            return f"entry has no {field}"
        if self.mappings.source is None:
            return "no MAPPINGS_FILE configured"
        return f"no entry in {self.mappings.source}"

    def _file_change(
        self,
        mapping: AudienceMapping,
        advertiser_id: str,
        audience_id: str | None,
        action: Action,
        identifiers: tuple[tuple[IdType, str], ...],
        event_time: int | None,
    ) -> FileChange:
        """A `mode: file` entry's record: netted and uploaded as files (service/core/file_batcher.py), not streamed.

        Without an audience id, the audience created on demand is named `audience_name` (the key by default);
        its id, once recorded, is found as for streaming audiences.
        """
        contract = mapping.contract
        assert contract is not None  # parse_mappings: a file entry names exactly one id type
        name = mapping.effective_audience_name
        if audience_id is None and name is not None:
            audience_id = self.created_audiences.get((advertiser_id, name))
        return FileChange(
            advertiser_id,
            mapping.audience_key,
            audience_id,
            name,
            contract,
            action,
            identifiers,
            event_time,
            mapping.file_interval_s,
            mapping.file_max_rows,
        )

    def _created_audience(
        self, mapping: AudienceMapping | None, audience_key: str | None, advertiser_id: str
    ) -> str | AudienceNeeded:
        """The id of an audience created on demand, or what to create (the record waits for it)."""
        assert mapping is not None and mapping.audience_name is not None and audience_key is not None
        known = self.created_audiences.get((advertiser_id, mapping.audience_name))
        if known is not None:
            return known
        return AudienceNeeded(audience_key, advertiser_id, mapping.audience_name)

    def _missing_audience(self, audience_key: str | None, looked: str, segment: bool, has_entry: bool) -> Rejected:
        fix_event = "set external_audience_id in Segment" if segment else "set audience_id in the event"
        if audience_key is None:
            return Rejected(
                DlqReason.MISSING_AUDIENCE_ID,
                f"no TikTok audience id: looked for {looked}, and there is no audience key "
                "(context.personas.computation_key, properties.audience_key) to look up in MAPPINGS_FILE; "
                f"{fix_event}, then replay",
            )
        key = _short(audience_key)
        entry = self.mappings.get(audience_key)
        if entry is not None and entry.create_if_missing:
            return Rejected(
                DlqReason.MISSING_AUDIENCE_ID,
                f'no TikTok audience id for audience_key "{key}": MAPPINGS_FILE entry audiences.{key} '
                "is create_if_missing; audience creation is not available yet: create the audience in TikTok "
                f"and set audiences.{key}.audience_id (or {fix_event}), then replay",
            )
        status = self._mapping_status(has_entry, "audience_id")
        return Rejected(
            DlqReason.MISSING_AUDIENCE_ID,
            f'no TikTok audience id for audience_key "{key}": looked for {looked} and '
            f"MAPPINGS_FILE entry audiences.{key}.audience_id ({status}); "
            f"add the mapping or {fix_event}, then replay",
        )

    def _missing_advertiser(self, audience_key: str | None, looked: str, has_entry: bool) -> Rejected:
        if audience_key is not None:
            key = _short(audience_key)
            subject = f'for audience_key "{key}"'
            status = self._mapping_status(has_entry, "advertiser_id")
            mapping = f"MAPPINGS_FILE entry audiences.{key}.advertiser_id ({status})"
        else:
            subject = "for this event"
            mapping = "MAPPINGS_FILE (no audience key to look up)"
        return Rejected(
            DlqReason.MISSING_ADVERTISER_ID,
            f"no TikTok advertiser id {subject}: looked for {looked}, {mapping} and DEFAULT_ADVERTISER_ID "
            "(not set); add advertiser_id to the mapping or set DEFAULT_ADVERTISER_ID, then replay",
        )


DISABLED_AUDIENCE: Final = Skipped("audience_disabled")

# Segment's TikTok Audiences "ID Type" audience setting → the identifier type it sends (GAID is TikTok's AAID);
# any other value is ignored rather than guessed at.
_SEGMENT_ID_TYPES: Final[Mapping[str, IdType]] = {
    "EMAIL_SHA256": "EMAIL_SHA256",
    "PHONE_SHA256": "PHONE_SHA256",
    "IDFA_SHA256": "IDFA_SHA256",
    "AAID_SHA256": "AAID_SHA256",
    "GAID_SHA256": "AAID_SHA256",
}


def _entry_skip(mapping: AudienceMapping) -> Skipped | None:
    """A mappings entry that takes no records: `enabled: false` pauses the entry by skipping its records (counted
    as `audience_disabled`; they are not replayable: re-enable, and a `refresh` or the next events bring the
    audience up to date)."""
    return None if mapping.enabled else DISABLED_AUDIENCE


def _contract(
    identifiers: tuple[tuple[IdType, str], ...], allowed: tuple[IdType, ...]
) -> tuple[tuple[IdType, str], ...]:
    """Only the identifier types the entry's `id_types` names (its data contract)."""
    return tuple([p for p in identifiers if p[0] in allowed])


def _creatable(mapping: AudienceMapping | None) -> bool:
    return mapping is not None and mapping.create_if_missing and bool(mapping.audience_name)


def _short(text: str, limit: int = 120) -> str:
    """Audience keys are operator-chosen names, but cap them: a header must stay small."""
    return text if len(text) <= limit else text[:limit] + "..."
