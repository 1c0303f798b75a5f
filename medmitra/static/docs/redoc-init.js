// Starts ReDoc from a file rather than an inline script (see swagger-init.js).
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  var root = document.getElementById("redoc-container");
  Redoc.init(root.getAttribute("data-spec-url"), {
    hideLoading: true,
    // Typography without web fonts: the stock theme names Montserrat/Roboto, which the
    // stock page fetches from a font CDN. System fonts need no network.
    theme: {
      typography: {
        fontFamily: "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
        headings: { fontFamily: "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif" },
        code: { fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace" }
      }
    }
  }, root);
});
