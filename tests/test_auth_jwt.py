"""Token verification (api.md section 2): a table of good and bad tokens, JWKS handling,
issue_token round trips and the local secret file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import random
import stat
import time
import uuid
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from medmitra.auth import Principal, TokenVerifier, issue_token, load_or_create_secret
from medmitra.auth import keys as keys_mod
from medmitra.config import AuthSettings, ConfigError, Settings
from medmitra.errors import Unauthorized

SECRET = "test-secret-" + "x" * 40
ISSUER = "https://demo.supabase.co/auth/v1"
USER = "3f1c2a4e-9b7d-4c1e-8a2f-5d6e7f809a1b"
SESSION = "0d7b7c0e-1111-4222-8333-944455556666"


# --- keys and token builders ----------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hand_signed_hs256(header: dict, claims: dict, secret: bytes) -> str:
    """HS256 with an arbitrary byte secret (PyJWT refuses PEM secrets, attackers do not)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def raw(header: bytes, payload: bytes = b"{}", sig: bytes = b"sig") -> str:
    """A token from literal segments, signature or not."""
    return ".".join(b64url(part) for part in (header, payload)) + "." + (b64url(sig) if sig else "")


def jwk_of(private_key, kid: str, alg: str | None = None) -> dict:
    algo = ECAlgorithm if isinstance(private_key, ec.EllipticCurvePrivateKey) else RSAAlgorithm
    jwk = algo.to_jwk(private_key.public_key(), as_dict=True)
    jwk["kid"] = kid
    if alg:
        jwk["alg"] = alg
    return jwk


class Keys:
    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ec_other = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwks = {"keys": [jwk_of(self.ec, "ec1", "ES256"), jwk_of(self.rsa, "rsa1")]}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def claims(**over) -> dict:
    now = int(time.time())
    base = {"aud": "authenticated", "exp": now + 600, "iat": now, "sub": USER,
            "email": "doc@example.org", "role": "authenticated", "session_id": SESSION}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs(c: dict, secret: str = SECRET, headers: dict | None = None) -> str:
    return pyjwt.encode(c, secret, algorithm="HS256", headers=headers)


def es(k: Keys, c: dict, kid: str = "ec1", key=None) -> str:
    return pyjwt.encode(c, key or k.ec, algorithm="ES256", headers={"kid": kid})


def rs(k: Keys, c: dict, kid: str = "rsa1") -> str:
    return pyjwt.encode(c, k.rsa, algorithm="RS256", headers={"kid": kid})


def tamper_payload(token: str) -> str:
    head, _, sig = token.split(".")
    other = claims(sub="99999999-9999-4999-8999-999999999999")
    return f"{head}.{b64url(json.dumps(other).encode())}.{sig}"


def verifier(k: Keys, variant: str) -> TokenVerifier:
    if variant == "std":
        return TokenVerifier(AuthSettings(), hs256_secret=SECRET, jwks=k.jwks)
    if variant == "iss":
        return TokenVerifier(AuthSettings(issuer=ISSUER), hs256_secret=SECRET, jwks=k.jwks)
    if variant == "nosecret":
        return TokenVerifier(AuthSettings(), hs256_secret=None, jwks=k.jwks)
    raise AssertionError(variant)


# --- the table -------------------------------------------------------------------------

# (case id, verifier variant, token builder)
VALID = [
    ("hs256", "std", lambda k: hs(claims())),
    ("hs256 via issue_token", "std",
     lambda k: issue_token(SECRET, user_id=USER, email="doc@example.org", session_id=SESSION)),
    ("hs256 with matching issuer", "iss", lambda k: hs(claims(iss=ISSUER))),
    ("hs256 with a foreign kid (Supabase legacy key id)", "std",
     lambda k: hs(claims(), headers={"kid": "legacy-hs"})),
    ("es256 jwks", "std", lambda k: es(k, claims())),
    ("rs256 jwks", "std", lambda k: rs(k, claims())),
    ("es256 without a secret configured", "nosecret", lambda k: es(k, claims())),
    ("aud as list", "std", lambda k: hs(claims(aud=["other", "authenticated"]))),
    ("upper-case sub is normalised", "std", lambda k: hs(claims(sub=USER.upper()))),
    ("expired but within leeway", "std", lambda k: hs(claims(exp=int(time.time()) - 10))),
]

