"""The sample traffic behind `make run`, the tests and the benchmark: its timestamps must be exact."""

import random

from service.core.membership import _iso_ms
from service.devtools.sample import iso_utc_ms


def test_timestamp_round_trips_to_the_millisecond() -> None:
    rng = random.Random(3)
    for _ in range(10_000):
        now = 1_795_310_000 + rng.random() * 86_400
        assert _iso_ms(iso_utc_ms(now)) == int(now * 1000)


def test_seconds_and_milliseconds_come_from_one_reading_across_a_second_boundary() -> None:
    assert iso_utc_ms(1_795_310_608.9996) == "2026-11-22T01:23:28.999Z"
    assert iso_utc_ms(1_795_310_609.0004) == "2026-11-22T01:23:29.000Z"
