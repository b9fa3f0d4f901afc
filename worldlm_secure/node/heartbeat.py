"""A member's heartbeat thread: liveness for the aggregator's dropout decisions."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("worldlm_secure.node")


class Heartbeat(threading.Thread):
    """Calls ``beat()`` every ``seconds`` until stopped; failures are logged, never fatal."""

    def __init__(self, beat: Callable[[], object], seconds: float) -> None:
        super().__init__(daemon=True, name="heartbeat")
        self.beat, self.seconds = beat, seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.seconds):
            try:
                self.beat()
            except Exception as exc:  # the main loop notices real outages; this only keeps liveness
                log.info("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