# (case id, verifier variant, token builder, expected message fragment)
INVALID = [
    ("expired", "std", lambda k: hs(claims(exp=int(time.time()) - 120)), "expired"),
    ("expired es256", "std", lambda k: es(k, claims(exp=int(time.time()) - 120)), "expired"),
    ("nbf in future", "std", lambda k: hs(claims(nbf=int(time.time()) + 600)), "not yet valid"),
    ("iat in future", "std", lambda k: hs(claims(iat=int(time.time()) + 600)), "not yet valid"),
    ("wrong audience", "std", lambda k: hs(claims(aud="anon")), "audience"),
    ("missing audience", "std", lambda k: hs(claims(aud=None)), "'aud'"),
    ("wrong issuer", "iss", lambda k: hs(claims(iss="https://evil.example/auth/v1")), "issuer"),
    ("missing issuer when configured", "iss", lambda k: hs(claims()), "'iss'"),
    ("tampered payload hs256", "std", lambda k: tamper_payload(hs(claims())), "signature"),
    ("tampered payload es256", "std", lambda k: tamper_payload(es(k, claims())), "signature"),
    ("tampered payload rs256", "std", lambda k: tamper_payload(rs(k, claims())), "signature"),
    ("wrong hs key", "std", lambda k: hs(claims(), secret="another-secret-" + "y" * 40),
     "signature"),
    ("wrong ec key with right kid", "std", lambda k: es(k, claims(), key=k.ec_other),
     "signature"),
    ("unknown kid es256", "std", lambda k: es(k, claims(), kid="nope"), "Unknown signing key"),
    ("es256 without kid", "std",
     lambda k: pyjwt.encode(claims(), k.ec, algorithm="ES256"), "no key id"),
    ("es256 token naming the rsa kid", "std", lambda k: es(k, claims(), kid="rsa1"),
     "does not match"),
    ("rs256 token naming the ec kid", "std", lambda k: rs(k, claims(), kid="ec1"),
     "does not match"),
    ("alg none", "std", lambda k: pyjwt.encode(claims(), None, algorithm="none"), "Unsigned"),
    ("alg None spelled oddly", "std",
     lambda k: raw(b'{"alg":"NoNe"}', json.dumps(claims()).encode(), b""),
     "Unsigned"),
    ("alg none with a known kid", "std",
     lambda k: pyjwt.encode(claims(), None, algorithm="none", headers={"kid": "ec1"}),
     "does not match"),
    ("hs512 not accepted", "std", lambda k: pyjwt.encode(claims(), SECRET * 2, algorithm="HS512"),
     "algorithm is not accepted"),
    ("alg confusion: hs256 with rsa public pem", "std",
     lambda k: hand_signed_hs256({"alg": "HS256", "typ": "JWT"}, claims(), public_pem(k.rsa)),
     "signature"),
    ("alg confusion: hs256 with ec public pem", "std",
     lambda k: hand_signed_hs256({"alg": "HS256", "typ": "JWT"}, claims(), public_pem(k.ec)),
     "signature"),
    ("alg confusion: hs256 with rsa pem and its kid", "std",
     lambda k: hand_signed_hs256({"alg": "HS256", "kid": "rsa1"}, claims(), public_pem(k.rsa)),
     "does not match"),
    ("alg confusion: hs256 with ec pem and its kid", "std",
     lambda k: hand_signed_hs256({"alg": "HS256", "kid": "ec1"}, claims(), public_pem(k.ec)),
     "does not match"),
    ("alg confusion: hs256 with the ec jwk json", "std",
     lambda k: hand_signed_hs256({"alg": "HS256", "kid": "ec1"}, claims(),
                                 json.dumps(k.jwks["keys"][0]).encode()),
     "does not match"),
    ("alg confusion: no secret configured", "nosecret",
     lambda k: hand_signed_hs256({"alg": "HS256"}, claims(), public_pem(k.rsa)),
     "HS256 tokens are not accepted"),
    ("missing sub (anon key)", "std", lambda k: hs(claims(sub=None, role="anon")), "no user"),
    ("missing sub es256", "std", lambda k: es(k, claims(sub=None, role="service_role")),
     "no user"),
    ("non-uuid sub", "std", lambda k: hs(claims(sub="admin")), "not a user id"),
    ("uuid sub without hyphens", "std", lambda k: hs(claims(sub=uuid.UUID(USER).hex)),
     "not a user id"),
    ("non-string sub", "std", lambda k: hs(claims(sub=12345)), "not a user id"),
    ("missing exp", "std", lambda k: hs(claims(exp=None)), "'exp'"),
    ("non-numeric exp", "std", lambda k: hs(claims(exp="soon")), "Malformed"),
    ("empty string", "std", lambda k: "", "Missing"),
    ("abc", "std", lambda k: "abc", "Malformed"),
    ("a.b.c", "std", lambda k: "a.b.c", "Malformed"),
    ("dots only", "std", lambda k: "...", "Malformed"),
    ("two dots", "std", lambda k: "..", "Malformed"),
    ("non-ascii", "std", lambda k: "é.ü.ß", "Malformed"),
    ("non-ascii inside a real token", "std", lambda k: hs(claims()) + "é", "Malformed"),
    ("base64 junk", "std",
     lambda k: ".".join(b64url(os.urandom(n)) for n in (30, 60, 32)), "Malformed"),
    ("header is a json array", "std",
     lambda k: raw(b"[1,2]"), "Malformed"),
    ("header is a json string", "std",
     lambda k: raw(b'"HS256"'), "Malformed"),
    ("header not json", "std",
     lambda k: raw(b"{alg:HS256"), "Malformed"),
    ("header alg not a string", "std",
     lambda k: raw(b'{"alg":1}'), "Malformed"),
    ("header kid not a string", "std",
     lambda k: hand_signed_hs256({"alg": "HS256", "kid": 7}, claims(), SECRET.encode()),
     "Malformed"),
    ("payload is a json array", "std",
     lambda k: hand_signed_hs256({"alg": "HS256"}, [1, 2], SECRET.encode()), "Malformed"),
    ("bearer prefix left on", "std", lambda k: "Bearer " + hs(claims()), "Malformed"),
    ("oversized token", "std",
     lambda k: hs(claims(user_metadata={"pad": "z" * 9000})), "too large"),
]


