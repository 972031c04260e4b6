"""The embedded Triton's supervision events, and their hand-off from the supervisor's thread to the gateway.

The launcher's supervisor (``serving.triton_supervisor``) emits the names below; ``TritonEvents``
carries them to the gateway's event loop, where the health watcher (``serving.health``) reads them.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

EVENT_DOWN = "down"            # the server exited without stop(); a restart follows unless given up
EVENT_RESTARTED = "restarted"  # a restarted server and all its models are ready again
EVENT_RESTART_FAILED = "restart_failed"  # one restart attempt did not get ready; tried again
EVENT_GAVE_UP = "gave_up"      # more than max_restarts restarts within restart_window; left down
DOWN_EVENTS = (EVENT_DOWN, EVENT_GAVE_UP)
SupervisionCallback = Callable[[str], None]


class TritonEvents:
    """The launcher's supervision events, handed from its thread to the health watcher's event loop.

    Pass the instance as ``supervise(on_event=...)`` (or call it from such a callback) and as
    ``ServerOptions.triton_events``: ``down`` turns health NOT_SERVING at once, ``restarted`` (the
    server and its models are ready again) SERVING once the gateway has re-read the model list.
    Events that arrive before the gateway's loop attaches are kept and delivered then.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[str] | None = None
        self._pending: list[str] = []

    def __call__(self, event: str) -> None:
        with self._lock:
            if self._loop is None or self._queue is None:
                self._pending.append(event)
                return
            loop, queue = self._loop, self._queue
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the gateway's loop has closed: nobody left to tell
            pass

    def attach(self) -> "asyncio.Queue[str]":
        """Start delivering to the running loop; returns the queue the watcher reads."""
        with self._lock:
            self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
            for event in self._pending:
                self._queue.put_nowait(event)
            self._pending.clear()
            return self._queue

    def detach(self) -> None:
        with self._lock:
            self._loop = self._queue = None
