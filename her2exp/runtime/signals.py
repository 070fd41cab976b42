"""SIGTERM and SIGINT as a request to stop cleanly, so a pre-empted or interrupted run leaves a
checkpoint to resume from (the trainer polls it once per optimizer step).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class StopRequest:
    """SIGTERM/SIGINT (what schedulers and torchrun send before a kill) become a request to stop.

    The first signal only sets a flag: the running step finishes and the epoch is abandoned
    (`last.pt` of the previous epoch is the resume point; a signal during evaluation or the
    checkpoint write lets that epoch finish and be saved). A second signal of the same kind
    gets the default behaviour: an impatient Ctrl-C still ends the process at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, default)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
