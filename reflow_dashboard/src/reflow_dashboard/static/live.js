// Live pages for the Reflow dashboard, as a progressive enhancement: the
// pages are complete without it.
//
// A page whose element carries [data-live] (the URL of its event stream)
// listens to that stream; on each `refresh` event it fetches the page
// again as a fragment and swaps the #live region in place. While the
// user is typing into a form inside the region, the swap waits until the
// form is left alone, so nothing typed is lost.
(function () {
  "use strict";

  var root = document.querySelector("[data-live]");
  var indicator = document.getElementById("live-status");

  function fragmentUrl() {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    return url.toString();
  }

  function busy(region) {
    var active = document.activeElement;
    if (active && region.contains(active) && active.matches("input, textarea, select")) {
      return true;
    }
    var fields = region.querySelectorAll("input:not([type=hidden]), textarea");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].value !== fields[i].defaultValue) {
        return true;
      }
    }
    return false;
  }

  function setState(state, title) {
    if (!indicator) {
      return;
    }
    indicator.hidden = false;
    indicator.dataset.state = state;
    indicator.title = title;
  }

  function start() {
    if (!root || !window.EventSource || !window.fetch) {
      return;
    }
    var source = new EventSource(root.getAttribute("data-live"));
    var fetching = false;
    var again = false;
    var waiting = false;

    function swap() {
      var region = document.getElementById("live");
      if (!region) {
        return;
      }
      if (busy(region)) {
        if (!waiting) {
          waiting = true;
          setState("paused", "Updates wait while you edit a form");
          region.addEventListener("focusout", function retry() {
            window.setTimeout(function () {
              if (!busy(region)) {
                region.removeEventListener("focusout", retry);
                waiting = false;
                setState("on", "Updates as the runs change");
                refresh();
              }
            }, 0);
          });
        }
        return;
      }
      fetching = true;
      fetch(fragmentUrl(), {
        credentials: "same-origin",
        headers: { "X-Reflow-Fragment": "1" },
        cache: "no-store",
      })
        .then(function (response) {
          if (response.status === 401 || response.status === 404) {
            // Signed out, or the run is gone: the full page says which.
            source.close();
            window.location.reload();
            return null;
          }
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          if (html === null || html === undefined) {
            return;
          }
          var template = document.createElement("template");
          template.innerHTML = html;
          var fresh = template.content.getElementById("live");
          var current = document.getElementById("live");
          if (fresh && current && !busy(current)) {
            current.replaceWith(fresh);
          }
        })
        .catch(function () {
          /* the next refresh tries again */
        })
        .then(function () {
          fetching = false;
          if (again) {
            again = false;
            refresh();
          }
        });
    }

    function refresh() {
      if (fetching) {
        again = true;
        return;
      }
      swap();
    }

    source.addEventListener("open", function () {
      setState("on", "Updates as the runs change");
    });
    source.addEventListener("error", function () {
      setState("off", "Reconnecting…");
    });
    source.addEventListener("refresh", refresh);
  }

  // The runs filter applies a new choice at once.
  var filter = document.getElementById("run-filter");
  if (filter) {
    var selects = filter.querySelectorAll("select");
    for (var i = 0; i < selects.length; i++) {
      selects[i].addEventListener("change", function () {
        filter.requestSubmit ? filter.requestSubmit() : filter.submit();
      });
    }
  }

  start();
})();
