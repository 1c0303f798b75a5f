// The case list: search, filters, sort, paging, and status badges that follow running
// analyses (the list is polled while a case on the page is being analysed).
import { api } from "./api.js";
import { alertBox, announce, formatDate, h, setStatusBadge, statusBadge } from "./ui.js";

const POLL_MS = 3000;
const PAGE_SIZES = [20, 50, 100];
const FILTERS = ["search", "status", "gender", "min_age", "max_age", "start_date", "end_date"];
const SORTS = [
  ["created_at:desc", "Newest first"],
  ["created_at:asc", "Oldest first"],
  ["updated_at:desc", "Recently updated"],
  ["patient_name:asc", "Name A–Z"],
  ["patient_name:desc", "Name Z–A"],
  ["patient_age:asc", "Age, youngest first"],
  ["patient_age:desc", "Age, oldest first"],
];

function readQuery() {
  const q = new URLSearchParams(location.search);
  const out = {};
  for (const k of FILTERS) out[k] = q.get(k) || "";
  out.sort = SORTS.some(([v]) => v === q.get("sort")) ? q.get("sort") : SORTS[0][0];
  out.page = Math.max(1, parseInt(q.get("page") || "1", 10) || 1);
  const limit = parseInt(q.get("limit") || "", 10);
  out.limit = PAGE_SIZES.includes(limit) ? limit : PAGE_SIZES[0];
  return out;
}

function writeQuery(state) {
  const q = new URLSearchParams();
  for (const k of FILTERS) if (state[k]) q.set(k, state[k]);
  if (state.sort !== SORTS[0][0]) q.set("sort", state.sort);
  if (state.page > 1) q.set("page", String(state.page));
  if (state.limit !== PAGE_SIZES[0]) q.set("limit", String(state.limit));
  const s = q.toString();
  history.replaceState(history.state, "", s ? `/app/?${s}` : "/app/");
}

function apiQuery(state) {
  const q = new URLSearchParams();
  for (const k of FILTERS) if (state[k]) q.set(k, state[k].trim());
  const [by, order] = state.sort.split(":");
  q.set("sort_by", by);
  q.set("sort_order", order);
  q.set("page", String(state.page));
  q.set("limit", String(state.limit));
  return q.toString();
}

function control(label, el) {
  el.id = `filter-${el.name}`;
  return h("div", { class: "field compact" }, h("label", { for: el.id, text: label }), el);
}

function select(name, options, value) {
  return h("select", { name }, options.map(([v, t]) => h("option", { value: v, text: t, selected: v === value })));
}

