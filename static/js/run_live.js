// Live run page: polls the progress endpoint and re-renders the figures in place (no reload)
// until the run finishes.
(function () {
  "use strict";
  var config = JSON.parse(document.getElementById("live-config").textContent);
  if (config.finished) { return; }
  var lastTrials = -1;
  // Ask only for the hypervolume points not seen yet: the figures endpoint draws the chart.
  var seenPoints = config.historyLength || 0;
  function render(figures) {
    figures.forEach(function (item) {
      var target = document.getElementById("chart-" + item.id);
      if (target) { Plotly.react(target, item.figure.data, item.figure.layout, { responsive: true, displaylogo: false }); }
    });
  }
  function poll() {
    fetch(config.progress + "?after=" + seenPoints, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (run) {
        if (run.progress && run.progress.hypervolume) {
          seenPoints = run.progress.hypervolume_offset + run.progress.hypervolume.length;
        }
        var percent = run.trials_planned ? Math.round(100 * run.trials_done / run.trials_planned) : 0;
        document.querySelector("#run-progress .bar").style.width = percent + "%";
        document.getElementById("run-progress").setAttribute("aria-valuenow", String(percent));
        document.getElementById("trial-count").textContent = run.trials_done;
        document.getElementById("real-count").textContent = run.real_evaluations;
        document.getElementById("run-status").textContent = run.status;
        var finished = ["done", "failed", "cancelled"].indexOf(run.status) >= 0;
        if (run.trials_done !== lastTrials || finished) {
          lastTrials = run.trials_done;
          fetch(config.figures, { credentials: "same-origin" })
            .then(function (r) { return r.json(); })
            .then(function (data) { render(data.figures); });
        }
        if (finished) {
          // The recommendation tables are server-rendered: show them once, at the end.
          window.setTimeout(function () { window.location.reload(); }, 1500);
          return;
        }
        window.setTimeout(poll, 2000);
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1000);
})();
