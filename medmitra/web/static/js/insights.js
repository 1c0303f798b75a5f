// The analysis laid out for reading (and printing). Model-written text is labelled as the
// model's; facts computed by the server (lab flags, ICD-10 titles) are shown as such.
import { formatDate, h, percent } from "./ui.js";

const FLAG_TEXT = { high: "High", low: "Low", abnormal: "Abnormal", critical: "Critical", normal: "Normal", unknown: "—" };

const text = (v, empty = "Not available") => (v === null || v === undefined || v === "" ? empty : String(v));

// Which pipeline stage wrote each section (insights.stages says how each stage went).
const SECTION_STAGES = {
  summary: "case_summary", soap: "soap_note", diagnosis: "diagnosis",
  differentials: "differential", investigations: "recommendations",
  treatments: "recommendations", labs: "lab_analysis", radiology: "radiology_analysis",
};

let currentStages = {};

function section(id, title, ...body) {
  const stage = currentStages[SECTION_STAGES[id]];
  const note = stage && stage.status === "abstained"
    ? h("p", { class: "abstained", text: `The model gave no usable answer here${stage.reason ? ` (${stage.reason})` : ""}; only what the server established from the case is shown.` })
    : null;
  return h("section", { class: "insight card", id, "aria-labelledby": `${id}-h` },
    h("h2", { id: `${id}-h`, text: title }), note, ...body);
}

function confidence(score, belowThreshold) {
  return h("p", { class: "confidence" },
    `Model's own confidence estimate: ${percent(score)}`,
    belowThreshold ? h("strong", { class: "below", text: " · below the requested confidence threshold" }) : null);
}

function list(items, empty = "None listed") {
  const rows = (items || []).filter((x) => x !== null && x !== undefined && x !== "");
  return rows.length ? h("ul", {}, rows.map((x) => h("li", { text: x }))) : h("p", { class: "muted", text: empty });
}

function table(caption, headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted", text: empty });
  return h("div", { class: "table-wrap" }, h("table", {},
    h("caption", { class: "visually-hidden", text: caption }),
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col", text: t })))),
    h("tbody", {}, rows)));
}

function parseSummary(file) {
  if (!file.ai_summary) return null;
  try {
    return typeof file.ai_summary === "string" ? JSON.parse(file.ai_summary) : file.ai_summary;
  } catch {
    return null;
  }
}

// Lab rows: the server's deterministic rows (insights.labs) when present, else the values
// each lab file's own analysis recorded.
export function labRows(insights, files) {
  const byId = Object.fromEntries(files.map((f) => [f.file_id, f]));
  if (insights && Array.isArray(insights.labs)) {
    return insights.labs.map((r) => ({
      analyte: r.analyte, value: r.value, unit: r.unit, range: r.range,
      flag: r.critical ? "critical" : r.flag, marker: r.lab_flag,
      source: byId[r.file_id] ? byId[r.file_id].file_name : "", page: r.page,
    }));
  }
  const rows = [];
  for (const f of files.filter((x) => x.file_category === "lab")) {
    const s = parseSummary(f);
    for (const [analyte, v] of Object.entries((s && s.lab_values) || {})) {
      rows.push({ analyte, value: v.value, unit: v.unit, range: v.reference_range,
        flag: v.status === "normal" ? "normal" : v.status, source: f.file_name });
    }
  }
  return rows;
}

function labTable(rows) {
  const body = rows.map((r) => {
    const abnormal = !["normal", "unknown", undefined, null, ""].includes(r.flag);
    return h("tr", { class: abnormal ? `abnormal flag-${r.flag}` : "" },
      h("th", { scope: "row", text: r.analyte }),
      h("td", { class: "num", text: text(r.value, "") }),
      h("td", { text: text(r.unit, "") }),
      h("td", { text: text(r.range, "") }),
      h("td", { class: "flag" }, abnormal ? h("strong", { text: `${FLAG_TEXT[r.flag] || r.flag}${r.marker ? ` (${r.marker})` : ""}` }) : (FLAG_TEXT[r.flag] || "—")),
      h("td", { class: "source", text: r.page ? `${r.source}, p. ${r.page}` : r.source }));
  });
  return table("Lab results", ["Test", "Value", "Unit", "Reference range", "Flag", "Source"], body,
    "No lab values were found in the lab files.");
}

function radiology(files) {
  const rads = files.filter((f) => f.file_category === "radiology");
  if (!rads.length) return h("p", { class: "muted", text: "No radiology files in this case." });
  return h("div", { class: "readings" }, rads.map((f) => {
    const s = parseSummary(f);
    return h("article", { class: "reading" },
      h("h3", { text: f.file_name }),
      s ? h("dl", {},
        h("dt", { text: "Findings" }), h("dd", { text: text(s.findings) }),
        s.impressions ? [h("dt", { text: "Impression" }), h("dd", { text: s.impressions })] : null,
        s.summary ? [h("dt", { text: "Details" }), h("dd", { text: s.summary })] : null,
        (s.key_abnormalities || []).length ? [h("dt", { text: "Abnormalities" }), h("dd", {}, list(s.key_abnormalities))] : null)
        : h("p", { class: "muted", text: "Not read yet: the analysis has not finished since this file was added." }));
  }));
}

