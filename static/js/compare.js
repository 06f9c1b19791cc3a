// Compare page: what-if controls re-compute every recommendation and the fleet coverage in the
// browser (EdgeFitWhatIf mirrors the server's policy code), with no reload; the state is kept
// in the URL (history.replaceState) so the view can be shared, and the CSV link follows it.
(function () {
  "use strict";
  var W = window.EdgeFitWhatIf;
  var node = document.getElementById("compare-data");
  if (!node || !W) { return; }
  var data = JSON.parse(node.textContent);
  var form = document.getElementById("whatif");
  var fp32 = data.model.fp32_accuracy;

  function esc(s) {
    return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;" }[c];
    });
  }
  function pct(x) { return (x * 100).toFixed(2) + " %"; }
  function msOf(c) { var v = c.latency_s * 1000; return (v < 1 ? v.toFixed(3) : v.toFixed(2)) + " ms"; }
  function mibOf(n) { return (n / 1048576).toFixed(1) + " MiB"; }
  function badge(text) { return text ? "<span class=\"src src-" + esc(String(text).split(" ")[0]) + "\">" + esc(text) + "</span>" : ""; }
  function variantLink(c) {
    return c.variant ? "<a href=\"/variants/" + c.variant + "/\">#" + c.variant + " " + esc(c.label) + "</a>" : esc(c.label);
  }
  function numberOrNull(input) {
    var raw = input.value.trim();
    if (raw === "") { return null; }
    var v = Number(raw);
    return isFinite(v) ? v : NaN;
  }

  function readState() {
    var picked = function (name) {
      return Array.prototype.map.call(form.querySelectorAll("input[name=" + name + "]:checked"), function (b) { return b.value; });
    };
    return {
      policy: form.elements.policy.value,
      loss: numberOrNull(form.elements.loss),
      slo: numberOrNull(form.elements.slo),
      budget: numberOrNull(form.elements.budget),
      devices: picked("pick_device").slice(0, 4),
      variants: picked("pick_variant").slice(0, 4).map(Number)
    };
  }

  function writeUrl(state) {
    var params = new URLSearchParams();
    params.set("model", data.model.slug);
    params.set("policy", state.policy);
    params.set("loss", state.loss === null ? "" : String(state.loss));
    params.set("slo", state.slo === null ? "" : String(state.slo));
    if (state.budget !== null) { params.set("budget", String(state.budget)); }
    if (state.devices.length) { params.set("devices", state.devices.join(",")); }
    if (state.variants.length) { params.set("variants", state.variants.join(",")); }
    var query = params.toString();
    window.history.replaceState(null, "", window.location.pathname + "?" + query);
    var csv = document.getElementById("compare-csv");
    if (csv) { csv.href = csv.getAttribute("data-base") + "?" + query; }
  }

  function recCells(rec) {
    if (rec.status === "ok") {
      var c = rec.chosen;
      return "<td>" + variantLink(c) + "</td><td class=\"num\">" + pct(c.accuracy) + " " + badge(c.accuracy_source) +
        "</td><td class=\"num\">" + msOf(c) + " " + badge(c.latency_source) + "</td><td class=\"num\">" + mibOf(c.memory_bytes) +
        "</td><td class=\"reason\">" + esc(rec.binding) + "</td>";
    }
    var label = rec.status === "unplanned" ? "not planned yet" : "no feasible variant";
    return "<td colspan=\"4\"><strong>" + label + "</strong></td><td class=\"reason\">" + esc(rec.reason) + "</td>";
  }

  function render() {
    var state = readState();
    var notices = [];
    var policy = W.policyFromState(state, notices);
    var recs = {};
    data.devices.forEach(function (d) { recs[d.id] = W.recommendation(d, policy, fp32); });
    var cov = W.coverage(data.devices, recs);
    document.getElementById("whatif-coverage").textContent = W.coverageSentence(cov, policy);
    document.getElementById("whatif-coverage-detail").textContent =
      cov.devices_covered + " of " + cov.devices + " device profiles, weighted by fleet share, each within its own memory budget unless one is set; policy: " + W.describe(policy) + ".";
    var box = document.getElementById("whatif-notices");
    box.innerHTML = notices.map(function (n) { return "<p class=\"notice\" role=\"status\">" + esc(n) + "</p>"; }).join("");

    // the fleet table
    data.devices.forEach(function (d) {
      var row = document.querySelector("#fleet-table tr[data-device=\"" + d.slug + "\"]");
      if (!row) { return; }
      var html = "<td><a href=\"/devices/" + esc(d.slug) + "/\">" + esc(d.name) + "</a></td><td class=\"num\">" +
        (d.share * 100).toFixed(0) + " %</td>" + recCells(recs[d.id]);
      if (row.getAttribute("data-html") !== html) {
        if (row.getAttribute("data-html") !== null) { row.classList.remove("changed"); void row.offsetWidth; row.classList.add("changed"); }
        row.innerHTML = html;
        row.setAttribute("data-html", html);
      }
      row.setAttribute("data-status", recs[d.id].status);
      row.setAttribute("data-chosen", recs[d.id].chosen ? recs[d.id].chosen.key : "");
    });

    // picked devices side by side
    var byslug = {};
    data.devices.forEach(function (d) { byslug[d.slug] = d; });
    var cards = state.devices.map(function (slug) {
      var d = byslug[slug];
      if (!d) { return ""; }
      var rec = recs[d.id];
      var body;
      if (rec.status === "ok") {
        body = "<p class=\"recommended\"><strong>" + variantLink(rec.chosen) + "</strong></p><p>" + pct(rec.chosen.accuracy) + " " +
          badge(rec.chosen.accuracy_source) + " · " + msOf(rec.chosen) + " " + badge(rec.chosen.latency_source) + " · " +
          mibOf(rec.chosen.memory_bytes) + "</p><p class=\"reason\">" + esc(rec.reason) + "</p>" +
          (rec.neighbours.length ? "<p class=\"hint\">Neighbours: " + rec.neighbours.map(function (n) {
            return esc(n.label) + " (" + pct(n.accuracy) + ", " + msOf(n) + ")";
          }).join("; ") + "</p>" : "");
      } else {
        body = "<p class=\"recommended\"><strong>" + (rec.status === "unplanned" ? "Not planned yet" : "No feasible variant") +
          "</strong></p><p class=\"reason\">" + esc(rec.reason) + "</p>";
      }
      return "<div class=\"card\" data-device=\"" + esc(slug) + "\"><h3>" + esc(d.name) + "</h3><p class=\"hint\">" +
        (d.share * 100).toFixed(0) + " % of the fleet · budget " + mibOf(policy.memory_budget_bytes || d.budget_bytes) + "</p>" + body + "</div>";
    });
    document.getElementById("device-cards").innerHTML = cards.join("");

    // picked variants side by side: on every picked device (or every planned one)
    var shown = state.devices.length ? state.devices.map(function (s) { return byslug[s]; }).filter(Boolean)
      : data.devices.filter(function (d) { return d.planned; });
    var vcards = state.variants.map(function (vid) {
      var any = null;
      var rows = shown.map(function (d) {
        var c = d.candidates.filter(function (x) { return x.variant === vid; })[0];
        if (!c) { return "<tr><td>" + esc(d.name) + "</td><td colspan=\"3\" class=\"hint\">not scored on this device</td></tr>"; }
        any = c;
        var ok = W.feasibleKeys([c], policy, fp32, d.budget_bytes).length === 1;
        var rec = recs[d.id];
        var isRec = rec.chosen && rec.chosen.key === c.key;
        return "<tr><td>" + esc(d.name) + "</td><td class=\"num\">" + msOf(c) + " " + badge(c.latency_source) + "</td><td class=\"num\">" +
          mibOf(c.memory_bytes) + "</td><td>" + (ok ? "✓ feasible" : "✗ breaks a constraint") + (isRec ? " · <strong>recommended</strong>" : "") + "</td></tr>";
      });
      var title = any ? variantLink(any) : "#" + vid;
      return "<div class=\"card\" data-variant=\"" + vid + "\"><h3>" + title + "</h3>" +
        (any ? "<p>" + pct(any.accuracy) + " " + badge(any.accuracy_source) + "</p>" : "") +
        "<table class=\"data\"><thead><tr><th>Device</th><th>Latency</th><th>Memory</th><th>Under the what-if</th></tr></thead><tbody>" +
        rows.join("") + "</tbody></table></div>";
    });
    document.getElementById("variant-cards").innerHTML = vcards.join("");
    writeUrl(state);
    document.body.setAttribute("data-whatif-ready", "1");
  }

  form.addEventListener("input", function (event) {
    if (event.target.name === "model") { return; }
    render();
  });
  form.addEventListener("change", function (event) {
    if (event.target.name === "model") {
      // Another model has other variants: load its data (devices and controls are kept).
      var params = new URLSearchParams(window.location.search);
      params.set("model", event.target.value);
      params.delete("variants");
      window.location.search = params.toString();
      return;
    }
    render();
  });
  form.addEventListener("submit", function (event) {
    if (document.activeElement && document.activeElement.name === "model") { return; }
    event.preventDefault();
    render();
  });
  // range sliders drive their number inputs
  Array.prototype.forEach.call(form.querySelectorAll("input[type=range][data-for]"), function (slider) {
    var target = form.elements[slider.getAttribute("data-for")];
    slider.addEventListener("input", function () { target.value = slider.value; render(); });
    target.addEventListener("input", function () { if (target.value !== "") { slider.value = target.value; } });
  });
  render();
})();
