"""Token bucket per client address for the /auth/v1 endpoints.

Each address gets a bucket of ``per_min`` tokens that refills continuously at
``per_min / 60`` tokens per second; a request takes one token. Bursts up to the bucket size
pass, sustained guessing is held to the configured rate. In memory and per process: that is
enough for one clinic server, and a restart merely forgives.
"""

from __future__ import annotations

import math
import time
from typing import Callable

# Forget full buckets once this many addresses are tracked, so address churn cannot grow
# memory without bound.
MAX_TRACKED_ADDRESSES = 10_000


class TokenBucketLimiter:
    def __init__(self, per_min: int, *, clock: Callable[[], float] = time.monotonic):
        if per_min < 1:
            raise ValueError("per_min must be at least 1")
        self.capacity = float(per_min)
        self.refill_per_s = per_min / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, updated_at_s)

    def take(self, key: str) -> float:
        """Take one token for ``key``. Returns 0.0 when allowed, else the seconds to wait."""
        now = self._clock()
        tokens, updated = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.refill_per_s)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_TRACKED_ADDRESSES:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.refill_per_s

    def _prune(self, now: float) -> None:
        full_after_s = self.capacity / self.refill_per_s
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after_s}


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
