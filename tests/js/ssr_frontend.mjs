// The original MedMitra frontend's server side, as its code does it, with the REAL
// @supabase/ssr against a MedMitra Edge server:
//   1. the "Sign in with Google" server action: createServerClient(...).auth.signInWithOAuth
//      ({provider: 'google', options: {redirectTo: <origin>/auth/callback}});
//   2. the browser on the server's sign-in page (here: a plain form post of the page);
//   3. the /auth/callback route: exchangeCodeForSession(code), session kept in cookies;
//   4. N quick page views: the middleware's getUser() and the page's own 1-3 getUser()
//      calls, each with a fresh createServerClient over the same cookies, then the page's
//      case list call as the frontend's api-client sends it (?user_id=..., no token).
// Usage: node ssr_frontend.mjs <server url> <redirect_to> <email> <password> <page views>
// Prints one JSON line; tests/test_auth_pkce_js.py asserts on it.
import { createServerClient } from '@supabase/ssr';
import WebSocket from 'ws';

const [url, redirectTo, email, password, viewsArg] = process.argv.slice(2);
const views = Number(viewsArg);
const jar = new Map();            // the browser's cookies for the frontend's origin
const out = { requests: {}, statuses: {} };

function count(where, key) { where[key] = (where[key] ?? 0) + 1; }

async function recordingFetch(input, init = {}) {
  const target = new URL(typeof input === 'string' ? input : input.url);
  const res = await fetch(input, init);
  const key = `${init.method ?? 'GET'} ${target.pathname}`;
  count(out.requests, key);
  count(out.statuses, `${key} ${res.status}`);
  return res;
}

function nextServerClient() {
  return createServerClient(url, 'medmitra-local', {
    cookies: {
      getAll: () => [...jar].map(([name, value]) => ({ name, value })),
      setAll: (cookies) => cookies.forEach(({ name, value }) =>
        value ? jar.set(name, value) : jar.delete(name)),
    },
    global: { fetch: recordingFetch },
    realtime: { transport: WebSocket },
  });
}

function fail(step, detail) {
  out.failed = { step, detail: String(detail?.message ?? detail) };
  console.log(JSON.stringify(out));
  process.exit(1);
}

// 1. The server action.
const started = await nextServerClient().auth.signInWithOAuth({
  provider: 'google', options: { redirectTo } });
if (started.error || !started.data.url) fail('signInWithOAuth', started.error);
out.authorize_url = started.data.url;
out.verifier_cookie = [...jar.keys()].some((k) => k.endsWith('-code-verifier'));

// 2. The sign-in page, filled in.
const page = await fetch(started.data.url);
const html = await page.text();
const action = html.match(/<form method="post" action="([^"]+)"/)?.[1]?.replaceAll('&amp;', '&');
const csrf = html.match(/name="csrf_token" value="([^"]+)"/)?.[1];
const cookie = (page.headers.get('set-cookie') ?? '').split(';')[0];
if (!action || !csrf) fail('sign-in page', `${page.status} ${html.slice(0, 300)}`);
const posted = await fetch(new URL(action, url), {
  method: 'POST', redirect: 'manual',
  headers: { 'Content-Type': 'application/x-www-form-urlencoded', Cookie: cookie },
  body: new URLSearchParams({ csrf_token: csrf, email, password }),
});
const location = posted.headers.get('location');
if (posted.status !== 302 || !location) fail('sign-in form', `${posted.status}`);
const code = new URL(location).searchParams.get('code');
out.redirected_to = location.split('?')[0];

// 3. The /auth/callback route.
const exchanged = await nextServerClient().auth.exchangeCodeForSession(code);
if (exchanged.error) fail('exchangeCodeForSession', exchanged.error);
out.user_id = exchanged.data.user.id;

// 4. Quick page views.
out.signed_in_views = 0;
out.case_list_statuses = [];
for (let view = 0; view < views; view += 1) {
  let signedIn = true;
  for (let call = 0; call < 2 + (view % 3); call += 1) {
    const { data, error } = await nextServerClient().auth.getUser();
    signedIn &&= !error && data.user?.id === out.user_id;
  }
  if (signedIn) out.signed_in_views += 1;
  const list = await fetch(`${url}/cases/all_cases?user_id=${out.user_id}`);
  out.case_list_statuses.push(list.status);
}
console.log(JSON.stringify(out));
