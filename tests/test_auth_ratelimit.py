"""Rate limits aimed at password guessing (issue 11 item 7, issue 10 section 2).

Failed sign-ins are counted per account and address, per address and per account; calls
that carry a valid token are never counted. The e2e tests use several loopback source
addresses (127.0.0.2, 127.0.0.3, ...) as separate clients of one real server.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from medmitra.auth import users
from medmitra.auth.ratelimit import SignInGuard, TokenBucketLimiter, address_key
from medmitra.config import ConfigError, load_settings
from tests.conftest import make_settings

EMAIL = "doctor@clinic.test"
PASSWORD = "correct horse battery"
COLLEAGUE = "nurse@clinic.test"


# --- the guard, with a fake clock -----------------------------------------------------------

def guard_at(now: list[float], **kw: int) -> SignInGuard:
    limits = {"address_per_min": 30, "account_address_per_hour": 10, "account_per_hour": 100}
    limits.update(kw)
    return SignInGuard(**limits, clock=lambda: now[0])


def test_token_bucket_refills_over_its_window():
    now = [0.0]
    per_min = TokenBucketLimiter(60, clock=lambda: now[0])       # 1 per second, burst 60
    assert all(per_min.take("a") == 0.0 for _ in range(60))
    assert per_min.take("a") == pytest.approx(1.0)
    assert per_min.wait("b") == 0.0 and per_min.take("b") == 0.0   # per key
    now[0] += 2.5
    assert per_min.take("a") == 0.0 and per_min.take("a") == 0.0
    assert per_min.take("a") > 0
    per_hour = TokenBucketLimiter(10, 3600.0, clock=lambda: now[0])
    assert all(per_hour.take("k") == 0.0 for _ in range(10))
    assert per_hour.wait("k") == pytest.approx(360.0)             # one token per 6 minutes
    assert per_hour.wait("k") == pytest.approx(360.0)             # wait() takes nothing


def test_one_address_guessing_one_account_is_stopped_alone():
    now = [0.0]
    guard = guard_at(now)
    for _ in range(10):
        assert guard.wait("10.0.0.5", EMAIL) == 0.0
        guard.failed("10.0.0.5", EMAIL)
    assert guard.wait("10.0.0.5", EMAIL) == pytest.approx(360.0)
    # The real user elsewhere, and a colleague behind the same address, are not held.
    assert guard.wait("10.0.0.9", EMAIL) == 0.0
    assert guard.wait("10.0.0.5", COLLEAGUE) == 0.0
    # One address alone can never empty the account's bucket: its own runs dry first
    # and refills slower (10/h against 100/h).
    for _ in range(24 * 6):
        now[0] += 360.0
        if guard.wait("10.0.0.5", EMAIL) == 0.0:
            guard.failed("10.0.0.5", EMAIL)
    assert guard.wait("10.0.0.9", EMAIL) == 0.0


def test_many_addresses_on_one_account_hold_only_unknown_addresses():
    now = [0.0]
    guard = guard_at(now, account_address_per_hour=2, account_per_hour=5)
    guard.succeeded("10.0.0.1", EMAIL)                  # the doctor's usual machine
    for i in range(3):
        for _ in range(2):
            guard.failed(f"10.0.1.{i}", EMAIL)
    assert guard.wait("10.0.2.1", EMAIL) > 0             # a new address waits ...
    assert guard.wait("10.0.0.1", EMAIL) == 0.0          # ... the known one does not
    assert guard.wait("10.0.2.1", COLLEAGUE) == 0.0      # other accounts are untouched


def test_one_address_spraying_many_accounts_is_stopped_but_known_pairs_pass():
    now = [0.0]
    guard = guard_at(now, address_per_min=5)
    guard.succeeded("192.0.2.7", COLLEAGUE)
    for i in range(5):
        guard.failed("192.0.2.7", f"user{i}@clinic.test")
    assert guard.wait("192.0.2.7", "user9@clinic.test") > 0
    assert guard.wait("192.0.2.7", None) > 0              # sign-up from there too
    assert guard.wait("192.0.2.7", COLLEAGUE) == 0.0      # signed in from there before
    assert guard.wait("192.0.2.8", "user9@clinic.test") == 0.0
    now[0] += 12.0                                          # 5 per minute: one per 12 s
    assert guard.wait("192.0.2.7", "user9@clinic.test") == 0.0


def test_address_keys_group_ipv6_by_64_and_unmap_ipv4():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1" == address_key("192.0.2.1")
    assert address_key("") == "unknown"


def test_memory_stays_bounded_under_key_churn(monkeypatch):
    from medmitra.auth import ratelimit

    monkeypatch.setattr(ratelimit, "MAX_TRACKED_KEYS", 100)
    now = [0.0]
    limiter = TokenBucketLimiter(5, 3600.0, clock=lambda: now[0])
    for i in range(1000):
        limiter.take(f"k{i}")
    assert len(limiter) <= 200


def test_config_refuses_an_account_limit_one_client_could_exhaust():
    with pytest.raises(ConfigError, match="auth.account_failures_per_hour"):
        load_settings(None, env={}, overrides={"auth": {
            "account_address_failures_per_hour": 50, "account_failures_per_hour": 50}})


# --- a real server, several client addresses ------------------------------------------------

def client_from(server: Any, address: str) -> httpx.Client:
    return server.client(transport=httpx.HTTPTransport(local_address=address))


def sign_in(client: httpx.Client, email: str = EMAIL, password: str = PASSWORD) -> httpx.Response:
    return client.post("/auth/v1/token", params={"grant_type": "password"},
                       json={"email": email, "password": password})


def assert_429(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["code"] == 429 and body["error_code"] == "over_request_rate_limit", body
    assert int(r.headers["retry-after"]) >= 1


@pytest.mark.e2e
def test_guessing_one_account_locks_out_the_guesser_not_the_user(start_server, tmp_path):
    server = start_server(make_settings(tmp_path, auth={
        "account_address_failures_per_hour": 3, "account_failures_per_hour": 6}))
    server.run(users.create_user(EMAIL, PASSWORD))
    server.run(users.create_user(COLLEAGUE, PASSWORD))
    with client_from(server, "127.0.0.2") as attacker, \
            client_from(server, "127.0.0.3") as doctor:
        assert [sign_in(attacker, password=f"guess{i}").status_code for i in range(3)] \
            == [400] * 3
        # Refused before the password is even checked: the right one does not help now.
        assert_429(sign_in(attacker))
        assert sign_in(doctor).status_code == 200          # the real user, elsewhere
        # A colleague behind the attacker's address signs in to their own account.
        assert sign_in(attacker, COLLEAGUE).status_code == 200


@pytest.mark.e2e
def test_guessing_from_many_addresses_holds_new_addresses_only(start_server, tmp_path):
    server = start_server(make_settings(tmp_path, auth={
        "account_address_failures_per_hour": 2, "account_failures_per_hour": 4}))
    server.run(users.create_user(EMAIL, PASSWORD))
    with client_from(server, "127.0.0.10") as usual:
        assert sign_in(usual).status_code == 200
    for last in (11, 12):
        with client_from(server, f"127.0.0.{last}") as bot:
            assert [sign_in(bot, password="guess").status_code for _ in range(2)] == [400] * 2
    with client_from(server, "127.0.0.13") as new_address:
        assert_429(sign_in(new_address))
    with client_from(server, "127.0.0.10") as usual:
        assert sign_in(usual).status_code == 200


@pytest.mark.e2e
def test_password_spraying_from_one_address_is_limited(start_server, tmp_path):
    server = start_server(make_settings(tmp_path, auth={"rate_limit_per_min": 4}))
    server.run(users.create_user(EMAIL, PASSWORD))
    with client_from(server, "127.0.0.20") as c:
        assert sign_in(c).status_code == 200                # known pair from now on
        codes = [sign_in(c, f"u{i}@clinic.test", "guess").status_code for i in range(4)]
        assert codes == [400] * 4
        assert_429(sign_in(c, "u9@clinic.test", "guess"))
        assert sign_in(c).status_code == 200                 # the known pair still passes
    with client_from(server, "127.0.0.21") as other:
        assert sign_in(other, "u9@clinic.test", "guess").status_code == 400


@pytest.mark.e2e
def test_signup_attempts_count_per_address(start_server, tmp_path):
    server = start_server(make_settings(tmp_path, auth={"rate_limit_per_min": 2,
                                                         "signup_enabled": True}))
    with client_from(server, "127.0.0.30") as c:
        r = [c.post("/auth/v1/signup", json={"email": f"s{i}@clinic.test",
                                             "password": PASSWORD}) for i in range(3)]
        assert [x.status_code for x in r[:2]] == [200, 200]
        assert_429(r[2])


@pytest.mark.e2e
def test_twenty_quick_page_views_of_a_frontend_server_stay_signed_in(start_server, tmp_path):
    """The original frontend's Next.js server (one address) asks GET /auth/v1/user 2-4 times
    per page view and refreshes when the access token ages. With the default limits, 20 quick
    page views must all stay signed in (the old 30 requests/min/address limit signed the
    user out after 8-11)."""
    server = start_server(make_settings(tmp_path))
    assert server.settings.auth.rate_limit_per_min == 30        # the shipped default
    server.run(users.create_user(EMAIL, PASSWORD))
    statuses = []
    with client_from(server, "127.0.0.40") as next_server:
        session = sign_in(next_server).json()
        for view in range(20):
            if view in (7, 14):      # @supabase/ssr refreshes an expiring session
                r = next_server.post("/auth/v1/token", params={"grant_type": "refresh_token"},
                                     json={"refresh_token": session["refresh_token"]})
                assert r.status_code == 200, r.text
                session = r.json()
            headers = {"Authorization": f"Bearer {session['access_token']}"}
            for _ in range(2 + view % 3):
                statuses.append(next_server.get("/auth/v1/user", headers=headers).status_code)
            statuses.append(next_server.get("/cases/all_cases", headers=headers).status_code)
        assert len(statuses) > 60 and set(statuses) == {200}, statuses
        # Failed guesses from the same address are still counted and stopped.
        # (the bucket refills at 0.5/s while each wrong password takes ~0.1 s to check)
        codes = [sign_in(next_server, f"x{i}@clinic.test", "guess").status_code
                 for i in range(45)]
        assert 429 in codes and codes.index(429) >= 30, codes
        assert set(codes[:30]) == {400}
        # ... while the token-checked reads and logout carry on.
        headers = {"Authorization": f"Bearer {session['access_token']}"}
        assert next_server.get("/auth/v1/user", headers=headers).status_code == 200
        assert next_server.post("/auth/v1/logout", headers=headers).status_code == 204


@pytest.mark.e2e
@pytest.mark.parametrize("trusted_proxies", [0, 1])
def test_client_address_behind_a_reverse_proxy(start_server, tmp_path, trusted_proxies):
    """Behind a configured proxy each client's X-Forwarded-For address is its own bucket;
    without one the header is ignored, so a guesser cannot change address by writing it."""
    server = start_server(make_settings(tmp_path, auth={"account_address_failures_per_hour": 2,
                                                        "account_failures_per_hour": 50},
                                        server={"trusted_proxies": trusted_proxies}))
    server.run(users.create_user(EMAIL, PASSWORD))
    with server.client() as proxy:
        guesser = {"X-Forwarded-For": "192.0.2.10"}
        for _ in range(2):
            r = proxy.post("/auth/v1/token", params={"grant_type": "password"},
                           json={"email": EMAIL, "password": "guess"}, headers=guesser)
            assert r.status_code == 400
        r = proxy.post("/auth/v1/token", params={"grant_type": "password"},
                       json={"email": EMAIL, "password": PASSWORD},
                       headers={"X-Forwarded-For": "192.0.2.99"})
        if trusted_proxies:
            assert r.status_code == 200         # another client behind the proxy
        else:
            assert_429(r)                        # the same socket peer: the header is ignored
