// The signed-in session. The access token lives only in this module's memory (never in a
// URL, never in storage a page reload keeps readable by other tabs); the refresh token is
// kept in this tab's sessionStorage so a reload signs in again quietly, and it is rotated
// by the server on every use. See docs/web-app.md for why.

const STORE_KEY = "medmitra.session";
// Refresh this long before the access token expires, so no request is sent with a token
// that dies on the way.
const EARLY_REFRESH_MS = 20_000;

let access = null;      // { token, expiresAt (ms since epoch) }
let user = null;        // the user object of the token response
let refreshing = null;  // the one refresh in flight, shared by every caller

export class AuthError extends Error {
  constructor(message, code) {
    super(message);
    this.name = "AuthError";
    this.code = code;
  }
}

function stored() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
  } catch {
    return null;
  }
}

function keep(body) {
  access = { token: body.access_token, expiresAt: Date.now() + body.expires_in * 1000 };
  user = body.user || null;
  sessionStorage.setItem(STORE_KEY, JSON.stringify({ refresh_token: body.refresh_token }));
}

export function clearSession() {
  access = null;
  user = null;
  sessionStorage.removeItem(STORE_KEY);
}

export const currentUser = () => user;
export const hasSession = () => Boolean(access || stored()?.refresh_token);

function message(res, data) {
  if (res.status === 429) {
    const s = parseInt(res.headers.get("Retry-After") || "", 10);
    return `Too many sign-in attempts from this computer. Wait ${s > 0 ? `${s} seconds` : "a minute"} and try again.`;
  }
  switch (data.error_code) {
    case "invalid_credentials":
      return "Wrong email or password.";
    case "user_banned":
      return "This account is disabled. Ask your administrator to enable it again.";
    case "refresh_token_not_found":
    case "refresh_token_already_used":
    case "session_not_found":
    case "session_expired":
      return "Your session has ended. Please sign in again.";
    case "validation_failed":
      return data.msg || "Enter your email and password.";
    default:
      return data.msg || data.error || `Sign-in failed (HTTP ${res.status}).`;
  }
}

async function tokenRequest(grant, body) {
  let res;
  try {
    res = await fetch(`/auth/v1/token?grant_type=${grant}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
  } catch {
    throw new AuthError("The server cannot be reached. Check the connection and try again.", "network");
  }
  let data = {};
  try {
    data = await res.json();
  } catch {
    /* an empty or non-JSON body: the status speaks */
  }
  if (res.ok) return data;
  throw new AuthError(message(res, data), res.status === 429 ? "rate_limited" : data.error_code || `http_${res.status}`);
}

export async function signIn(email, password) {
  keep(await tokenRequest("password", { email, password }));
  return user;
}

// One refresh at a time: concurrent callers wait for the same answer (a second use of a
// rotated refresh token would look like a replay to the server).
export function refresh() {
  if (!refreshing) {
    refreshing = (async () => {
      const token = stored()?.refresh_token;
      if (!token) throw new AuthError("Please sign in.", "no_session");
      try {
        keep(await tokenRequest("refresh_token", { refresh_token: token }));
      } catch (err) {
        // A network hiccup or a rate limit keeps the session for the next try; anything
        // else ended it, and the app says so wherever the user is.
        if (err.code !== "network" && err.code !== "rate_limited") {
          clearSession();
          window.dispatchEvent(new CustomEvent("medmitra:session-ended", { detail: err.message }));
        }
        throw err;
      }
    })().finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

export async function accessToken() {
  if (!access || access.expiresAt - Date.now() < EARLY_REFRESH_MS) await refresh();
  return access.token;
}

export async function signOut() {
  let token = null;
  try {
    token = await accessToken();
  } catch {
    /* already ended: nothing to revoke */
  }
  clearSession();
  if (token) {
    try {
      // scope=local ends this sign-in only; other devices stay signed in.
      await fetch("/auth/v1/logout?scope=local", {
        method: "POST",
        headers: { Authorization: `Bearer ${token}` },
        credentials: "omit",
      });
    } catch {
      /* the local session is gone either way */
    }
  }
}
