// keyshift dashboard: follows a run page's server-sent events and swaps in the progress
// fragment the server renders. No build step, no dependencies; everything else is plain HTML.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live || !window.EventSource) {
    return;
  }
  var note = document.getElementById("live-note");
  var loaded = live.getAttribute("data-state");
  var source = new EventSource(live.getAttribute("data-events"));
  var announced = null;
  function fragmentState() {
    var div = live.querySelector("[data-state]");
    return div ? div.getAttribute("data-state") : loaded;
  }
  source.addEventListener("progress", function (event) {
    live.innerHTML = event.data;
    live.setAttribute("aria-busy", "false");
    var now = fragmentState();
    if (now !== loaded && now !== announced) {
      announced = now;
      // Said once, politely; the actions on the page are as loaded, so offer a reload.
      note.textContent = "";
      var text = document.createTextNode(
        "The run is now " + now.replace(/_/g, " ") + ". The actions above are out of date: ");
      var link = document.createElement("a");
      link.href = window.location.pathname;
      link.textContent = "reload the page";
      note.appendChild(text);
      note.appendChild(link);
    }
  });
  source.addEventListener("end", function () {
    source.close();
  });
  source.onerror = function () {
    live.setAttribute("aria-busy", "true");
  };
})();
