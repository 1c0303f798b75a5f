// Starts Swagger UI from a file rather than an inline script, so the page can be served
// with a Content-Security-Policy that forbids inline scripts.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-spec-url"),
    domNode: root,
    deepLinking: true,
    // BaseLayout: no top bar with a "load another spec" box.
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // The default validator badge calls validator.swagger.io; this server is offline.
    validatorUrl: null,
    persistAuthorization: true,
    displayRequestDuration: true,
    defaultModelsExpandDepth: 0
  });
});
