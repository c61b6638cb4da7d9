"""A brake on dead-letter floods (arroyo's `DlqLimit` idea).

After a bad mappings deploy every record fails the same way; moving the whole topic into the DLQ would turn a
five-minute fix into a replay. When N records in a row are dead-lettered for the same reason, the guard trips:
the pipeline holds those letters, pauses consumption (lag grows, alerts fire) and waits for a mappings reload
or a cooldown, then re-resolves what it held. Pure: the pipeline feeds it outcomes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from .model import DlqReason


class DlqGuard:
    def __init__(self, max_consecutive: int, cooldown_s: float, clock: Callable[[], float]) -> None:
        self.max_consecutive = max_consecutive  # 0 disables the guard
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._runs: Counter[DlqReason] = Counter()
        self.tripped_reason: DlqReason | None = None
        self._tripped_at = 0.0

    @property
    def tripped(self) -> bool:
        return self.tripped_reason is not None

    def ok(self) -> None:
        """A record resolved or uploaded fine: every run of failures is broken."""
        if self._runs:
            self._runs.clear()

    def failed(self, reason: DlqReason) -> bool:
        """Count a dead letter; True when this one trips the guard (it and later ones are then held)."""
        if self.max_consecutive <= 0 or self.tripped:
            return self.tripped
        self._runs[reason] += 1
        if self._runs[reason] >= self.max_consecutive:
            self.tripped_reason = reason
            self._tripped_at = self._clock()
            return True
        return False

    def cooldown_left(self) -> float:
        return 0.0 if not self.tripped else max(0.0, self._tripped_at + self.cooldown_s - self._clock())

    def reset(self) -> None:
        self.tripped_reason = None
        self._runs.clear()
