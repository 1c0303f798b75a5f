"""Rate limits aimed at password guessing, and the token bucket they are made of.

What is counted: failed credential checks -- a wrong password on the password grant or the
sign-in page, and every sign-up attempt. What is not: calls that carry a valid token
(``GET/PUT /auth/v1/user``, logout, a refresh) and the exchange of refresh tokens and
sign-in codes, which are 256-bit random strings nobody can guess. A web front-end server
that asks ``GET /auth/v1/user`` several times per page view therefore never runs out.

Failures are counted in three buckets at once (``SignInGuard``):

- per account *and* address: one client trying one account is slowed down first, and
  alone; the same account from another address, and other accounts from the same address
  (colleagues behind one NAT), are not affected;
- per address, over all accounts: one client trying many accounts (password spraying);
- per account, over all addresses: many clients trying one account. Its rate is above the
  per-account-and-address one, so a single client can never empty it and lock the real
  user out.

The last two do not hold back an (account, address) pair that signed in successfully
before: a clinician on their usual machine keeps signing in while someone else is guessing.

Buckets are in memory and per process: enough for one clinic server; a restart forgives.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from typing import Callable

# Forget full buckets once this many keys are tracked, so key churn cannot grow memory
# without bound; past twice that, the least recently touched keys go too.
MAX_TRACKED_KEYS = 10_000
# How long a successful sign-in keeps its (account, address) pair "known".
KNOWN_PAIR_TTL_S = 30 * 86400.0
MAX_KNOWN_PAIRS = 20_000
HOUR_S = 3600.0


class TokenBucketLimiter:
    """A bucket of ``capacity`` tokens per key, refilled continuously at ``capacity`` per
    ``window_s`` seconds; a counted event takes one token."""

    def __init__(self, capacity: int, window_s: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = float(capacity)
        self.refill_per_s = capacity / window_s
        self._clock = clock
        # key -> (tokens, updated_at_s); ordered by last update (oldest first).
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, now: float) -> float:
        tokens, updated = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - updated) * self.refill_per_s)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may take a token; 0.0 when it may now. Takes nothing."""
        tokens = self._level(key, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.refill_per_s

    def take(self, key: str) -> float:
        """Take one token for ``key``. Returns 0.0 when allowed, else the seconds to wait
        (and then takes nothing)."""
        now = self._clock()
        tokens = self._level(key, now)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets.pop(key, None)
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > MAX_TRACKED_KEYS:
            self._prune(now)
        return 0.0 if allowed else (1.0 - tokens) / self.refill_per_s

    def _prune(self, now: float) -> None:
        full_after_s = self.capacity / self.refill_per_s
        for key in [k for k, (_, t) in self._buckets.items() if now - t >= full_after_s]:
            del self._buckets[key]
        while len(self._buckets) > 2 * MAX_TRACKED_KEYS:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def address_key(address: str) -> str:
    """The bucket of a client address: IPv4 as is, IPv6 by its /64 (one host usually owns a
    whole /64, so single IPv6 addresses would be free to change)."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return address[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))


class SignInGuard:
    """The three failure buckets of one server (see the module doc).

    Use: ``wait = guard.wait(address, account)`` before checking a password (refuse with
    429 when > 0, without checking it), then ``guard.failed(...)`` or ``guard.succeeded(...)``.
    ``account`` is the normalised email as typed, whether or not such a user exists, so the
    limits reveal nothing about which accounts exist.
    """

    def __init__(self, *, address_per_min: int, account_address_per_hour: int,
                 account_per_hour: int, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.by_address = TokenBucketLimiter(address_per_min, 60.0, clock=clock)
        self.by_pair = TokenBucketLimiter(account_address_per_hour, HOUR_S, clock=clock)
        self.by_account = TokenBucketLimiter(account_per_hour, HOUR_S, clock=clock)
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()

    def _is_known(self, account: str, addr: str) -> bool:
        seen = self._known.get((account, addr))
        return seen is not None and self._clock() - seen < KNOWN_PAIR_TTL_S

    def wait(self, address: str, account: str | None) -> float:
        """Seconds this attempt must wait; 0.0 = go ahead and check the credentials."""
        addr = address_key(address)
        if account is None:
            return self.by_address.wait(addr)
        waits = [self.by_pair.wait(f"{account}\n{addr}")]
        if not self._is_known(account, addr):
            waits += [self.by_address.wait(addr), self.by_account.wait(account)]
        return max(waits)

    def failed(self, address: str, account: str | None) -> None:
        """Count one failed attempt (for sign-up: one attempt) in every bucket it touches."""
        addr = address_key(address)
        self.by_address.take(addr)
        if account is not None:
            self.by_pair.take(f"{account}\n{addr}")
            self.by_account.take(account)

    def succeeded(self, address: str, account: str) -> None:
        """Remember that this pair signed in, so the address-wide and account-wide buckets
        do not hold it back later."""
        key = (account, address_key(address))
        self._known.pop(key, None)
        self._known[key] = self._clock()
        while len(self._known) > MAX_KNOWN_PAIRS:
            self._known.popitem(last=False)
