"""Fault plan of the TikTok sandbox: which request gets which failure, decided before any validation.

Pure and seedable (`random.Random(seed)`, times passed in), so a test that injects "30 % of calls fail" sees
the same sequence on every run. JSON shape, either a bare list of rules or an object:

    {"seed": 7, "rate_limit_qps": 50, "rate_limit_qpm": 600, "quota_pause_s": 300, "rate_limit_path": "*",
     "rules": [{"kind": "code", "code": 40100, "probability": 0.3, "count": 5, "advertiser_id": "123"},
               {"kind": "http", "status": 502, "html": true}, {"kind": "slow", "delay_s": 0.5},
               {"kind": "timeout"}, {"kind": "reset", "path": "*"}]}

`path` is relative to `/open_api/v1.3` (default `/segment/mapping/`; `*` matches every TikTok path). The first
rule that matches and fires wins; the rate limit is checked only when no rule fired.

The rate limit models TikTok's per-app budget (docs/tiktok-api.md §8.1): at most `rate_limit_qps` requests in
any 1 s window and `rate_limit_qpm` in any 60 s window on `rate_limit_path`; a refused request gets 40100 and
does not count. Overrunning the minute budget pauses the app: every request on the path is refused for
`quota_pause_s` (TikTok: 5 minutes). `refused` counts refusals by cause, so tests can show a client stays under.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, cast, get_args

from service.devtools.sandbox.state import CODE_MESSAGES, REQUEST_TOO_FREQUENT

FaultKind = Literal["code", "http", "slow", "timeout", "reset"]
FAULT_KINDS: Final = frozenset(get_args(FaultKind))
MAPPING_PATH: Final = "/segment/mapping/"
ANY_PATH: Final = "*"
TIMEOUT_DELAY_S: Final = 3600.0
RATE_LIMIT_MESSAGE: Final = CODE_MESSAGES[REQUEST_TOO_FREQUENT]

_RULE_KEYS: Final = frozenset(
    {"kind", "path", "probability", "count", "advertiser_id", "code", "status", "html", "delay_s", "message"}
    | {"retry_after_s"}
    | {"fired"}  # ignored: lets a plan read from GET /_sandbox/faults be posted back
)
_PLAN_KEYS: Final = frozenset(
    {"rules", "seed", "rate_limit_qps", "rate_limit_qpm", "quota_pause_s", "rate_limit_path"}
    | {"refused"}  # ignored, like a rule's `fired`
)
QUOTA_PAUSE_S: Final = 300.0


def _num(d: Mapping[str, object], key: str, default: float | None) -> float | None:
    value = d.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"fault rule {key}: must be a number")
    return float(value)


def _int(d: Mapping[str, object], key: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"fault rule {key}: must be an integer")
    return value


def _opt_str(d: Mapping[str, object], key: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"fault rule {key}: must be a string")
    return value


@dataclass(slots=True)
class FaultRule:
    """One kind of failure; `fired` counts how often it hit, which `count` caps."""

    kind: FaultKind
    path: str = MAPPING_PATH
    probability: float = 1.0
    count: int | None = None
    advertiser_id: str | None = None
    code: int | None = None
    status: int | None = None
    html: bool = False
    delay_s: float | None = None
    message: str | None = None
    retry_after_s: float | None = None  # sent as a `Retry-After` header with `code` and `http` answers
    fired: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault rule kind: must be one of {', '.join(sorted(FAULT_KINDS))}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("fault rule probability: must be between 0 and 1")
        if self.count is not None and self.count < 0:
            raise ValueError("fault rule count: must be >= 0")
        if self.kind == "code" and self.code is None:
            raise ValueError("fault rule of kind code: needs code")
        if self.kind == "http":
            if self.status is None:
                if not self.html:
                    raise ValueError("fault rule of kind http: needs status (or html: true)")
                self.status = 502
            if not 100 <= self.status <= 599:
                raise ValueError("fault rule status: must be an HTTP status")
        if self.kind == "slow" and (self.delay_s is None or self.delay_s < 0):
            raise ValueError("fault rule of kind slow: needs delay_s >= 0")
        if self.kind == "timeout" and self.delay_s is None:
            self.delay_s = TIMEOUT_DELAY_S

    @classmethod
    def from_dict(cls, d: object) -> FaultRule:
        if not isinstance(d, dict):
            raise ValueError("fault rule: must be an object")
        unknown = set(d) - _RULE_KEYS
        if unknown:  # a typo must not silently disable a fault a test relies on
            raise ValueError(f"fault rule: unknown field {sorted(unknown)[0]}")
        kind = d.get("kind")
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault rule kind: must be one of {', '.join(sorted(FAULT_KINDS))}")
        html = d.get("html", False)
        if not isinstance(html, bool):
            raise ValueError("fault rule html: must be a boolean")
        probability = _num(d, "probability", 1.0)
        return cls(
            kind=cast(FaultKind, kind),
            path=_opt_str(d, "path") or MAPPING_PATH,
            probability=1.0 if probability is None else probability,
            count=_int(d, "count"),
            advertiser_id=_opt_str(d, "advertiser_id"),
            code=_int(d, "code"),
            status=_int(d, "status"),
            html=html,
            delay_s=_num(d, "delay_s", None),
            message=_opt_str(d, "message"),
            retry_after_s=_num(d, "retry_after_s", None),
        )

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "path": self.path, "probability": self.probability}
        for key in ("count", "advertiser_id", "code", "status", "delay_s", "message", "retry_after_s"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.html:
            out["html"] = True
        out["fired"] = self.fired
        return out

    def matches(self, path: str, advertiser_ids: Sequence[str]) -> bool:
        if self.path not in (ANY_PATH, path):
            return False
        if self.count is not None and self.fired >= self.count:
            return False
        return self.advertiser_id is None or self.advertiser_id in advertiser_ids


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do to one request; `source` names the rule (`rules[i]`) or `rate_limit`."""

    kind: FaultKind
    source: str
    code: int | None = None
    message: str | None = None
    status: int | None = None
    html: bool = False
    delay_s: float | None = None
    retry_after_s: float | None = None

    @property
    def tiktok_message(self) -> str:
        if self.message is not None:
            return self.message
        return CODE_MESSAGES.get(self.code or 0, "Error.")


