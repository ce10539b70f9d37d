"""Live reload of routes.yaml: validate the new table first, then swap one reference.

Triggered by SIGHUP and by a stat poller (mtime, size, inode), which also catches editors that
save by rename and config-management symlink swaps where inotify would not. A bad edit keeps
the old table serving and logs one line saying why.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, RouteTable, load_routes

log = logging.getLogger("maclustr.reload")


class RoutesHolder:
    """Owns the current RouteTable. Readers take `current` once per request and keep it."""

    def __init__(self, path: str | Path, table: RouteTable) -> None:
        self.path = Path(path)
        self.current = table
        self._signature = self._stat()
        self.listeners: list[Callable[[RouteTable], None]] = []  # called after each swap
        self.results: list[Callable[[bool], None]] = []  # called after each attempt (ok?)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> bool:
        """Load and swap; False (old table kept) when the file is invalid."""
        self._signature = self._stat()
        try:
            table = load_routes(self.path)
        except ConfigError as e:
            log.error("routes reload rejected, still serving the previous table: %s", e)
            for result in self.results:
                result(False)
            return False
        old = self.current
        self.current = table
        log.info("routes reloaded from %s: %s", self.path, ", ".join(table.aliases))
        for listener in self.listeners:
            listener(table)
        for result in self.results:
            result(True)
        if table.settings != old.settings:
            log.info("gateway settings changed; listening address and shutdown grace apply "
                     "at the next restart")
        return True

    def changed(self) -> bool:
        return self._stat() != self._signature

    async def watch(self, interval: float = 1.0) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload()
