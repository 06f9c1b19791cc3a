// Renders the Plotly figures the server built (a JSON list in <script id="figures">) into
// the elements named chart-<id>. The page never computes chart data itself.
(function () {
  "use strict";
  var node = document.getElementById("figures");
  if (!node || typeof Plotly === "undefined") { return; }
  var figures = JSON.parse(node.textContent);
  figures.forEach(function (item) {
    var target = document.getElementById("chart-" + item.id);
    if (!target) { return; }
    var layout = Object.assign({}, item.figure.layout || {}, { autosize: true });
    Plotly.newPlot(target, item.figure.data, layout, { responsive: true, displaylogo: false })
      .then(function () {
        target.setAttribute("data-rendered", "1");
        // ms since navigation start once the drawn frame is painted (read by bench/dashboard.py)
        window.requestAnimationFrame(function () {
          target.setAttribute("data-painted-ms", String(Math.round(performance.now())));
        });
      });
  });
})();
