// payq ops: the little the pages need beyond htmx. When a refresh fails (server
// gone, database slow), say so above the figures instead of leaving them looking
// current; clear it at the next refresh that works.
(function () {
  "use strict";
  function banner() {
    return document.getElementById("stale");
  }
  document.addEventListener("htmx:afterRequest", function (event) {
    var stale = banner();
    if (!stale || !event.detail.requestConfig || event.detail.requestConfig.verb !== "get") {
      return;
    }
    if (event.detail.successful) {
      stale.hidden = true;
      return;
    }
    var shown = document.querySelector("[data-updated]");
    var when = shown ? shown.getAttribute("data-updated") : "";
    stale.textContent =
      "The figures below are not current: the last refresh failed" +
      (when ? " (last good one at " + when + " UTC)" : "") +
      ". Retrying.";
    stale.hidden = false;
  });
})();
