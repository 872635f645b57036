// rtpd console: refreshes the parts of a page marked data-live from their
// fragment URL (no page reloads). Everything else is plain HTML forms.
//
//   data-live="/console/…"   fetched every data-every ms (default 3000)
//   data-src + data-refresh-on="<id>"   fetched again when the element
//                                       with that id changed
"use strict";

(function () {
  function fetchInto(el, url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.status === 401) {
          return r.text().then(function (html) {
            el.innerHTML = html;
            return "stop";
          });
        }
        if (!r.ok) return "keep";
        return r.text().then(function (html) {
          if (html === el.dataset.last) return "same";
          // Fragments are rendered by the server with every value escaped.
          el.innerHTML = html;
          el.dataset.last = html;
          el.dispatchEvent(new CustomEvent("console:changed", { bubbles: true }));
          return "changed";
        });
      })
      .catch(function () {
        return "keep";
      });
  }

  function poll(el) {
    var every = parseInt(el.dataset.every, 10) || 3000;
    function tick() {
      fetchInto(el, el.dataset.live).then(function (result) {
        if (result !== "stop") setTimeout(tick, every);
      });
    }
    // The page came with the first rendering unless it is a placeholder.
    setTimeout(tick, el.textContent.trim() === "…" ? 0 : every);
  }

  function follow(el) {
    var source = document.getElementById(el.dataset.refreshOn);
    if (!source) return;
    source.addEventListener("console:changed", function () {
      fetchInto(el, el.dataset.src);
    });
  }

  function start() {
    var live = document.querySelectorAll("[data-live]");
    for (var i = 0; i < live.length; i++) {
      // The first fetch tells what the server sends now.
      poll(live[i]);
    }
    var followers = document.querySelectorAll("[data-refresh-on]");
    for (var j = 0; j < followers.length; j++) follow(followers[j]);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
