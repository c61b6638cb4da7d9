"""A brake on dead-letter floods (arroyo's `DlqLimit` idea).

After a bad mappings deploy every record fails the same way; moving the whole topic into the DLQ would turn a
five-minute fix into a replay. When N records in a row are dead-lettered for the same reason — or, optionally,
more than a share of the last W records (a mapping broken for one audience among healthy ones never makes a run
of N) — the guard trips: the pipeline holds those letters, pauses consumption (lag grows, alerts fire) and waits
for a mappings reload or a cooldown, then re-resolves what it held. Pure: the pipeline feeds it outcomes.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from service.core.model import DlqReason


class DlqGuard:
    def __init__(
        self,
        max_consecutive: int,
        cooldown_s: float,
        clock: Callable[[], float],
        *,
        max_ratio: float = 0.0,
        window: int = 1000,
    ) -> None:
        if not 0.0 <= max_ratio < 1.0:
            raise ValueError(f"max_ratio must be in [0, 1), got {max_ratio}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.max_consecutive = max_consecutive  # 0 disables the run rule
        self.max_ratio = max_ratio  # 0 disables the share rule
        self.window = window
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._runs: Counter[DlqReason] = Counter()
        self._recent: deque[DlqReason | None] = deque()  # last `window` outcomes: a reason, or None for a good one
        self._recent_letters: Counter[DlqReason] = Counter()
        self.tripped_reason: DlqReason | None = None
        self.trip_cause = ""
        self._tripped_at = 0.0

    @property
    def tripped(self) -> bool:
        return self.tripped_reason is not None

    def ok(self) -> None:
        """A record resolved or uploaded fine: every run of failures is broken."""
        if self._runs:
            self._runs.clear()
        if self.max_ratio:
            self._remember(None)

    def failed(self, reason: DlqReason) -> bool:
        """Count a dead letter; True when this one trips the guard (it and later ones are then held)."""
        if self.tripped or (self.max_consecutive <= 0 and not self.max_ratio):
            return self.tripped
        if self.max_consecutive > 0:
            self._runs[reason] += 1
            if self._runs[reason] >= self.max_consecutive:
                return self._trip(reason, f"{self._runs[reason]} records in a row")
        if self.max_ratio:
            self._remember(reason)
            n = self._recent_letters[reason]
            if len(self._recent) >= self.window and n > self.max_ratio * self.window:
                return self._trip(reason, f"{n} of the last {self.window} records")
        return False

    def _remember(self, outcome: DlqReason | None) -> None:
        recent = self._recent
        recent.append(outcome)
        if outcome is not None:
            self._recent_letters[outcome] += 1
        if len(recent) > self.window:
            old = recent.popleft()
            if old is not None:
                self._recent_letters[old] -= 1

    def _trip(self, reason: DlqReason, cause: str) -> bool:
        self.tripped_reason = reason
        self.trip_cause = cause
        self._tripped_at = self._clock()
        return True

    def cooldown_left(self) -> float:
        return 0.0 if not self.tripped else max(0.0, self._tripped_at + self.cooldown_s - self._clock())

    def reset(self) -> None:
        self.tripped_reason = None
        self.trip_cause = ""
        self._runs.clear()
        self._recent.clear()
        self._recent_letters.clear()
