"""The exact `POST /segment/mapping/` body (reference/tiktok-api.md §1.4).

Rows align by position with `id_schema`; a user without an identifier of a column gets `{}` there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ..batcher import Row
from ..model import Action, IdType

_EMPTY: dict[str, Any] = {}


def mapping_body(advertiser_id: str, action: Action, id_schema: Sequence[IdType], rows: Sequence[Row]) -> bytes:
    batch_data = []
    for row in rows:
        aud = [row.change.audience_id]
        cells = row.cells
        batch_data.append([{"id": cells[t], "audience_ids": aud} if t in cells else _EMPTY for t in id_schema])
    return orjson.dumps(
        {
            "advertiser_ids": [advertiser_id],
            "action": action.value,
            "id_schema": list(id_schema),
            "batch_data": batch_data,
        }
    )