export function modelNote(insights) {
  const name = insights.model_info?.name || insights.model || "an unnamed model";
  return h("p", { class: "model-note", id: "model-note" },
    "Written by the model ", h("strong", { text: name }), ` on ${formatDate(insights.generated_at)}. `,
    "Model text is a draft for a clinician to check against the source documents; it is not a diagnosis.");
}

export function demoBanner(insights) {
  if (!insights?.model_info?.demonstration) return null;
  // The server's own words when it sends them (model_info.notice), else the same message.
  return h("div", { class: "banner-demo", role: "note", id: "demo-banner" },
    h("strong", { text: "Demonstration model. " }),
    insights.model_info.notice ||
      `${insights.model_info.name || insights.model} is the small model bundled so the product can be tried; its text is not medically meaningful. Configure a clinical model (llm.model_path) before relying on any insight.`);
}

export function renderInsights(insights, files) {
  const cs = insights.case_summary || {};
  const soap = insights.soap_note || {};
  const dx = insights.primary_diagnosis || {};
  const diffs = insights.differential_diagnoses || [];
  const inv = insights.investigation_recommendations || [];
  const tx = insights.treatment_recommendations || [];
  const g = insights.grounding;
  currentStages = insights.stages || {};

  return h("div", { class: "insights" },
    modelNote(insights),
    g ? h("p", { class: "muted", text: `Grounding check: ${g.kept} of ${g.claims_checked} model statements kept; ${g.dropped} dropped as not supported by the case.` }) : null,

    section("summary", "Summary and key findings",
      h("p", { class: "lead", text: text(cs.comprehensive_summary) }),
      h("h3", { text: "Key findings" }), list(cs.key_findings),
      h("h3", { text: "Lab results in brief" }), h("p", { class: "pre", text: text(cs.lab_summary) }),
      h("h3", { text: "Radiology in brief" }), h("p", { class: "pre", text: text(cs.radiology_summary) }),
      confidence(cs.confidence_score, cs.below_threshold)),

    section("soap", "SOAP note",
      h("dl", { class: "soap" },
        [["Subjective", soap.subjective], ["Objective", soap.objective], ["Assessment", soap.assessment], ["Plan", soap.plan]]
          .map(([k, v]) => [h("dt", { text: k }), h("dd", { text: text(v) })])),
      confidence(soap.confidence_score, soap.below_threshold)),

    section("diagnosis", "Primary diagnosis",
      h("p", { class: "lead", text: text(dx.primary_diagnosis) }),
      dx.icd_code
        ? h("p", { class: "icd" }, "ICD-10-CM ", h("strong", { class: "code", text: dx.icd_code }), " — ", text(dx.description, ""))
        : h("p", { class: "muted", text: "No ICD-10 code: none matched the diagnosis text in the code table." }),
      h("h3", { text: "Supporting evidence" }), list(dx.supporting_evidence),
      confidence(dx.confidence_score, dx.below_threshold)),

    section("differentials", "Differential diagnoses",
      table("Differential diagnoses", ["Condition", "Probability", "Reasoning", "Distinguishing factors"],
        diffs.map((d) => h("tr", {},
          h("th", { scope: "row", text: d.condition }),
          h("td", { class: "num", text: percent(d.probability) }),
          h("td", { text: text(d.reasoning, "") }),
          h("td", {}, list(d.distinguishing_factors, "")))),
        "No differential diagnoses were produced.")),

    section("investigations", "Recommended investigations",
      table("Recommended investigations", ["Investigation", "Urgency", "Rationale", "Expected findings"],
        inv.map((r) => h("tr", {},
          h("th", { scope: "row", text: r.investigation_type }),
          h("td", {}, h("span", { class: `badge urgency-${r.urgency}`, text: r.urgency })),
          h("td", { text: text(r.rationale, "") }),
          h("td", { text: text(r.expected_findings, "") }))),
        "No investigations were recommended.")),

    section("treatments", "Treatment suggestions",
      table("Treatment suggestions", ["Treatment", "Description", "Dosage", "Duration", "Precautions"],
        tx.map((t) => h("tr", {},
          h("th", { scope: "row", text: t.treatment_type }),
          h("td", { text: text(t.description, "") }),
          h("td", { text: text(t.dosage, "") }),
          h("td", { text: text(t.duration, "") }),
          h("td", {}, list(t.precautions, "")))),
        "No treatments were suggested.")),

    section("labs", "Lab results", labTable(labRows(insights, files))),
    section("radiology", "Radiology readings", radiology(files)));
}