class FaultPlan:
    """Ordered fault rules plus an optional sliding-window rate limit."""

    def __init__(
        self,
        rules: Iterable[FaultRule] = (),
        *,
        rate_limit_qps: float | None = None,
        rate_limit_qpm: float | None = None,
        quota_pause_s: float = QUOTA_PAUSE_S,
        rate_limit_path: str = MAPPING_PATH,
        seed: int | None = None,
    ) -> None:
        for name, value in (("rate_limit_qps", rate_limit_qps), ("rate_limit_qpm", rate_limit_qpm)):
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0")
        if quota_pause_s < 0:
            raise ValueError("quota_pause_s: must be >= 0")
        self.rules = list(rules)
        self.rate_limit_qps = rate_limit_qps
        self.rate_limit_qpm = rate_limit_qpm
        self.quota_pause_s = quota_pause_s
        self.rate_limit_path = rate_limit_path
        self.seed = seed
        self._rng = random.Random(seed)
        self._second: deque[float] = deque()  # admitted in the last second
        self._minute: deque[float] = deque()  # admitted in the last minute
        self._paused_until: float | None = None
        self.refused: dict[str, int] = {"qps": 0, "qpm": 0, "paused": 0}

    @classmethod
    def from_json(cls, obj: object, *, seed: int | None = None) -> FaultPlan:
        """Parse the JSON shape of the module docstring (ValueError if bad); `seed` overrides the file's."""
        if isinstance(obj, list):
            obj = {"rules": obj}
        if not isinstance(obj, dict):
            raise ValueError("fault plan: must be a list of rules or an object")
        unknown = set(obj) - _PLAN_KEYS
        if unknown:
            raise ValueError(f"fault plan: unknown field {sorted(unknown)[0]}")
        rules = obj.get("rules", [])
        if not isinstance(rules, list):
            raise ValueError("fault plan rules: must be a list")
        file_seed = _int(obj, "seed")
        qps = _num(obj, "rate_limit_qps", None)
        qpm = _num(obj, "rate_limit_qpm", None)
        pause = _num(obj, "quota_pause_s", QUOTA_PAUSE_S)
        path = _opt_str(obj, "rate_limit_path") or MAPPING_PATH
        return cls(
            [FaultRule.from_dict(r) for r in rules],
            rate_limit_qps=qps,
            rate_limit_qpm=qpm,
            quota_pause_s=pause if pause is not None else QUOTA_PAUSE_S,
            rate_limit_path=path,
            seed=seed if seed is not None else file_seed,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "rate_limit_qps": self.rate_limit_qps,
            "rate_limit_qpm": self.rate_limit_qpm,
            "quota_pause_s": self.quota_pause_s,
            "rate_limit_path": self.rate_limit_path,
            "refused": dict(self.refused),
            "rules": [r.to_dict() for r in self.rules],
        }

    def decide(self, path: str, advertiser_ids: Sequence[str], now: float) -> Fault | None:
        """The fault for one request arriving at monotonic time `now`, or None to serve it normally."""
        for i, rule in enumerate(self.rules):
            if not rule.matches(path, advertiser_ids):
                continue
            # Draw only for real odds, so adding a certain rule does not shift a seeded sequence.
            if rule.probability < 1.0 and not (rule.probability > 0.0 and self._rng.random() < rule.probability):
                continue
            rule.fired += 1
            return Fault(
                kind=rule.kind,
                source=f"rules[{i}]",
                code=rule.code,
                message=rule.message,
                status=rule.status,
                html=rule.html,
                delay_s=rule.delay_s,
                retry_after_s=rule.retry_after_s,
            )
        return self._rate_limit(path, now)

    def _rate_limit(self, path: str, now: float) -> Fault | None:
        """TikTok's per-app budget (module docstring): 1 s and 60 s sliding windows, and the quota pause."""
        if (self.rate_limit_qps is None and self.rate_limit_qpm is None) or self.rate_limit_path not in (
            ANY_PATH,
            path,
        ):
            return None
        if self._paused_until is not None:
            if now < self._paused_until:
                return self._refuse("paused")
            self._paused_until = None
        second, minute = self._second, self._minute
        while second and second[0] <= now - 1.0:
            second.popleft()
        while minute and minute[0] <= now - 60.0:
            minute.popleft()
        if self.rate_limit_qps is not None and len(second) + 1 > self.rate_limit_qps:
            return self._refuse("qps")
        if self.rate_limit_qpm is not None and len(minute) + 1 > self.rate_limit_qpm:
            self._paused_until = now + self.quota_pause_s
            return self._refuse("qpm")
        second.append(now)
        minute.append(now)
        return None

    def _refuse(self, cause: str) -> Fault:
        self.refused[cause] += 1
        return Fault(kind="code", source="rate_limit", code=REQUEST_TOO_FREQUENT, message=RATE_LIMIT_MESSAGE)