export async function render(main, _params, pageState = {}) {
  const state = readQuery();
  let timer = null;
  let stopped = false;
  let controller = null;

  const search = h("input", { name: "search", type: "search", value: state.search, placeholder: "Patient name or case summary", autocomplete: "off" });
  const form = h("form", { class: "filters", role: "search", "aria-label": "Find cases" },
    control("Search", search),
    control("Status", select("status", [["", "Any status"], ["processing", "Analysing"], ["completed", "Completed"], ["failed", "Failed"]], state.status)),
    control("Gender", select("gender", [["", "Any gender"], ["female", "Female"], ["male", "Male"], ["other", "Other"]], state.gender)),
    control("Age from", h("input", { name: "min_age", type: "number", min: 0, max: 150, inputMode: "numeric", value: state.min_age })),
    control("Age to", h("input", { name: "max_age", type: "number", min: 0, max: 150, inputMode: "numeric", value: state.max_age })),
    control("Created from", h("input", { name: "start_date", type: "date", value: state.start_date })),
    control("Created to", h("input", { name: "end_date", type: "date", value: state.end_date })),
    control("Sort", select("sort", SORTS, state.sort)),
    control("Per page", select("limit", PAGE_SIZES.map((n) => [String(n), String(n)]), String(state.limit))),
    h("div", { class: "filter-actions" },
      h("button", { type: "submit", text: "Apply" }),
      h("button", { type: "button", class: "secondary", text: "Clear", onclick: () => clearFilters() })));

  const results = h("section", { class: "results", "aria-label": "Results", "aria-busy": "true" });
  main.append(...[
    h("div", { class: "page-head" },
      h("h1", { text: "Cases" }),
      h("a", { class: "button", href: "/app/cases/new", "data-nav": true, text: "New case" })),
    pageState.message ? alertBox(pageState.message, "info") : null,
    form, results].filter(Boolean));

  if (pageState.message) history.replaceState(null, "", location.href); // shown once

  function fromForm() {
    const data = new FormData(form);
    for (const k of FILTERS) state[k] = String(data.get(k) || "");
    state.sort = String(data.get("sort"));
    state.limit = parseInt(String(data.get("limit")), 10);
  }

  function clearFilters() {
    for (const k of FILTERS) form.elements[k].value = "";
    apply();
  }

  function apply() {
    fromForm();
    state.page = 1;
    load();
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    apply();
  });
  // Selects and dates apply at once; typing in the search box applies after a pause.
  form.addEventListener("change", (e) => {
    if (e.target !== search) apply();
  });
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(apply, 350);
  });

  async function load({ quiet = false } = {}) {
    clearTimeout(timer);
    if (controller) controller.abort();
    controller = new AbortController();
    if (!quiet) writeQuery(state);
    let data;
    try {
      data = await api(`/cases/all_cases?${apiQuery(state)}`, { signal: controller.signal });
    } catch (err) {
      if (err.name === "AbortError" || stopped) return;
      if (quiet) return schedule(true);
      results.setAttribute("aria-busy", "false");
      results.replaceChildren(alertBox(err.message));
      return;
    }
    if (stopped) return;
    if (quiet) updateBadges(data.cases);
    else draw(data);
    schedule(data.cases.some((c) => c.status === "processing"));
  }

  function schedule(needed) {
    if (needed && !stopped && !document.hidden) timer = setTimeout(() => load({ quiet: true }), POLL_MS);
  }

  function updateBadges(cases) {
    for (const c of cases) {
      const badge = results.querySelector(`[data-case="${c.case_id}"] .badge`);
      if (badge && badge.dataset.status !== c.status) setStatusBadge(badge, c.status);
    }
  }

  function draw({ cases, total }) {
    results.setAttribute("aria-busy", "false");
    const filtered = FILTERS.some((k) => state[k]);
    announce(cases.length ? `List updated: ${total} result${total === 1 ? "" : "s"}.` : "List updated: no results.");
    if (!cases.length) {
      results.replaceChildren(filtered || state.page > 1 ? emptyFiltered() : emptyFirstUse());
      return;
    }
    const pages = Math.max(1, Math.ceil(total / state.limit));
    const table = h("table", { class: "cases" },
      h("caption", { class: "visually-hidden", text: `Cases, page ${state.page} of ${pages}` }),
      h("thead", {}, h("tr", {},
        ["Patient", "Age", "Gender", "Status", "Created", "Updated"].map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, cases.map((c) => h("tr", { "data-case": c.case_id },
        h("th", { scope: "row" }, h("a", { href: `/app/cases/${c.case_id}`, "data-nav": true, text: c.patient_name })),
        h("td", { text: c.patient_age }),
        h("td", { text: c.patient_gender }),
        h("td", {}, statusBadge(c.status)),
        h("td", { text: formatDate(c.created_at) }),
        h("td", { class: "col-updated", text: formatDate(c.updated_at) })))));
    const pager = h("nav", { class: "pager", "aria-label": "Pages" },
      h("button", { type: "button", class: "secondary", text: "Previous page", disabled: state.page <= 1, onclick: () => go(state.page - 1) }),
      h("span", { text: `Page ${state.page} of ${pages} · ${total} case${total === 1 ? "" : "s"}` }),
      h("button", { type: "button", class: "secondary", text: "Next page", disabled: state.page >= pages, onclick: () => go(state.page + 1) }));
    results.replaceChildren(h("div", { class: "table-wrap" }, table), pager);
    document.dispatchEvent(new CustomEvent("medmitra:list-rendered", { detail: { rows: cases.length } }));
  }

  function go(page) {
    state.page = page;
    load();
    main.querySelector("h1").scrollIntoView();
  }

  function emptyFirstUse() {
    return h("div", { class: "empty card" },
      h("h2", { text: "No cases yet" }),
      h("p", { text: "Create a case with the patient's details and their lab reports (PDF, CSV, photos) or radiology images (DICOM, JPEG, PNG). The analysis starts by itself and its progress shows here." }),
      h("a", { class: "button", href: "/app/cases/new", "data-nav": true, text: "Create the first case" }));
  }

  function emptyFiltered() {
    return h("div", { class: "empty card" },
      h("h2", { text: "No cases match" }),
      h("p", { text: "No case matches these filters. Change or clear them to see more." }),
      h("button", { type: "button", text: "Clear filters", onclick: () => clearFilters() }));
  }

  const onVisible = () => {
    if (!document.hidden && !stopped) load({ quiet: true });
  };
  document.addEventListener("visibilitychange", onVisible);
  await load();
  return () => {
    stopped = true;
    clearTimeout(timer);
    clearTimeout(typing);
    if (controller) controller.abort();
    document.removeEventListener("visibilitychange", onVisible);
  };
}
