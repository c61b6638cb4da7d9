"""Local stand-in for TikTok's Business API: strict validation, in-memory membership and received offline events
(`event/track/`, de-duplicated like TikTok within 48 hours), injected faults.

Serves `/open_api/v1.3/...` (TikTok) and `/_sandbox/...` (control API for tests and the demo) over loopback.
"""

from service.devtools.sandbox.app import API_PREFIX, create_app
from service.devtools.sandbox.faults import Fault, FaultPlan, FaultRule
from service.devtools.sandbox.server import SandboxServer, SandboxThread, main
from service.devtools.sandbox.state import ApiError, SandboxState

__all__ = [
    "API_PREFIX",
    "ApiError",
    "Fault",
    "FaultPlan",
    "FaultRule",
    "SandboxServer",
    "SandboxState",
    "SandboxThread",
    "create_app",
    "main",
]
