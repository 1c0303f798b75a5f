// New case: patient fields and files in ONE multipart request, so the server creates the
// case and all its files together or nothing at all.
import { clientConfig, upload } from "./api.js";
import { fileNamedIn, filePicker } from "./files.js";
import { navigate } from "./main.js";
import { alertBox, announce, field, formatBytes, h, progressBar, showFieldErrors } from "./ui.js";

export async function render(main) {
  const config = await clientConfig();
  const lim = config.limits;
  const status = h("div", { class: "form-status" });
  const name = h("input", { name: "patient_name", autocomplete: "off", maxLength: lim.name_max_chars, "aria-required": "true" });
  const age = h("input", { name: "patient_age", type: "number", inputMode: "numeric", min: 0, max: lim.max_age, "aria-required": "true" });
  const gender = h("select", { name: "patient_gender", "aria-required": "true" },
    h("option", { value: "", text: "Choose…" }),
    [["female", "Female"], ["male", "Male"], ["other", "Other"]].map(([v, t]) => h("option", { value: v, text: t })));
  const summary = h("textarea", { name: "case_summary", rows: 4, maxLength: lim.text_field_max_chars });
  const progress = progressBar("Upload progress");
  progress.el.hidden = true;
  const submit = h("button", { type: "submit", text: "Create case and start the analysis" });
  const cancel = h("button", { type: "button", class: "secondary", text: "Cancel upload", hidden: true });

  const pickers = [
    filePicker({ category: "lab", label: "Lab reports", config }),
    filePicker({ category: "radiology", label: "Radiology images", config }),
  ];

  const form = h("form", { class: "card case-form", novalidate: true },
    status,
    h("fieldset", {}, h("legend", { text: "Patient" }),
      h("div", { class: "grid-3" },
        field("Patient name", name),
        field("Age (years)", age),
        field("Gender", gender)),
      field("Case summary (optional)", summary, "Presenting complaint, history, notes for the analysis.")),
    h("fieldset", {}, h("legend", { text: "Files (optional)" }),
      h("div", { class: "grid-2" }, pickers.map((p) => p.el))),
    progress.el,
    h("div", { class: "actions" }, submit, cancel,
      h("a", { href: "/app/", "data-nav": true, class: "button secondary", text: "Back to cases" })));

  main.append(h("div", { class: "page-head" }, h("h1", { text: "New case" })), form);
  let pending = null;

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    status.replaceChildren();
    showFieldErrors(form, {});
    const chosen = pickers.flatMap((p) => p.files().map((f) => [p.category, f]));
    const total = chosen.reduce((n, [, f]) => n + f.size, 0);
    if (chosen.length > lim.files_per_request) {
      status.append(alertBox(`At most ${lim.files_per_request} files can be sent with a case; add the others on the case page.`));
      return;
    }
    if (total > lim.request_max_bytes) {
      status.append(alertBox(`The files add up to ${formatBytes(total)}; one request may carry ${formatBytes(lim.request_max_bytes)}. Add the others on the case page.`));
      return;
    }
    const body = new FormData();
    body.set("patient_name", name.value);
    body.set("patient_age", age.value);
    body.set("patient_gender", gender.value);
    if (summary.value.trim()) body.set("case_summary", summary.value);
    for (const [category, f] of chosen) body.append(`${category}_files`, f, f.name);

    submit.disabled = true;
    cancel.hidden = false;
    progress.el.hidden = false;
    progress.set(0);
    pending = upload("/cases/create_case", body, (x) => progress.set(x));
    cancel.onclick = () => pending.abort();
    try {
      const res = await pending.promise;
      announce("Case created. The analysis has started.");
      navigate(`/app/cases/${res.case.case_id}`, { replace: true, state: { created: true } });
    } catch (err) {
      if (err.name === "AuthError") throw err;
      progress.el.hidden = true;
      const first = showFieldErrors(form, err.fields || {});
      const fileName = fileNamedIn(err.message);
      const marked = fileName && pickers.some((p) => p.markRefused(fileName, err.message));
      status.append(alertBox(marked
        ? `${err.message}. Nothing was saved: remove that file and try again.`
        : first ? "Please correct the marked fields. Nothing was saved." : `${err.message} Nothing was saved.`));
      (first || status).focus?.();
      if (!first) status.scrollIntoView({ block: "center" });
    } finally {
      submit.disabled = false;
      cancel.hidden = true;
      pending = null;
    }
  });
  name.focus();
  return () => {
    if (pending) pending.abort();
  };
}
