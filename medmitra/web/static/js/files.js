// File chooser with drag and drop, checking each file against the limits and types the
// server publishes (/app/config.json) before anything is sent. The server judges the bytes
// again; this only spares the user an upload that would be refused.
import { formatBytes, h } from "./ui.js";

const CATEGORY_NAMES = { lab: "lab", radiology: "radiology" };

function extensionOf(name) {
  const i = name.lastIndexOf(".");
  return i > 0 ? name.slice(i).toLowerCase() : "";
}

// Why a file cannot go, or null.
export function refusal(file, category, config) {
  const accepted = config.accepted[category];
  const limit = config.limits[`${category}_max_bytes`];
  const ext = extensionOf(file.name);
  const typeOk = accepted.extensions.includes(ext) || (file.type && accepted.types.includes(file.type));
  if (!typeOk) {
    return `Not an accepted ${CATEGORY_NAMES[category]} file. Accepted: ${accepted.extensions.join(", ")}.`;
  }
  if (file.size === 0) return "The file is empty.";
  if (file.size > limit) return `Too large: ${formatBytes(file.size)}; the limit for a ${CATEGORY_NAMES[category]} file is ${formatBytes(limit)}.`;
  return null;
}

let counter = 0;

// A picker for one category. onChange() is called when the accepted set changes.
export function filePicker({ category, label, config, onChange = () => {} }) {
  const id = `files-${category}-${++counter}`;
  const accepted = config.accepted[category];
  const files = [];       // accepted File objects, in order
  const list = h("ul", { class: "file-list", "aria-label": `${label}: chosen files` });
  const input = h("input", {
    type: "file", id, multiple: true, class: "visually-hidden", tabIndex: -1,
    accept: [...accepted.extensions, ...accepted.types].join(","),
    "aria-label": label,
    "data-category": category,
  });
  const button = h("button", { type: "button", class: "secondary", text: "Choose files…", "aria-describedby": `${id}-hint` });
  const hint = h("p", { class: "hint", id: `${id}-hint`,
    text: `${accepted.extensions.join(", ")} · up to ${formatBytes(config.limits[`${category}_max_bytes`])} each. Drop files here or choose them.` });
  const zone = h("div", { class: "dropzone", role: "group", "aria-labelledby": `${id}-label`, "data-category": category },
    h("p", { class: "dropzone-title", id: `${id}-label`, text: label }), hint, button, input, list);

  function add(fileList) {
    for (const file of fileList) {
      const why = refusal(file, category, config);
      if (!why && files.length >= config.limits.files_per_request) {
        item(file, `At most ${config.limits.files_per_request} files can be sent at once.`);
      } else if (why) {
        item(file, why);
      } else {
        files.push(file);
        item(file, null);
      }
    }
    onChange();
  }

  function item(file, error) {
    const li = h("li", { class: error ? "file refused" : "file", "data-name": file.name },
      h("span", { class: "file-name", text: file.name }),
      h("span", { class: "file-size", text: formatBytes(file.size) }));
    if (error) {
      li.append(h("p", { class: "field-error", role: "alert", text: `${file.name}: ${error}` }),
        h("button", { type: "button", class: "link", text: "Dismiss", "aria-label": `Dismiss message about ${file.name}`, onclick: () => li.remove() }));
    } else {
      li.append(h("button", { type: "button", class: "link", text: "Remove", "aria-label": `Remove ${file.name}`,
        onclick: () => {
          files.splice(files.indexOf(file), 1);
          li.remove();
          onChange();
          button.focus();
        } }));
    }
    list.append(li);
  }

  button.addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    add([...input.files]);
    input.value = "";
  });
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    add([...e.dataTransfer.files]);
  });

  return {
    el: zone,
    category,
    files: () => [...files],
    // The server refused this file (its message names it): show the reason beside it.
    markRefused(name, message) {
      for (const li of list.querySelectorAll("li.file")) {
        if (li.dataset.name === name && !li.classList.contains("refused")) {
          li.classList.add("refused");
          const text = message.includes(`'${name}'`) ? message : `${name}: ${message}`;
          li.insertBefore(h("p", { class: "field-error", role: "alert", text }), li.querySelector("button"));
          return true;
        }
      }
      return false;
    },
    clear() {
      files.length = 0;
      list.replaceChildren();
      onChange();
    },
  };
}

// The file a server message is about: messages name it as File '<name>'.
export function fileNamedIn(message) {
  const m = /File '([^']*)'/.exec(message || "");
  return m ? m[1] : null;
}
