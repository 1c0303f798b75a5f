// The app's router: one HTML shell, a page module per URL, history navigation.
import { AuthError, currentUser, hasSession, refresh, signOut } from "./auth.js";
import { h } from "./ui.js";

const main = document.getElementById("main");
const topbar = document.getElementById("topbar");

// Window titles name the page, never the patient (titles end up in browser history).
const ROUTES = [
  [/^\/app\/signin$/, () => import("./signin.js"), { public: true, title: "Sign in" }],
  [/^\/app\/?$/, () => import("./list.js"), { title: "Cases" }],
  [/^\/app\/cases\/new$/, () => import("./newcase.js"), { title: "New case" }],
  [/^\/app\/cases\/([^/]+)$/, () => import("./casepage.js"), { title: "Case" }],
];

let cleanup = null;
let generation = 0;

export function navigate(url, { replace = false, state = null } = {}) {
  if (replace) history.replaceState(state, "", url);
  else history.pushState(state, "", url);
  render();
}

// After sign-in, only a page of this app may be the next stop.
export function safeNext(raw) {
  return raw && /^\/app\/[\w\-/?=&.%]*$/.test(raw) && !raw.startsWith("/app/signin") ? raw : "/app/";
}

export function toSignIn(message) {
  if (location.pathname === "/app/signin" && (history.state || {}).message === message) return;
  const next = location.pathname.startsWith("/app/signin") ? "" : `?next=${encodeURIComponent(location.pathname + location.search)}`;
  navigate(`/app/signin${next}`, { replace: true, state: message ? { message } : null });
}

function showTopbar(visible) {
  topbar.hidden = !visible;
  const user = currentUser();
  document.getElementById("account-email").textContent = user ? user.email : "";
  for (const a of topbar.querySelectorAll("nav a")) {
    const here = a.getAttribute("href") === location.pathname || (a.getAttribute("href") === "/app/" && location.pathname === "/app");
    if (here) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

async function render() {
  const mine = ++generation;
  if (cleanup) cleanup();
  cleanup = null;
  const path = location.pathname;
  const route = ROUTES.find(([re]) => re.test(path));
  if (!route) {
    showTopbar(hasSession());
    main.replaceChildren(h("h1", { text: "Page not found" }), h("p", {}, h("a", { href: "/app/", "data-nav": true, text: "Go to the case list" })));
    return;
  }
  const [re, load, opts = {}] = route;
  try {
    if (!opts.public && !hasSession()) return toSignIn();
    const loading = load(); // the page's module loads while the session is renewed
    loading.catch(() => {}); // its failure is reported where it is awaited, not twice
    if (!opts.public && !currentUser()) await refresh(); // a reload: a fresh access token, quietly
    const mod = await loading;
    if (mine !== generation) return;
    showTopbar(!opts.public);
    document.title = `${opts.title} · MedMitra Edge`;
    main.replaceChildren();
    main.setAttribute("aria-busy", "true");
    cleanup = (await mod.render(main, path.match(re).slice(1), history.state || {})) || null;
    main.removeAttribute("aria-busy");
    if (mine !== generation) return;
    // Move focus to the new page's heading so screen readers and keyboards start there.
    const heading = main.querySelector("h1");
    if (heading && !main.contains(document.activeElement)) {
      heading.tabIndex = -1;
      heading.focus({ preventScroll: true });
    }
  } catch (err) {
    main.removeAttribute("aria-busy");
    if (err instanceof AuthError) return toSignIn(err.message);
    throw err;
  }
}

// Auth failures anywhere (a poll, a button) end at the sign-in page with the reason.
window.addEventListener("unhandledrejection", (e) => {
  if (e.reason instanceof AuthError) {
    e.preventDefault();
    toSignIn(e.reason.message);
  }
});

window.addEventListener("medmitra:session-ended", (e) => toSignIn(e.detail));

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-nav]");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});

window.addEventListener("popstate", render);

document.getElementById("sign-out").addEventListener("click", async () => {
  await signOut();
  navigate("/app/signin", { replace: true, state: { message: "You are signed out.", kind: "info" } });
});

render();
