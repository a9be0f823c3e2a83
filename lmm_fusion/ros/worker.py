"""The node's cycle thread (ROS-free): latest-only, so a slow cycle never piles up work."""

from __future__ import annotations

import threading
from collections.abc import Callable


class CycleWorker:
    """Runs ``fn`` on one dedicated thread whenever :meth:`request` is called.

    Latest-only: a request while a cycle is still running (or already pending) is dropped and counted
    in ``skipped``, so a slow cycle never piles up work; ``runs`` counts finished calls. An exception
    from ``fn`` goes to ``on_error`` and the thread keeps running. :meth:`stop` waits for the cycle in
    flight, then ends the thread.
    """

    def __init__(self, fn: Callable[[], object], on_error: Callable[[Exception], object] | None = None,
                 name: str = "fusion-cycle") -> None:
        self._fn = fn
        self._on_error = on_error
        self._wake = threading.Event()
        self._stopping = False
        self._busy = False
        self.skipped = 0
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for one run of ``fn`` (the node's timer callback); dropped while one runs or is pending."""
        if self._busy or self._wake.is_set():
            self.skipped += 1
            return
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping:
                return
            self._busy = True
            self._wake.clear()
            try:
                self._fn()
            except Exception as exc:  # one bad cycle must not end the thread
                if self._on_error is not None:
                    self._on_error(exc)
            finally:
                self.runs += 1
                self._busy = False

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after the cycle in flight (waits at most ``timeout`` [s])."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)


__all__ = ["CycleWorker"]
