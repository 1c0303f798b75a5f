// One case: patient details (editable), files with previews, live analysis progress,
// the insights, re-analysis, adding and deleting files, deleting the case.
import { ApiError, api, clientConfig, objectUrl, upload } from "./api.js";
import { fileNamedIn, filePicker } from "./files.js";
import { demoBanner, renderInsights } from "./insights.js";
import { navigate } from "./main.js";
import {
  alertBox, announce, confirmDialog, field, formatBytes, formatDate, h, progressBar,
  setStatusBadge, showFieldErrors, stageLabel, statusBadge,
} from "./ui.js";

const POLL_MS = 1500;
const GENDERS = [["female", "Female"], ["male", "Male"], ["other", "Other"]];

export async function render(main, [caseId], state) {
  const config = await clientConfig();
  let data;
  try {
    data = await api(`/cases/cases/${encodeURIComponent(caseId)}`);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    main.append(h("h1", { text: err.status === 404 ? "Case not found" : "The case could not be loaded" }),
      alertBox(err.status === 404 ? "This case does not exist or was deleted." : err.message),
      h("p", {}, h("a", { href: "/app/", "data-nav": true, text: "Back to the case list" })));
    return null;
  }

  let timer = null;
  let stopped = false;
  const objectUrls = [];
  const badge = statusBadge(data.case.status);
  const title = h("h1", { text: data.case.patient_name });
  const notice = h("div", { class: "notices" });
  const banner = h("div", { class: "banner-slot" });
  const progressBox = h("section", { class: "card analysis", id: "analysis", "aria-labelledby": "analysis-h" });
  const patientBox = h("section", { class: "card", id: "patient", "aria-labelledby": "patient-h" });
  const filesBox = h("section", { class: "card", id: "files", "aria-labelledby": "files-h" });
  const insightsBox = h("div", { id: "insights-area" });
  const reanalyse = h("button", { type: "button", text: "Re-analyse", onclick: () => startAnalysis() });

  main.append(
    h("p", { class: "breadcrumb no-print" }, h("a", { href: "/app/", "data-nav": true, text: "← All cases" })),
    h("p", { class: "print-only print-title", text: "MedMitra Edge — case report" }),
    h("div", { class: "page-head" }, h("div", { class: "title-line" }, title, badge),
      h("div", { class: "actions no-print" }, reanalyse,
        h("button", { type: "button", class: "secondary", text: "Print report", onclick: () => window.print() }),
        h("button", { type: "button", class: "danger", text: "Delete case", onclick: () => deleteCase() }))),
    notice, banner, progressBox, patientBox, filesBox, insightsBox);
  if (state.created) notice.append(alertBox("Case created. The analysis has started; its progress shows below.", "info"));
  history.replaceState(null, "", location.href); // a one-time notice: not again after a reload

  // ---- analysis progress ------------------------------------------------------------
  function drawProgress() {
    const a = data.analysis;
    const parts = [h("h2", { id: "analysis-h", text: "Analysis" })];
    if (!a) {
      parts.push(h("p", { text: "Not analysed yet. Press Re-analyse to start." }));
    } else if (a.state === "queued") {
      const bar = progressBar("Analysis progress");
      bar.set(0);
      parts.push(h("p", { class: "stage", text: a.queue_position ? `Waiting in the queue: position ${a.queue_position}.` : "Waiting in the queue." }), bar.el);
    } else if (a.state === "running") {
      const bar = progressBar("Analysis progress");
      bar.set(a.progress || 0);
      parts.push(h("p", { class: "stage", text: `${stageLabel(a.stage)}…${a.attempts > 1 ? ` (attempt ${a.attempts})` : ""}` }), bar.el);
    } else if (a.state === "failed") {
      parts.push(alertBox(`The analysis failed: ${a.error || "no reason was recorded"}. Press Re-analyse to try again.`));
    } else {
      parts.push(h("p", { class: "muted", text: `Finished ${formatDate(a.finished_at)}.` }));
    }
    progressBox.replaceChildren(...parts);
    progressBox.dataset.state = a ? a.state : "none";
    reanalyse.disabled = data.case.status === "processing";
  }

  // ---- patient details --------------------------------------------------------------
  function drawPatient() {
    const c = data.case;
    patientBox.replaceChildren(
      h("div", { class: "section-head" }, h("h2", { id: "patient-h", text: "Patient" }),
        h("button", { type: "button", class: "secondary no-print", text: "Edit patient details", onclick: editPatient })),
      h("dl", { class: "facts" },
        h("dt", { text: "Name" }), h("dd", { text: c.patient_name }),
        h("dt", { text: "Age" }), h("dd", { text: `${c.patient_age} years` }),
        h("dt", { text: "Gender" }), h("dd", { text: c.patient_gender }),
        h("dt", { text: "Case summary" }), h("dd", { class: "pre", text: c.case_summary || "—" }),
        h("dt", { text: "Created" }), h("dd", { text: formatDate(c.created_at) }),
        h("dt", { text: "Updated" }), h("dd", { text: formatDate(c.updated_at) })));
  }

  function editPatient() {
    const c = data.case;
    const lim = config.limits;
    const name = h("input", { name: "patient_name", value: c.patient_name, maxLength: lim.name_max_chars });
    const age = h("input", { name: "patient_age", type: "number", min: 0, max: lim.max_age, inputMode: "numeric", value: String(c.patient_age) });
    const known = GENDERS.some(([v]) => v === c.patient_gender);
    const gender = h("select", { name: "patient_gender" },
      (known ? GENDERS : [[c.patient_gender, c.patient_gender], ...GENDERS]).map(([v, t]) => h("option", { value: v, text: t, selected: v === c.patient_gender })));
    const summary = h("textarea", { name: "case_summary", rows: 4, maxLength: lim.text_field_max_chars, value: c.case_summary || "" });
    const status = h("div", { class: "form-status" });
    const form = h("form", { class: "edit-patient", novalidate: true },
      h("h2", { id: "patient-h", text: "Edit patient details" }), status,
      h("div", { class: "grid-3" }, field("Patient name", name), field("Age (years)", age), field("Gender", gender)),
      field("Case summary", summary),
      h("div", { class: "actions" }, h("button", { type: "submit", text: "Save" }),
        h("button", { type: "button", class: "secondary", text: "Cancel", onclick: () => { drawPatient(); patientBox.querySelector("button").focus(); } })),
      h("p", { class: "hint", text: "Saving does not re-run the analysis; press Re-analyse afterwards if the change matters to it." }));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      status.replaceChildren();
      showFieldErrors(form, {});
      try {
        const res = await api(`/cases/cases/${c.case_id}`, { method: "PUT", json: {
          patient_name: name.value, patient_age: age.value.trim(), patient_gender: gender.value,
          case_summary: summary.value } });
        data.case = res.case;
        title.textContent = res.case.patient_name;
        drawPatient();
        announce("Patient details saved.");
        patientBox.querySelector("button").focus();
      } catch (err) {
        if (!(err instanceof ApiError)) throw err;
        const first = showFieldErrors(form, err.fields);
        if (first) first.focus();
        else status.append(alertBox(err.message));
      }
    });
    patientBox.replaceChildren(form);
    name.focus();
  }

  // ---- files ------------------------------------------------------------------------
  // A server-rendered picture (DICOM image, PDF page) fetched with the token.
  function rendered(box, f, page = 1) {
    const isPdf = f.file_type === "application/pdf";
    const img = h("img", { alt: isPdf ? `Page ${page} of PDF ${f.file_name}` : `DICOM image ${f.file_name}, rendered with the file's window and level` });
    box.replaceChildren(h("p", { class: "muted", text: "Rendering…" }));
    objectUrl(`/cases/file/${f.file_id}/preview.png?page=${page}`).then(({ url, headers }) => {
      objectUrls.push(url);
      img.src = url;
      const parts = [img];
      const pages = parseInt(headers.get("X-Page-Count") || "1", 10);
      if (isPdf && pages > 1) {
        parts.push(h("div", { class: "pdf-pages" },
          h("button", { type: "button", class: "secondary", text: "Previous page", disabled: page <= 1,
            "aria-label": `Previous page of ${f.file_name}`, onclick: () => rendered(box, f, page - 1) }),
          h("span", { text: `Page ${page} of ${pages}` }),
          h("button", { type: "button", class: "secondary", text: "Next page", disabled: page >= pages,
            "aria-label": `Next page of ${f.file_name}`, onclick: () => rendered(box, f, page + 1) })));
      }
      box.replaceChildren(...parts);
    }, (err) => {
      if (!(err instanceof ApiError)) throw err;
      box.replaceChildren(h("p", { class: "muted", text: `${err.message}. Download the file to view it.` }));
    });
  }

  function preview(f) {
    const box = h("div", { class: "preview" });
    const type = f.file_type;
    if (type === "image/png" || type === "image/jpeg") {
      box.append(h("img", { src: f.file_url, alt: `Image ${f.file_name}`, loading: "lazy" }));
    } else if (type === "application/dicom" || type === "application/pdf") {
      rendered(box, f);
    } else {
      box.append(h("pre", { class: "text-preview", tabIndex: 0, "aria-label": `Text of ${f.file_name}`,
        text: f.text_data ? f.text_data.slice(0, 4000) : "The text shows here once the analysis has read the file." }));
    }
    return box;
  }

  function drawFiles() {
    const items = data.files.map((f) => h("li", { class: "file-card", "data-file": f.file_id },
      h("div", { class: "file-head" },
        h("h3", { text: f.file_name }),
        h("p", { class: "muted", text: `${f.file_category === "lab" ? "Lab" : "Radiology"} · ${f.file_type} · ${formatBytes(f.file_size)} · ${formatDate(f.uploaded_at)}` }),
        h("div", { class: "actions no-print" },
          f.file_type === "application/pdf" ? h("a", { class: "button secondary", href: f.file_url, target: "_blank", rel: "noopener", text: "Open", "aria-label": `Open ${f.file_name} in a new tab` }) : null,
          h("a", { class: "button secondary", href: f.file_url, download: f.file_name, text: "Download", "aria-label": `Download ${f.file_name}` }),
          h("button", { type: "button", class: "danger secondary", text: "Delete", "aria-label": `Delete ${f.file_name}`, onclick: () => deleteFile(f) }))),
      preview(f)));
    filesBox.replaceChildren(
      h("h2", { id: "files-h", text: `Files (${data.files.length})` }),
      items.length ? h("ul", { class: "file-cards" }, items) : h("p", { class: "muted", text: "No files yet. Add lab reports or radiology images below." }),
      addFilesForm());
  }

  function addFilesForm() {
    const status = h("div", { class: "form-status" });
    const progress = progressBar("Upload progress");
    progress.el.hidden = true;
    const button = h("button", { type: "submit", text: "Upload and re-analyse", disabled: true });
    const onChange = () => {
      button.disabled = !pickers.some((p) => p.files().length);
    };
    const pickers = [
      filePicker({ category: "lab", label: "Add lab reports", config, onChange }),
      filePicker({ category: "radiology", label: "Add radiology images", config, onChange }),
    ];
    const form = h("form", { class: "add-files no-print", novalidate: true },
      h("h3", { text: "Add files" }), status, h("div", { class: "grid-2" }, pickers.map((p) => p.el)), progress.el,
      h("div", { class: "actions" }, button));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      status.replaceChildren();
      button.disabled = true;
      progress.el.hidden = false;
      // One request per category (the upload route takes one category per request);
      // each request is all-or-nothing on the server.
      const batches = pickers.filter((p) => p.files().length);
      let done = 0;
      for (const [i, p] of batches.entries()) {
        const body = new FormData();
        body.set("case_id", data.case.case_id);
        body.set("category", p.category);
        for (const f of p.files()) body.append("files", f, f.name);
        try {
          await upload("/cases/upload", body, (x) => progress.set((i + x) / batches.length)).promise;
          done += p.files().length;
          p.clear();
        } catch (err) {
          if (!(err instanceof ApiError)) throw err;
          const name = fileNamedIn(err.message);
          if (!(name && p.markRefused(name, err.message))) status.append(alertBox(`${err.message}. These ${p.category} files were not added.`));
          else status.append(alertBox(`The ${p.category} files were not added: ${err.message}.`));
        }
      }
      progress.el.hidden = true;
      if (done) {
        announce(`${done} file${done === 1 ? "" : "s"} added; the analysis runs again.`);
        await refreshCase();
        filesBox.querySelector("h2").focus?.();
      } else {
        onChange();
      }
    });
    return form;
  }

  async function deleteFile(f) {
    if (!(await confirmDialog(`Delete the file “${f.file_name}” from this case? Its bytes are removed from the server; this cannot be undone.`, "Delete file"))) return;
    try {
      await api(`/cases/file/${f.file_id}?case_id=${data.case.case_id}`, { method: "DELETE" });
      announce(`${f.file_name} deleted.`);
      await refreshCase();
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      notice.replaceChildren(alertBox(err.message));
    }
  }

  async function deleteCase() {
    if (!(await confirmDialog(`Delete the case of ${data.case.patient_name} with its ${data.files.length} file(s) and its analysis? This cannot be undone.`, "Delete case"))) return;
    try {
      await api(`/cases/cases/${data.case.case_id}`, { method: "DELETE" });
      navigate("/app/", { replace: true, state: { message: `The case of ${data.case.patient_name} was deleted.` } });
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      notice.replaceChildren(alertBox(err.message));
    }
  }

  async function startAnalysis() {
    reanalyse.disabled = true;
    try {
      await api(`/cases/analyze/${data.case.case_id}`, { method: "POST", json: {} });
      announce("Analysis started.");
      await refreshCase();
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      notice.replaceChildren(alertBox(err.message));
      reanalyse.disabled = false;
    }
  }

  // ---- insights ---------------------------------------------------------------------
  function drawInsights() {
    banner.replaceChildren(...[demoBanner(data.insights)].filter(Boolean));
    if (!data.insights) {
      insightsBox.replaceChildren(h("section", { class: "card", id: "insights", "aria-labelledby": "insights-h" },
        h("h2", { id: "insights-h", text: "Insights" }),
        h("p", { class: "muted", text: data.case.status === "processing"
          ? "The insights appear here when the analysis finishes."
          : "No insights yet. Press Re-analyse to run the analysis." })));
      return;
    }
    insightsBox.replaceChildren(h("h2", { class: "area-title", text: "Insights" }), renderInsights(data.insights, data.files));
  }

  // ---- refresh and polling ----------------------------------------------------------
  async function refreshCase() {
    const before = data;
    data = await api(`/cases/cases/${data.case.case_id}`);
    setStatusBadge(badge, data.case.status);
    drawProgress();
    const filesChanged = JSON.stringify(before.files.map((f) => [f.file_id, f.ai_summary])) !==
      JSON.stringify(data.files.map((f) => [f.file_id, f.ai_summary]));
    if (filesChanged) drawFiles();
    if (before.insights?.generated_at !== data.insights?.generated_at || before.case.status !== data.case.status) drawInsights();
    if (before.case.status === "processing" && data.case.status !== "processing") {
      announce(data.case.status === "completed" ? "Analysis completed." : "Analysis failed.");
    }
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    if (!stopped && data.case.status === "processing") {
      timer = setTimeout(() => refreshCase().catch((err) => {
        if (err instanceof ApiError && !stopped) schedule(); // a hiccup: try again
        else if (!(err instanceof ApiError)) throw err;
      }), POLL_MS);
    }
  }

  drawProgress();
  drawPatient();
  drawFiles();
  drawInsights();
  schedule();
  return () => {
    stopped = true;
    clearTimeout(timer);
    for (const u of objectUrls) URL.revokeObjectURL(u);
  };
}