@pytest.mark.parametrize("variant,build", [(v, b) for _, v, b in VALID],
                         ids=[name for name, _, _ in VALID])
def test_valid_tokens(keys, variant, build):
    token = build(keys)
    p = verifier(keys, variant).verify(token)
    assert isinstance(p, Principal)
    assert p.user_id == USER
    assert p.email == "doc@example.org"
    assert p.role == "authenticated"
    assert p.session_id == SESSION
    assert p.claims["sub"].lower() == USER


@pytest.mark.parametrize("variant,build,fragment", [(v, b, f) for _, v, b, f in INVALID],
                         ids=[name for name, _, _, _ in INVALID])
def test_invalid_tokens(keys, variant, build, fragment):
    token = build(keys)
    with pytest.raises(Unauthorized) as info:
        verifier(keys, variant).verify(token)
    err = info.value
    assert err.status == 401
    assert err.headers["WWW-Authenticate"] == "Bearer"
    assert fragment in err.message
    # Short and never echoing the token (or any of its segments).
    assert len(err.message) < 100
    for segment in token.split("."):
        if len(segment) >= 8:
            assert segment not in err.message


def test_oversized_token_is_only_rejected_for_its_size(keys):
    # The same claims under the limit verify; so the size check is what rejects the big one.
    small = hs(claims(user_metadata={"pad": "z" * 1000}))
    assert verifier(keys, "std").verify(small).user_id == USER
    big = hs(claims(user_metadata={"pad": "z" * 9000}))
    assert len(big) > 8 * 1024


def test_expiry_honours_configured_leeway():
    token = hs(claims(exp=int(time.time()) - 60))
    strict = TokenVerifier(AuthSettings(leeway_s=0), hs256_secret=SECRET)
    lenient = TokenVerifier(AuthSettings(leeway_s=300), hs256_secret=SECRET)
    with pytest.raises(Unauthorized, match="expired"):
        strict.verify(token)
    assert lenient.verify(token).user_id == USER


def test_configured_audience_is_used():
    v = TokenVerifier(AuthSettings(audience="clinic"), hs256_secret=SECRET)
    assert v.verify(hs(claims(aud="clinic"))).user_id == USER
    with pytest.raises(Unauthorized, match="audience"):
        v.verify(hs(claims()))


@pytest.mark.parametrize("value", [None, 123, b"abc"])
def test_non_string_input_is_unauthorized(value):
    with pytest.raises(Unauthorized):
        TokenVerifier(AuthSettings(), hs256_secret=SECRET).verify(value)


