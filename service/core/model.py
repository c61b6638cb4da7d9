"""Value types shared by the pure core: what an event becomes, and why it may not become anything.

Everything here is plain data (no I/O), so every stage can be unit-tested with literals.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal, NamedTuple


class Action(StrEnum):
    """TikTok's `segment/mapping` action; Segment's "entered"/"exited" map onto these."""

    ADD = "add"
    DELETE = "delete"


IdType = Literal["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "AAID_SHA256"]

# Fixed column order of `id_schema`: rows align by position, so the order must never depend on input order.
ID_TYPES: Final[tuple[IdType, ...]] = ("EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "AAID_SHA256")


class DlqReason(StrEnum):
    """Stable dead-letter reason codes (docs/design.md "Dead-letter topic"): extend, never rename."""

    INVALID_PAYLOAD = "invalid_payload"
    MISSING_AUDIENCE_ID = "missing_audience_id"
    MISSING_ADVERTISER_ID = "missing_advertiser_id"
    NO_IDENTIFIERS = "no_identifiers"
    TIKTOK_REJECTED = "tiktok_rejected"
    TIKTOK_PERMISSION = "tiktok_permission"
    RETRIES_EXHAUSTED = "retries_exhausted"
    # Offline conversion events (service/core/offline.py, docs/tiktok-api.md §8.4).
    INVALID_EVENT = "invalid_event"
    EVENT_TOO_OLD = "event_too_old"
    MISSING_EVENT_SET_ID = "missing_event_set_id"


class AudienceChange(NamedTuple):
    """One user's membership change in one TikTok audience, identifiers already normalised and hashed.

    `identifiers` holds (id_type, sha256 lowercase hex) pairs in `ID_TYPES` order, at most one per type.
    Immutable like the other outcomes, but a NamedTuple: one is made per record on the hot path, and a frozen
    dataclass's `__init__` costs several times a tuple's.
    """

    advertiser_id: str
    audience_id: str
    action: Action
    identifiers: tuple[tuple[IdType, str], ...]
    audience_key: str | None = None
    event_time_ms: int | None = None

    @property
    def id_schema(self) -> tuple[IdType, ...]:
        ids = self.identifiers
        if len(ids) == 1:  # the common case, on the hot path
            return (ids[0][0],)
        return tuple([t for t, _ in ids])


@dataclass(frozen=True, slots=True)
class Skipped:
    """A record that is not an audience event: counted, offset committed, nothing sent anywhere."""

    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that cannot be synced as it stands: it goes to the dead-letter topic.

    `error` is shown to operators in the `dlq.error` header, so it must name what was looked for and never
    carry a raw identifier.
    """

    reason: DlqReason
    error: str


@dataclass(frozen=True, slots=True)
class AudienceNeeded:
    """The mapping says "create this audience if missing" and it does not exist yet: hold the record until it does."""

    audience_key: str
    advertiser_id: str
    audience_name: str


@dataclass(frozen=True, slots=True)
class MatchError:
    """An identifier that could not be normalised: dropped from the row, counted by type and reason."""

    id_type: str
    reason: str


Outcome = AudienceChange | Skipped | Rejected | AudienceNeeded
