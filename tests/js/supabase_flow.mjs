// Drives a REAL supabase-js client against a running MedMitra Edge server.
// Usage: node supabase_flow.mjs <server url> <email> <password>
// Prints one JSON object with what it observed; tests/test_supabase_js.py asserts on it.
// Exits 1 (with {"failed": ...}) on the first step that does not behave like Supabase.
import { createClient } from '@supabase/supabase-js';
import WebSocket from 'ws';

const [url, email, password] = process.argv.slice(2);
const out = { steps: [] };

function fail(step, error) {
  out.failed = { step, message: error?.message ?? String(error), code: error?.code ?? null };
  console.log(JSON.stringify(out));
  process.exit(1);
}

// Every request supabase-js makes, as "METHOD /path", to show which endpoints it used.
out.requests = [];
async function recordingFetch(input, init = {}) {
  const target = new URL(typeof input === 'string' ? input : input.url);
  out.requests.push(`${init.method ?? 'GET'} ${target.pathname}`);
  return fetch(input, init);
}

function client() {
  // supabase-js 2.x on Node 20 needs a WebSocket implementation for its realtime part.
  return createClient(url, 'local-anon-key', {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    realtime: { transport: WebSocket },
    global: { fetch: recordingFetch },
  });
}

async function caseApi(token, path, init = {}) {
  const res = await fetch(`${url}${path}`, {
    ...init,
    headers: { ...(init.headers ?? {}), Authorization: `Bearer ${token}` },
  });
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  return { status: res.status, body };
}

const supabase = client();

// 1. A wrong password is an AuthApiError with Supabase's code (separate client: no session).
const wrong = await client().auth.signInWithPassword({ email, password: `${password}-wrong` });
out.wrong_password = { name: wrong.error?.name, status: wrong.error?.status, code: wrong.error?.code };

// 2. Sign in.
const signIn = await supabase.auth.signInWithPassword({ email, password });
if (signIn.error) fail('signInWithPassword', signIn.error);
const first = signIn.data.session;
out.steps.push('signInWithPassword');
out.sign_in = {
  user_id: signIn.data.user.id, email: signIn.data.user.email,
  token_type: first.token_type, expires_in: first.expires_in, expires_at: first.expires_at,
};

// 3. getUser() asks the server.
const got = await supabase.auth.getUser();
if (got.error) fail('getUser', got.error);
out.steps.push('getUser');
out.get_user = { id: got.data.user.id, email: got.data.user.email, aud: got.data.user.aud };

// 4. getClaims() verifies the ES256 signature itself with the server's JWKS.
const before = out.requests.length;
const claims = await supabase.auth.getClaims();
if (claims.error) fail('getClaims', claims.error);
out.steps.push('getClaims');
out.claims = { header: claims.data.header, claims: claims.data.claims,
               requests: out.requests.slice(before) };

// 5. Refresh: new access and refresh tokens, same session.
const refreshed = await supabase.auth.refreshSession();
if (refreshed.error) fail('refreshSession', refreshed.error);
const second = refreshed.data.session;
out.steps.push('refreshSession');
out.refresh = {
  new_access_token: second.access_token !== first.access_token,
  new_refresh_token: second.refresh_token !== first.refresh_token,
};

// 6. The token supabase-js now holds works on the case API.
const { data: { session } } = await supabase.auth.getSession();
const token = session.access_token;
const form = new FormData();
form.append('patient_name', 'Asha Verma');
form.append('patient_age', '42');
form.append('patient_gender', 'female');
const created = await caseApi(token, '/cases/create_case', { method: 'POST', body: form });
out.create_case = { status: created.status, case_id: created.body?.case?.case_id ?? null,
                    user_id: created.body?.case?.user_id ?? null };
const read = await caseApi(token, `/cases/cases/${out.create_case.case_id}`);
out.read_case = { status: read.status, patient_name: read.body?.case?.patient_name ?? null };
out.steps.push('case API');

// 7. signOut() revokes the session on the server; the held token is now useless.
const signedOut = await supabase.auth.signOut();
if (signedOut.error) fail('signOut', signedOut.error);
out.steps.push('signOut');
out.after_sign_out = {
  session: (await supabase.auth.getSession()).data.session,
  all_cases_status: (await caseApi(token, '/cases/all_cases')).status,
  get_user_error: (await supabase.auth.getUser(token)).error?.name ?? null,
};

console.log(JSON.stringify(out));
process.exit(0);
