// Every data call of the app: the same JSON API and Bearer token as any other client.
import { accessToken, refresh } from "./auth.js";

export class ApiError extends Error {
  // status 0 = no answer; fields = { field name: message } from the server's "errors".
  constructor(status, message, fields = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.fields = fields;
  }
}

const UNREACHABLE = "The server cannot be reached. Check the connection and try again.";

function errorFrom(status, data) {
  const fields = {};
  for (const e of (data && data.errors) || []) {
    const name = Array.isArray(e.loc) ? e.loc[e.loc.length - 1] : null;
    if (name) fields[name] = e.msg;
  }
  const msg = (data && (data.detail || data.error || data.msg)) || `Request failed (HTTP ${status}).`;
  return new ApiError(status, msg, fields);
}

async function parse(res) {
  const type = res.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await res.json().catch(() => null) : null;
  if (!res.ok) throw errorFrom(res.status, data);
  return data;
}

// JSON request; a 401 refreshes the session once and retries.
export async function api(path, { method = "GET", json, signal } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const headers = { Authorization: `Bearer ${await accessToken()}`, Accept: "application/json" };
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body, signal, cache: "no-store", credentials: "omit" });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, UNREACHABLE);
    }
    if (res.status === 401 && attempt === 0) {
      await refresh();
      continue;
    }
    return parse(res);
  }
}

// Bytes of an authenticated route (e.g. a preview) as { url: object URL, headers }.
export async function objectUrl(path) {
  for (let attempt = 0; ; attempt += 1) {
    let res;
    try {
      res = await fetch(path, { headers: { Authorization: `Bearer ${await accessToken()}` }, credentials: "omit" });
    } catch {
      throw new ApiError(0, UNREACHABLE);
    }
    if (res.status === 401 && attempt === 0) {
      await refresh();
      continue;
    }
    if (!res.ok) throw errorFrom(res.status, await res.json().catch(() => null));
    return { url: URL.createObjectURL(await res.blob()), headers: res.headers };
  }
}

// Multipart upload with progress (fetch cannot report upload progress; XHR can).
// Returns { promise, abort }. onProgress(fraction) is called while bytes go out.
export function upload(path, formData, onProgress) {
  let xhr = null;
  let aborted = false;
  const send = (token) =>
    new Promise((resolve, reject) => {
      xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      xhr.setRequestHeader("Authorization", `Bearer ${token}`);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.responseType = "json";
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total);
      };
      xhr.onload = () => resolve(xhr);
      xhr.onerror = () => reject(new ApiError(0, UNREACHABLE));
      xhr.onabort = () => reject(new ApiError(0, "Upload cancelled."));
      xhr.send(formData);
    });
  const promise = (async () => {
    for (let attempt = 0; ; attempt += 1) {
      const done = await send(await accessToken());
      if (done.status === 401 && attempt === 0 && !aborted) {
        await refresh();
        continue;
      }
      if (done.status >= 200 && done.status < 300) return done.response;
      throw errorFrom(done.status, done.response);
    }
  })();
  return {
    promise,
    abort() {
      aborted = true;
      if (xhr) xhr.abort();
    },
  };
}

let configPromise = null;
// Limits and accepted types as this server publishes them (public, cached per page load).
export function clientConfig() {
  if (!configPromise) {
    configPromise = fetch("/app/config.json", { credentials: "omit" }).then((r) => {
      if (!r.ok) throw new ApiError(r.status, "The app settings could not be loaded.");
      return r.json();
    });
    configPromise.catch(() => {
      configPromise = null;
    });
  }
  return configPromise;
}