def test_empty_secret_means_no_hs256():
    # An empty HMAC key would make forging trivial; it must count as "not configured".
    v = TokenVerifier(AuthSettings(), hs256_secret="")
    token = hand_signed_hs256({"alg": "HS256"}, claims(), b"")
    with pytest.raises(Unauthorized, match="HS256 tokens are not accepted"):
        v.verify(token)


def test_mutated_tokens_never_raise_anything_but_unauthorized(keys):
    v = verifier(keys, "std")
    rng = random.Random(20260304)
    alphabet = "ABCxyz019-_.=é{}\"\\ \x00"
    originals = [hs(claims()), es(keys, claims()), rs(keys, claims())]
    for _ in range(600):
        token = list(rng.choice(originals))
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            i = rng.randrange(len(token))
            if op < 0.4:
                token[i] = rng.choice(alphabet)
            elif op < 0.7:
                del token[i]
            else:
                token.insert(i, rng.choice(alphabet))
        mutated = "".join(token)
        try:
            p = v.verify(mutated)
        except Unauthorized:
            continue
        # A flip in base64 padding bits can leave the decoded bytes unchanged.
        assert p.user_id == USER


# --- JWKS handling -----------------------------------------------------------------------

def test_add_jwks_at_run_time(keys):
    v = TokenVerifier(AuthSettings(), hs256_secret=None)
    token = es(keys, claims(), kid="late")
    with pytest.raises(Unauthorized, match="Unknown signing key"):
        v.verify(token)
    v.add_jwks({"keys": [jwk_of(keys.ec, "late")]})
    assert v.verify(token).user_id == USER
    assert v.key_ids == ["late"]


def test_add_jwks_accepts_identical_key_again_but_not_a_different_one(keys):
    v = TokenVerifier(AuthSettings(), hs256_secret=None, jwks=keys.jwks)
    v.add_jwks(keys.jwks)
    with pytest.raises(ValueError, match="different key material"):
        v.add_jwks({"keys": [jwk_of(keys.ec_other, "ec1")]})
    # The refused key did not replace the good one.
    assert v.verify(es(keys, claims())).user_id == USER


def test_add_jwks_rejects_duplicate_kid_in_one_set(keys):
    v = TokenVerifier(AuthSettings(), hs256_secret=None)
    with pytest.raises(ValueError, match="twice"):
        v.add_jwks({"keys": [jwk_of(keys.ec, "k"), jwk_of(keys.ec, "k")]})
    assert v.key_ids == []


def test_jwk_with_private_parts_is_used_as_public_key(keys):
    jwk = ECAlgorithm.to_jwk(keys.ec, as_dict=True)
    assert "d" in jwk
    jwk["kid"] = "priv"
    v = TokenVerifier(AuthSettings(), hs256_secret=None, jwks={"keys": [jwk]})
    assert v.verify(es(keys, claims(), kid="priv")).user_id == USER


def test_single_jwk_object_is_accepted(keys):
    v = TokenVerifier(AuthSettings(), hs256_secret=None, jwks=jwk_of(keys.rsa, "solo"))
    assert v.verify(rs(keys, claims(), kid="solo")).user_id == USER


@pytest.mark.parametrize("jwk_change,message", [
    ({"alg": "RS256"}, "does not fit"),
    ({"alg": "HS256"}, "does not fit"),
    ({"kid": None}, "no kid"),
    ({"x": "AAAA"}, "invalid EC key"),
])
def test_broken_ec_keys_are_refused(keys, jwk_change, message):
    jwk = jwk_of(keys.ec, "ec1")
    jwk.update(jwk_change)
    jwk = {k: v for k, v in jwk.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        TokenVerifier(AuthSettings(), hs256_secret=None, jwks={"keys": [jwk]})


def test_short_rsa_key_is_refused():
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="too short"):
        TokenVerifier(AuthSettings(), hs256_secret=None, jwks={"keys": [jwk_of(weak, "w")]})


@pytest.mark.parametrize("jwks", [[], "keys", {"keys": "nope"}, {"nokeys": []}])
def test_malformed_jwks_is_refused(jwks):
    with pytest.raises(ValueError):
        TokenVerifier(AuthSettings(), hs256_secret=None, jwks=jwks)


