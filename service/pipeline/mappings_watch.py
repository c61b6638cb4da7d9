"""Live mappings: `MAPPINGS_FILE` changes are picked up without a restart (file polling or SIGHUP).

A new file is validated before it replaces the old one; a bad file is refused with one clear log line and the
service keeps routing with the last good mappings. Polling (not inotify) also works on Kubernetes ConfigMap
volumes, whose updates swap a symlink rather than write the file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from service import metrics as m
from service.core.mappings import Mappings, MappingsError, load_mappings

log = logging.getLogger(__name__)


class MappingsWatcher:
    def __init__(
        self,
        path: Path,
        apply: Callable[[Mappings], None],
        *,
        interval_s: float = 2.0,
    ) -> None:
        self.path = path
        self._apply = apply
        self.interval_s = interval_s
        self._seen = self._signature()

    def _signature(self) -> tuple[float, int, int] | None:
        try:
            st = self.path.stat()  # follows symlinks: a ConfigMap swap changes the target's inode
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def reload(self, trigger: str = "signal") -> bool:
        """Load, validate and apply; False (old mappings kept) when the file is unreadable or invalid."""
        self._seen = self._signature()
        try:
            mappings = load_mappings(self.path)
        except MappingsError as exc:
            m.MAPPINGS_RELOADS.labels("rejected").inc()
            log.error("mappings reload (%s) rejected, keeping the previous mappings: %s", trigger, exc)
            return False
        self._apply(mappings)
        m.MAPPINGS_RELOADS.labels("applied").inc()
        m.MAPPINGS_ENTRIES.set(len(mappings))
        log.info("mappings reloaded (%s): %d audience keys from %s", trigger, len(mappings), self.path)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            sig = self._signature()
            if sig is not None and sig != self._seen:
                self.reload("file change")
