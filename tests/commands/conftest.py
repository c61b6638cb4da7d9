"""Fixtures shared by the replay tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.devtools.sample import ADVERTISER_ID
from service.devtools.sandbox import SandboxThread
from tests.commands.test_dlq_inspect import MAPPED, UNMAPPED


@pytest.fixture
def sandbox() -> Iterator[SandboxThread]:
    """The TikTok sandbox with the advertiser and both audiences of the operator fixtures."""
    audiences = [(ADVERTISER_ID, UNMAPPED.audience_id), (ADVERTISER_ID, MAPPED.audience_id)]
    with SandboxThread(host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=audiences) as s:
        yield s
