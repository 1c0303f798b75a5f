// Sign-in with a local account (password grant of /auth/v1/token).
import { signIn } from "./auth.js";
import { navigate, safeNext } from "./main.js";
import { alertBox, h } from "./ui.js";

export function render(main, _params, state) {
  const email = h("input", { id: "email", name: "email", type: "email", autocomplete: "username", required: true });
  const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const status = h("div", { class: "form-status" });
  const button = h("button", { type: "submit", text: "Sign in" });
  if (state.message) status.append(alertBox(state.message, state.kind || "error"));

  const form = h("form", { class: "signin card", novalidate: true },
    h("h1", { text: "Sign in to MedMitra Edge" }),
    status,
    h("div", { class: "field" }, h("label", { for: "email", text: "Email" }), email),
    h("div", { class: "field" }, h("label", { for: "password", text: "Password" }), password),
    button,
    h("p", { class: "hint" }, "No account yet? The server's administrator creates one with ",
      h("code", { text: "medmitra users add --email <address>" }), " on the server. There is no self sign-up."));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    status.replaceChildren();
    if (!email.value.trim() || !password.value) {
      status.append(alertBox("Enter your email and password."));
      return;
    }
    button.disabled = true;
    button.textContent = "Signing in…";
    try {
      await signIn(email.value.trim(), password.value);
      navigate(safeNext(new URLSearchParams(location.search).get("next")), { replace: true });
    } catch (err) {
      password.value = "";
      status.append(alertBox(err.message));
      password.focus();
    } finally {
      button.disabled = false;
      button.textContent = "Sign in";
    }
  });
  main.append(h("div", { class: "signin-page" }, form));
  email.focus();
}
