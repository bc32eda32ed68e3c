"""Failed-attempt limits for credentials checked by the service itself (the /admin token).

``FailureLimiter(limit, window)`` counts failures per key (the client address) in a sliding window: once a
key has ``limit`` failures within ``window`` seconds, ``blocked(key)`` says for how many more seconds it
is refused (the caller answers 429 with Retry-After), whatever it sends, a right token included. Memory
is bounded: at most ``max_keys`` addresses are tracked (the oldest entry is dropped first). Counts are
per process (each gunicorn worker keeps its own), so a client gets at most ``limit`` x workers tries per
window.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque


class FailureLimiter:
    def __init__(self, limit: int = 10, window: float = 60.0, max_keys: int = 10_000, clock=time.monotonic):
        self.limit, self.window, self.max_keys, self.clock = limit, window, max_keys, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def blocked(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: it may try now)."""
        now = self.clock()
        with self._lock:
            times = self._failures.get(key)
            if not times:
                return 0.0
            while times and times[0] <= now - self.window:
                times.popleft()
            if not times:
                del self._failures[key]
                return 0.0
            return max(0.0, times[0] + self.window - now) if len(times) >= self.limit else 0.0

    def failed(self, key: str) -> None:
        now = self.clock()
        with self._lock:
            times = self._failures.pop(key, None) or deque(maxlen=self.limit)
            times.append(now)
            self._failures[key] = times  # most recent last
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