def test_symmetric_and_unsupported_keys_are_skipped(keys):
    oct_secret = b"shared-secret-in-a-public-jwks!!"
    p384 = ec.generate_private_key(ec.SECP384R1())
    jwks = {"keys": [
        {"kty": "oct", "kid": "oct1", "k": b64url(oct_secret)},
        jwk_of(p384, "p384"),
        dict(jwk_of(keys.ec, "enc"), use="enc"),
        jwk_of(keys.ec, "ec1"),
    ]}
    v = TokenVerifier(AuthSettings(), hs256_secret=SECRET, jwks=jwks)
    assert v.key_ids == ["ec1"]
    # A token "signed" with the oct key is checked against the configured secret only.
    forged = hand_signed_hs256({"alg": "HS256", "kid": "oct1"}, claims(), oct_secret)
    with pytest.raises(Unauthorized, match="signature"):
        v.verify(forged)
    with pytest.raises(Unauthorized, match="algorithm is not accepted"):
        v.verify(pyjwt.encode(claims(), p384, algorithm="ES384", headers={"kid": "p384"}))
    with pytest.raises(Unauthorized, match="Unknown signing key"):
        v.verify(es(keys, claims(), kid="enc"))


# --- from_settings -----------------------------------------------------------------------

def settings_with(**auth) -> Settings:
    return Settings().replace("auth", **auth)


def test_from_settings_loads_jwks_file(keys, tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(keys.jwks), encoding="utf-8")
    v = TokenVerifier.from_settings(settings_with(jwks_file=str(path), issuer=ISSUER), SECRET)
    assert v.verify(es(keys, claims(iss=ISSUER))).user_id == USER
    assert v.verify(hs(claims(iss=ISSUER))).user_id == USER
    with pytest.raises(Unauthorized, match="issuer"):
        v.verify(rs(keys, claims(iss="https://elsewhere.example/auth/v1")))
    with pytest.raises(Unauthorized, match="'iss'"):
        v.verify(rs(keys, claims()))


def test_from_settings_without_jwks_file(keys):
    v = TokenVerifier.from_settings(Settings(), SECRET)
    assert v.key_ids == []
    assert v.verify(hs(claims())).user_id == USER


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"keys": [{"kty": "EC"}]}',
                                     b"\xff\xfe garbage"])
def test_from_settings_bad_jwks_file_names_the_key(tmp_path, content):
    path = tmp_path / "jwks.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"auth\.jwks_file"):
        TokenVerifier.from_settings(settings_with(jwks_file=str(path)), SECRET)


# --- issue_token -------------------------------------------------------------------------

def test_issue_token_claims_are_supabase_shaped():
    now = time.time()
    token = issue_token(SECRET, user_id=USER.upper(), email="a@b.c", expires_in_s=900,
                        issuer=ISSUER, session_id=SESSION, now=now)
    header = pyjwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    c = pyjwt.decode(token, SECRET, algorithms=["HS256"], audience="authenticated")
    assert c["sub"] == USER
    assert c["iss"] == ISSUER
    assert c["aud"] == "authenticated"
    assert c["iat"] == int(now)
    assert c["exp"] == int(now) + 900
    assert c["email"] == "a@b.c"
    assert c["phone"] == ""
    assert c["role"] == "authenticated"
    assert c["aal"] == "aal1"
    assert c["session_id"] == SESSION
    assert c["is_anonymous"] is False
    assert c["app_metadata"] == {"provider": "email", "providers": ["email"]}
    assert c["user_metadata"] == {}


def test_issue_token_round_trip_through_verifier():
    v = TokenVerifier(AuthSettings(issuer=ISSUER), hs256_secret=SECRET)
    p = v.verify(issue_token(SECRET, user_id=USER, issuer=ISSUER, role="authenticated"))
    assert (p.user_id, p.email, p.role, p.session_id) == (USER, None, "authenticated", None)
    assert "iss" not in pyjwt.decode(issue_token(SECRET, user_id=USER), SECRET,
                                     algorithms=["HS256"], audience="authenticated")


def test_issued_token_expires():
    v = TokenVerifier(AuthSettings(leeway_s=0), hs256_secret=SECRET)
    old = issue_token(SECRET, user_id=USER, expires_in_s=60, now=time.time() - 120)
    with pytest.raises(Unauthorized, match="expired"):
        v.verify(old)


