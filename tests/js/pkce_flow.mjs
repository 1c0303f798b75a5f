// Drives a REAL supabase-js client through the PKCE sign-in of a MedMitra Edge server, the
// way the original frontend (@supabase/ssr, flowType 'pkce') does, in two steps around the
// sign-in page that a browser (or the test's form post) fills in:
//   node pkce_flow.mjs begin    <server url> <redirect_to> <state file>
//     signInWithOAuth({provider: 'google', skipBrowserRedirect}) -> prints {"url": ...}
//   node pkce_flow.mjs exchange <server url> <code> <state file>
//     exchangeCodeForSession(code), then getUser() and the case API with the session
// The client's storage (where supabase-js keeps the code verifier between the two steps, as
// @supabase/ssr keeps it in a cookie) is the JSON state file. tests/test_auth_pkce_js.py
// asserts on the one JSON line printed.
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { createClient } from '@supabase/supabase-js';
import WebSocket from 'ws';

const [mode, url, arg, stateFile] = process.argv.slice(2);

function load() {
  return existsSync(stateFile) ? JSON.parse(readFileSync(stateFile, 'utf8') || '{}') : {};
}
const fileStorage = {
  getItem: (key) => load()[key] ?? null,
  setItem: (key, value) => { const s = load(); s[key] = value; writeFileSync(stateFile, JSON.stringify(s)); },
  removeItem: (key) => { const s = load(); delete s[key]; writeFileSync(stateFile, JSON.stringify(s)); },
};

const supabase = createClient(url, 'local-anon-key', {
  auth: { flowType: 'pkce', storage: fileStorage, persistSession: true,
          autoRefreshToken: false, detectSessionInUrl: false },
  // supabase-js 2.x on Node 20 needs a WebSocket implementation for its realtime part.
  realtime: { transport: WebSocket },
});

function errorOf(error) {
  return error ? { name: error.name, status: error.status ?? null, code: error.code ?? null,
                   message: error.message } : null;
}

const out = { mode };
if (mode === 'begin') {
  const { data, error } = await supabase.auth.signInWithOAuth({
    provider: 'google', options: { redirectTo: arg, skipBrowserRedirect: true } });
  out.error = errorOf(error);
  out.url = data?.url ?? null;
} else if (mode === 'exchange') {
  const { data, error } = await supabase.auth.exchangeCodeForSession(arg);
  out.error = errorOf(error);
  const session = data?.session ?? null;
  out.session = session && {
    user_id: session.user?.id, email: session.user?.email, token_type: session.token_type,
    has_access_token: Boolean(session.access_token), has_refresh_token: Boolean(session.refresh_token),
  };
  if (session) {
    const got = await supabase.auth.getUser();
    out.get_user = { id: got.data.user?.id ?? null, error: errorOf(got.error) };
    const res = await fetch(`${url}/cases/all_cases`,
                            { headers: { Authorization: `Bearer ${session.access_token}` } });
    out.all_cases_status = res.status;
  }
} else {
  out.error = { message: `unknown mode ${mode}` };
}
console.log(JSON.stringify(out));
