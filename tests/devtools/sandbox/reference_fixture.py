"""TikTok's addToAudience example (docs/tiktok-api.md §1.4), shared by the sandbox tests."""

from typing import Any

EMAIL = "584c4423c421df49955759498a71495aba49b8780eb9387dff333b6f0982c777"
PHONE = "c775e7b757ede630cd0aa1113bd102661ab38829ca52a6422ab782862f268646"
MAID = "0315b4020af3eccab7706679580ac87a710d82970733b8719e70af9b57e7b9e6"


def fixture_body(action: str = "add") -> dict[str, Any]:
    return {
        "advertiser_ids": ["123"],
        "action": action,
        "id_schema": ["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256"],
        "batch_data": [
            [
                {"id": EMAIL, "audience_ids": ["12345"]},
                {"id": PHONE, "audience_ids": ["12345"]},
                {"id": MAID, "audience_ids": ["12345"]},
            ]
        ],
    }
