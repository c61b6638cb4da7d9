"""`cover_num` can be pinned per audience, so preflight tests see large and small audiences without uploads."""

from __future__ import annotations

import pytest

from service.devtools.sandbox.state import SandboxState


def test_cover_num_pinned_and_released() -> None:
    s = SandboxState()
    s.register_all(["123"], [("123", "555")])
    summary = s.list_audiences("123", 1, 10)["list"][0]  # type: ignore[index]
    assert summary["cover_num"] == 0 and summary["is_valid"] is False
    s.set_cover_num("555", 5000)
    details = s.get_audiences("123", ["555"])["list"][0]["audience_details"]  # type: ignore[index]
    assert details["cover_num"] == 5000 and details["is_valid"] is True
    s.set_cover_num("555", None)
    assert s.audiences["555"].cover_num == 0


def test_cover_num_rejects_unknown_and_negative() -> None:
    s = SandboxState()
    s.register_all([], [("123", "555")])
    with pytest.raises(KeyError):
        s.set_cover_num("nope", 1)
    with pytest.raises(ValueError):
        s.set_cover_num("555", -1)
