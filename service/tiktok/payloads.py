"""The exact `POST /segment/mapping/` body (docs/tiktok-api.md §1.4).

Rows align by position with `id_schema`; a user without an identifier of a column gets `{}` there.

The body is written as text rather than built as dicts for orjson: it is the largest per-event cost after
decoding. That is safe because every value is already constrained: hashes are lowercase hex (identifiers.py),
id types come from a closed set, and ids are JSON-encoded once each.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from service.core.batcher import Row
from service.core.model import Action, IdType


def mapping_body(advertiser_id: str, action: Action, id_schema: Sequence[IdType], rows: Sequence[Row]) -> bytes:
    tails: dict[str, str] = {}  # audience id → the end of its cells, JSON-encoded once
    out: list[str] = []
    only = id_schema[0] if len(id_schema) == 1 else None  # one column: every row has it (rows are never empty)
    for row in rows:
        aud = row.change.audience_id
        tail = tails.get(aud)
        if tail is None:
            tail = tails[aud] = '","audience_ids":' + orjson.dumps([aud]).decode() + "}"
        cells = row.cells
        if only is not None:
            out.append('[{"id":"' + cells[only] + tail + "]")
        else:
            out.append("[" + ",".join('{"id":"' + cells[t] + tail if t in cells else "{}" for t in id_schema) + "]")
    head = (
        '{"advertiser_ids":'
        + orjson.dumps([advertiser_id]).decode()
        + ',"action":"'
        + action.value
        + '","id_schema":'
        + orjson.dumps(list(id_schema)).decode()
        + ',"batch_data":['
    )
    return (head + ",".join(out) + "]}").encode()