def test_issued_token_is_bound_to_its_secret():
    v = TokenVerifier(AuthSettings(), hs256_secret=SECRET)
    with pytest.raises(Unauthorized, match="signature"):
        v.verify(issue_token("some-other-secret-" + "q" * 40, user_id=USER))


def test_short_hs256_secret_is_refused():
    with pytest.raises(ConfigError, match=r"auth\.jwt_secret.*32 bytes"):
        TokenVerifier(AuthSettings(), hs256_secret="short")


@pytest.mark.parametrize("kwargs", [
    {"secret": "", "user_id": USER},
    {"secret": "x" * 31, "user_id": USER},
    {"secret": SECRET, "user_id": "not-a-uuid"},
    {"secret": SECRET, "user_id": USER, "expires_in_s": 0},
])
def test_issue_token_rejects_bad_arguments(kwargs):
    secret = kwargs.pop("secret")
    with pytest.raises(ValueError):
        issue_token(secret, **kwargs)


# --- load_or_create_secret ---------------------------------------------------------------

def test_secret_created_once_and_stable(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data"
    first = load_or_create_secret(data, "")
    path = data / "jwt_secret"
    assert path.read_text(encoding="utf-8") == first
    assert len(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4))) == 64
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    mtime = path.stat().st_mtime_ns
    assert load_or_create_secret(data, "") == first
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in data.iterdir()) == ["jwt_secret"]  # no temp files left
    assert first not in caplog.text
    # Different data dirs get different secrets.
    assert load_or_create_secret(tmp_path / "other", "") != first


def test_configured_secret_wins(tmp_path):
    assert load_or_create_secret(tmp_path, "from-config") == "from-config"
    assert not (tmp_path / "jwt_secret").exists()
    (tmp_path / "jwt_secret").write_text("on-disk", encoding="utf-8")
    assert load_or_create_secret(tmp_path, "from-config") == "from-config"


def test_existing_secret_file_is_read_and_trimmed(tmp_path):
    (tmp_path / "jwt_secret").write_text("  hand-made-secret\n", encoding="utf-8")
    assert load_or_create_secret(tmp_path, "") == "hand-made-secret"


def test_empty_secret_file_is_an_error_not_replaced(tmp_path):
    path = tmp_path / "jwt_secret"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_or_create_secret(tmp_path, "")
    assert path.read_text(encoding="utf-8") == "\n"


def test_concurrent_creator_wins_without_being_clobbered(tmp_path, monkeypatch):
    # Simulate another process creating the file between our read and our write.
    real_read = keys_mod._read_secret
    calls = []

    def racing_read(path: Path):
        calls.append(path)
        if len(calls) == 1:
            path.write_text("theirs", encoding="utf-8")
            return None
        return real_read(path)

    monkeypatch.setattr(keys_mod, "_read_secret", racing_read)
    assert load_or_create_secret(tmp_path, "") == "theirs"
    assert (tmp_path / "jwt_secret").read_text(encoding="utf-8") == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jwt_secret"]


def test_verified_token_is_remembered_until_it_expires(monkeypatch) -> None:
    """The cache must never outlive the token: after exp (+ leeway) it is checked again."""
    import time as _time

    from medmitra.auth import jwt as jwt_mod
    from medmitra.config import AuthSettings

    secret = "s" * 40
    v = jwt_mod.TokenVerifier(AuthSettings(leeway_s=0), hs256_secret=secret)
    uid = "0b7c5a0e-7d1b-4c41-9d38-6a3f2d1e0c11"
    now = _time.time()
    token = jwt_mod.issue_token(secret, user_id=uid, expires_in_s=60, now=now)
    calls = []
    real = v._verify
    monkeypatch.setattr(v, "_verify", lambda t: calls.append(t) or real(t))
    assert v.verify(token).user_id == uid
    assert v.verify(token).user_id == uid
    assert len(calls) == 1                      # second call served from the cache
    # Past exp the cached answer is dropped and the token is checked in full again
    # (where PyJWT's own clock decides; expired tokens are covered by the table above).
    monkeypatch.setattr(jwt_mod.time, "time", lambda: now + 61)
    v.verify(token)
    assert len(calls) == 2
    other = jwt_mod.issue_token(secret, user_id=uid, expires_in_s=60, now=now) + "x"
    with pytest.raises(Unauthorized):
        v.verify(other)                         # a different string never hits the cache
