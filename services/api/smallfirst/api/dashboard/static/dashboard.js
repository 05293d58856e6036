// smallfirst dashboard: refresh the live part of a page without reloading it.
// An element with data-live="URL" and data-refresh-s="N" is replaced every N seconds by the
// server's rendering of that part (header X-Dashboard-Fragment: live). The refresh waits while
// keyboard focus or a selection is inside the part, so it never moves what a person is using;
// it stops once the server sends a part that is no longer live (a job that ended).
(function () {
  "use strict";

  function busy(region) {
    var active = document.activeElement;
    if (active && active !== document.body && region.contains(active)) return true;
    var selection = window.getSelection && window.getSelection();
    return !!(selection && !selection.isCollapsed && region.contains(selection.anchorNode));
  }

  function schedule(region) {
    var url = region.getAttribute("data-live");
    var seconds = parseFloat(region.getAttribute("data-refresh-s") || "0");
    if (!url || !(seconds > 0)) return;
    window.setTimeout(function () { refresh(region, url); }, seconds * 1000);
  }

  function refresh(region, url) {
    if (document.hidden || busy(region)) { schedule(region); return; }
    fetch(url, { headers: { "X-Dashboard-Fragment": "live" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); return null; }
        if (!response.ok) return null;
        return response.text();
      })
      .then(function (html) {
        if (html === null || html === undefined) { schedule(region); return; }
        region.innerHTML = html;
        region.setAttribute("data-refreshed", String(Date.now()));
        // A page part that the server no longer renders live (a job that ended) stops here.
        if (region.querySelector("[data-field='status'] .st-succeeded, [data-field='status'] .st-failed, " +
                                 "[data-field='status'] .st-cancelled")) {
          region.removeAttribute("data-live");
          return;
        }
        schedule(region);
      })
      .catch(function () { schedule(region); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var regions = document.querySelectorAll("[data-live]");
    for (var i = 0; i < regions.length; i++) schedule(regions[i]);
  });
})();
