"""A REAL supabase-js client against a running server (issue 5).

The client is installed from the npm registry into tests/js (package.json pins it) when
node_modules is missing. The node script signs in, calls getUser() and getClaims(),
refreshes, uses the token it holds on the case API, then signs out; it prints what it saw
as JSON and this test checks it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from medmitra.auth import users
from medmitra.db.models import Case

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "supabase_flow.mjs"
NPM_INSTALL_TIMEOUT_S = 600
SCRIPT_TIMEOUT_S = 120

EMAIL = "Dr.Rao@Clinic.test"      # mixed case on purpose: sign-in must ignore it
PASSWORD = "a long clinic passphrase"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node() -> str:
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if not node_bin or not npm_bin:
        pytest.skip("node and npm are needed to run the real supabase-js client")
    if not (JS_DIR / "node_modules" / "@supabase" / "supabase-js").is_dir():
        # ci installs exactly what package-lock.json pins.
        command = "ci" if (JS_DIR / "package-lock.json").is_file() else "install"
        proc = subprocess.run([npm_bin, command, "--no-audit", "--no-fund"], cwd=JS_DIR,
                              capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT_S)
        assert proc.returncode == 0, f"npm {command} failed:\n{proc.stderr[-3000:]}"
    return node_bin


def test_supabase_js_signs_in_refreshes_uses_case_api_and_signs_out(node, start_server):
    server = start_server()
    user = server.run(users.create_user(EMAIL.lower(), PASSWORD))

    proc = subprocess.run([node, str(SCRIPT), server.url, EMAIL, PASSWORD], cwd=JS_DIR,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 0, f"node script failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["steps"] == ["signInWithPassword", "getUser", "getClaims", "refreshSession",
                            "case API", "signOut"]
    # auth-js turned the error body into its own error class with Supabase's code.
    assert out["wrong_password"] == {"name": "AuthApiError", "status": 400,
                                     "code": "invalid_credentials"}
    assert out["sign_in"]["user_id"] == user.id
    assert out["sign_in"]["email"] == EMAIL.lower()
    assert out["sign_in"]["token_type"] == "bearer"
    assert out["sign_in"]["expires_in"] == server.settings.auth.access_token_ttl_s
    assert out["get_user"] == {"id": user.id, "email": EMAIL.lower(), "aud": "authenticated"}

    # getClaims verified the ES256 signature with the published JWKS (no /user fallback).
    header, claims = out["claims"]["header"], out["claims"]["claims"]
    assert header["alg"] == "ES256" and header["kid"]
    assert out["claims"]["requests"] == ["GET /auth/v1/.well-known/jwks.json"]
    assert claims["sub"] == user.id and claims["role"] == "authenticated"
    assert claims["session_id"] and claims["aal"] == "aal1" and claims["is_anonymous"] is False

    assert out["refresh"] == {"new_access_token": True, "new_refresh_token": True}

    # The refreshed token created and read a case owned by the signed-in user.
    assert out["create_case"]["status"] == 201
    assert out["create_case"]["user_id"] == user.id
    assert out["read_case"] == {"status": 200, "patient_name": "Asha Verma"}
    async def owner(case_id: str) -> str:
        return (await Case.get(case_id=case_id)).user_id

    assert server.run(owner(out["create_case"]["case_id"])) == user.id

    # signOut() revoked the session on the server: the token it held is refused.
    assert out["after_sign_out"] == {"session": None, "all_cases_status": 401,
                                     "get_user_error": "AuthSessionMissingError"}
    assert "POST /auth/v1/logout" in out["requests"]
