// Small DOM helpers shared by the pages. Text is always set as text (never as HTML).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k === "value") el.value = v; // a property: textarea has no value attribute
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function formatDate(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function percent(score) {
  return typeof score === "number" ? `${Math.round(score * 100)} %` : "not assessed";
}

const STATUS_LABELS = { processing: "Analysing", completed: "Completed", failed: "Failed" };

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-status": status, text: STATUS_LABELS[status] || status });
}

export function setStatusBadge(el, status) {
  el.className = `badge status-${status}`;
  el.dataset.status = status;
  el.textContent = STATUS_LABELS[status] || status;
}

const STAGE_LABELS = {
  extract: "Reading the files",
  lab_analysis: "Interpreting lab results",
  radiology_analysis: "Reading radiology files",
  case_summary: "Summarising the case",
  soap_note: "Writing the SOAP note",
  diagnosis: "Working out a diagnosis",
  differential: "Weighing differential diagnoses",
  recommendations: "Recommending investigations and treatment",
  compile: "Putting the report together",
};

export const stageLabel = (stage) => STAGE_LABELS[stage] || (stage ? stage.replace(/_/g, " ") : "Starting");

export function announce(text) {
  const live = document.getElementById("announcer");
  live.textContent = "";
  // A fresh text node after a tick is announced even when the text repeats.
  setTimeout(() => {
    live.textContent = text;
  }, 50);
}

// A modal confirmation (native <dialog>: focus trapped, Escape cancels). Resolves true/false.
export function confirmDialog(text, okLabel = "Delete") {
  const dialog = document.getElementById("confirm-dialog");
  dialog.querySelector("#confirm-text").textContent = text;
  dialog.querySelector("#confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

// A labelled form control with a slot for the server's message about it.
export function field(label, control, hint) {
  const id = control.id || `f-${control.name}`;
  control.id = id;
  const err = h("p", { class: "field-error", id: `${id}-error`, hidden: true });
  const describedBy = [hint ? `${id}-hint` : null, `${id}-error`].filter(Boolean).join(" ");
  control.setAttribute("aria-describedby", describedBy);
  return h("div", { class: "field", "data-field": control.name },
    h("label", { for: id, text: label }),
    hint ? h("p", { class: "hint", id: `${id}-hint`, text: hint }) : null,
    control, err);
}

export function showFieldErrors(form, fields) {
  let first = null;
  for (const box of form.querySelectorAll(".field")) {
    const err = box.querySelector(".field-error");
    const control = box.querySelector("input, select, textarea");
    const msg = fields[box.dataset.field];
    err.hidden = !msg;
    err.textContent = msg ? capitalise(msg) : "";
    if (control) control.setAttribute("aria-invalid", msg ? "true" : "false");
    if (msg && !first) first = control;
  }
  return first;
}

export const capitalise = (s) => (s ? s.charAt(0).toUpperCase() + s.slice(1) : s);

export function alertBox(text, kind = "error") {
  return h("div", { class: `alert alert-${kind}`, role: kind === "error" ? "alert" : "status", text });
}

export function progressBar(label) {
  const bar = h("progress", { max: 1, value: 0, "aria-label": label });
  const text = h("span", { class: "progress-text", text: "0 %" });
  return {
    el: h("div", { class: "progress" }, bar, text),
    set(fraction) {
      bar.value = fraction;
      text.textContent = `${Math.round(fraction * 100)} %`;
    },
  };
}
