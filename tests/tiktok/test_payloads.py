import orjson

from service.core.batcher import Batcher
from service.core.model import Action, AudienceChange
from service.core.types import RecordRef
from service.tiktok.payloads import mapping_body

EMAIL = "584c4423c421df49955759498a71495aba49b8780eb9387dff333b6f0982c777"  # sha256("testing@testing.com")
PHONE = "c775e7b757ede630cd0aa1113bd102661ab38829ca52a6422ab782862f268646"  # sha256("1234567890")
IDFA = "0315b4020af3eccab7706679580ac87a710d82970733b8719e70af9b57e7b9e6"  # sha256("4242")


def _batch(*changes: AudienceChange):  # type: ignore[no-untyped-def]
    b = Batcher(clock=lambda: 0.0)
    for i, c in enumerate(changes):
        b.add(RecordRef("t", 0, i), c)
    [batch] = b.ready(force=True)
    return batch


def test_body_matches_segments_tiktok_fixture_exactly() -> None:
    # action-destinations tiktok-audiences addToAudience/__tests__/index.test.ts
    change = AudienceChange(
        "123", "12345", Action.ADD, (("EMAIL_SHA256", EMAIL), ("PHONE_SHA256", PHONE), ("IDFA_SHA256", IDFA))
    )
    batch = _batch(change)
    body = mapping_body(batch.advertiser_id, batch.action, batch.id_schema, batch.rows)
    assert orjson.loads(body) == {
        "advertiser_ids": ["123"],
        "action": "add",
        "id_schema": ["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256"],
        "batch_data": [
            [
                {"id": EMAIL, "audience_ids": ["12345"]},
                {"id": PHONE, "audience_ids": ["12345"]},
                {"id": IDFA, "audience_ids": ["12345"]},
            ]
        ],
    }


def test_missing_identifier_is_an_empty_placeholder_in_its_column() -> None:
    """Users with different identifier types share a request: each row has `{}` where it lacks a type."""
    full = AudienceChange("123", "12345", Action.DELETE, (("EMAIL_SHA256", EMAIL), ("PHONE_SHA256", PHONE)))
    email_only = AudienceChange("123", "12345", Action.DELETE, (("EMAIL_SHA256", IDFA),))
    batch = _batch(full, email_only)
    doc = orjson.loads(mapping_body(batch.advertiser_id, batch.action, batch.id_schema, batch.rows))
    assert doc["action"] == "delete"
    assert doc["id_schema"] == ["EMAIL_SHA256", "PHONE_SHA256"]
    assert doc["batch_data"] == [
        [{"id": EMAIL, "audience_ids": ["12345"]}, {"id": PHONE, "audience_ids": ["12345"]}],
        [{"id": IDFA, "audience_ids": ["12345"]}, {}],
    ]


def test_rows_for_several_audiences_of_one_advertiser_share_a_request() -> None:
    a = AudienceChange("123", "1", Action.ADD, (("EMAIL_SHA256", EMAIL),))
    b = AudienceChange("123", "2", Action.ADD, (("EMAIL_SHA256", PHONE),))
    batch = _batch(a, b)
    doc = orjson.loads(mapping_body(batch.advertiser_id, batch.action, batch.id_schema, batch.rows))
    assert [row[0]["audience_ids"] for row in doc["batch_data"]] == [["1"], ["2"]]


def test_text_body_equals_the_dict_form_for_random_batches() -> None:
    import random

    from service.core.model import ID_TYPES

    rng = random.Random(9)
    b = Batcher(clock=lambda: 0.0, max_rows=10_000)
    for i in range(500):
        types = sorted(rng.sample(range(4), rng.randint(1, 4)))
        ids = tuple((ID_TYPES[t], f"{rng.getrandbits(256):064x}") for t in types)
        b.add(RecordRef("t", 0, i), AudienceChange("7000000000000000001", str(rng.randint(1, 5)), Action.DELETE, ids))
    for batch in b.ready(force=True):
        expected = {
            "advertiser_ids": [batch.advertiser_id],
            "action": batch.action.value,
            "id_schema": list(batch.id_schema),
            "batch_data": [
                [
                    {"id": r.cells[t], "audience_ids": [r.change.audience_id]} if t in r.cells else {}
                    for t in batch.id_schema
                ]
                for r in batch.rows
            ],
        }
        body = mapping_body(batch.advertiser_id, batch.action, batch.id_schema, batch.rows)
        assert orjson.loads(body) == expected
        assert len(body) <= sum(r.nbytes for r in batch.rows) + 200, "the byte estimate bounds the real size"
