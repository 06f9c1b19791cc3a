// What-if engine of the compare page: a line-by-line mirror of planner/recommend.py
// (`pareto_front`, `recommend`, `_explain_infeasible`, `Policy.floor/describe`) and of
// registry/dashboard.py (`policy_from_params`, `recommendation`, `coverage`,
// `coverage_sentence`).  tests/browser/test_whatif_parity.py runs both on one fixture and
// compares the results field by field: change one side, change the other.
(function (root) {
  "use strict";

  var POLICY_KINDS = {
    max_accuracy: "max accuracy with latency ≤ SLO and memory ≤ budget",
    min_latency: "min latency with accuracy loss ≤ X points (and memory ≤ budget)",
    min_memory: "min memory with accuracy loss ≤ X points and latency ≤ SLO"
  };
  var MIB = 1048576;
  var DEFAULT_LOSS = 1.0;
  var DEFAULT_SLO = 50.0;

  // Python's format(x, "g"): 6 significant digits, trailing zeros stripped, exponent form
  // below 1e-4 and from 1e6 on ("3.6e+06").
  function g(x) {
    if (x === 0) { return "0"; }
    var exp = Math.floor(Math.log10(Math.abs(x)));
    var rounded = Number(x.toPrecision(6));
    exp = Math.floor(Math.log10(Math.abs(rounded)));
    if (exp < -4 || exp >= 6) {
      var parts = rounded.toExponential(5).split("e");
      var mant = parts[0].indexOf(".") >= 0 ? parts[0].replace(/0+$/, "").replace(/\.$/, "") : parts[0];
      var e = parseInt(parts[1], 10);
      var sign = e < 0 ? "-" : "+";
      var digits = String(Math.abs(e));
      return mant + "e" + sign + (digits.length < 2 ? "0" + digits : digits);
    }
    var s = rounded.toFixed(Math.max(0, 5 - exp));
    if (s.indexOf(".") >= 0) { s = s.replace(/0+$/, "").replace(/\.$/, ""); }
    return s;
  }
  function fixed(x, d) { return x.toFixed(d); }
  function signed(x, d) { return (x >= 0 ? "+" : "") + x.toFixed(d); }
  function ms(seconds) { return fixed(seconds * 1000, 2) + " ms"; }
  function mib(n) { return fixed(n / MIB, 1) + " MiB"; }

  function floorOf(policy, fp32) {
    var floors = [];
    if (policy.accuracy_floor !== null && policy.accuracy_floor !== undefined) { floors.push(policy.accuracy_floor); }
    if (policy.max_loss_points !== null && policy.max_loss_points !== undefined) { floors.push(fp32 - policy.max_loss_points / 100); }
    return floors.length ? Math.max.apply(null, floors) : null;
  }

  function describe(policy) {
    var parts = [POLICY_KINDS[policy.kind] || policy.kind];
    if (policy.latency_slo_ms !== null && policy.latency_slo_ms !== undefined) { parts.push("SLO " + g(policy.latency_slo_ms) + " ms"); }
    if (policy.max_loss_points !== null && policy.max_loss_points !== undefined) { parts.push("loss ≤ " + g(policy.max_loss_points) + " points"); }
    if (policy.accuracy_floor !== null && policy.accuracy_floor !== undefined) { parts.push("accuracy ≥ " + fixed(policy.accuracy_floor, 3)); }
    return parts.join("; ");
  }

  function dominates(a, b) {
    var noWorse = a.accuracy >= b.accuracy && a.latency_s <= b.latency_s && a.memory_bytes <= b.memory_bytes;
    var better = a.accuracy > b.accuracy || a.latency_s < b.latency_s || a.memory_bytes < b.memory_bytes;
    return noWorse && better;
  }

  function paretoFront(candidates) {
    var front = candidates.filter(function (c) {
      return !candidates.some(function (o) { return o !== c && dominates(o, c); });
    });
    var seen = {};
    var unique = [];
    front.forEach(function (c) {
      var k = c.accuracy + "|" + c.latency_s + "|" + c.memory_bytes;
      if (!Object.prototype.hasOwnProperty.call(seen, k)) { seen[k] = true; unique.push(c); }
    });
    // Array.prototype.sort is stable (ES2019), as Python's sorted is.
    return unique.slice().sort(function (a, b) {
      if (a.latency_s !== b.latency_s) { return a.latency_s < b.latency_s ? -1 : 1; }
      if (a.accuracy !== b.accuracy) { return a.accuracy > b.accuracy ? -1 : 1; }
      return 0;
    });
  }

  function violations(c, sloS, budget, floor) {
    var out = [];  // ordered [name, shortfall] pairs, as the Python dict's insertion order
    if (c.memory_bytes > budget) { out.push(["memory", c.memory_bytes / budget - 1]); }
    if (sloS !== null && c.latency_s > sloS) { out.push(["latency", c.latency_s / sloS - 1]); }
    if (floor !== null && c.accuracy < floor) { out.push(["accuracy", (floor - c.accuracy) / Math.max(floor, 1e-9)]); }
    return out;
  }

  function lexLess(a, b) {  // tuples of numbers
    for (var i = 0; i < a.length; i++) {
      if (a[i] < b[i]) { return true; }
      if (a[i] > b[i]) { return false; }
    }
    return false;
  }
  function argBest(items, key, wantMax) {  // first best, as Python's max/min
    var best = null;
    var bestKey = null;
    items.forEach(function (item) {
      var k = key(item);
      if (best === null || (wantMax ? lexLess(bestKey, k) : lexLess(k, bestKey))) { best = item; bestKey = k; }
    });
    return best;
  }

  function explainInfeasible(candidates, front, described, sloS, budget, floor) {
    var failing = [];
    var bestMemory = argBest(candidates, function (c) { return [c.memory_bytes]; }, false);
    if (bestMemory.memory_bytes > budget) {
      failing.push(["memory", "smallest variant needs " + mib(bestMemory.memory_bytes) + ", budget is " + mib(budget) +
        " (" + mib(bestMemory.memory_bytes - budget) + " over)"]);
    }
    if (sloS !== null) {
      var fastest = argBest(candidates, function (c) { return [c.latency_s]; }, false);
      if (fastest.latency_s > sloS) {
        failing.push(["latency", "fastest variant takes " + ms(fastest.latency_s) + " (" + fastest.latency_source + "), SLO is " + ms(sloS) +
          " (" + ms(fastest.latency_s - sloS) + " over)"]);
      }
    }
    if (floor !== null) {
      var best = argBest(candidates, function (c) { return [c.accuracy]; }, true);
      if (best.accuracy < floor) {
        failing.push(["accuracy", "most accurate variant reaches " + fixed(best.accuracy, 4) + ", floor is " + fixed(floor, 4) +
          " (" + fixed((floor - best.accuracy) * 100, 2) + " points short)"]);
      }
    }
    if (!failing.length) {
      failing.push(["combination", "each constraint is met by some variant, but no single variant meets all of them at once"]);
    }
    var infeasible = {};
    failing.forEach(function (f) { infeasible[f[0]] = f[1]; });
    return {
      policy: described,
      chosen: null,
      binding: failing[0][0],
      reason: "no variant is feasible: " + failing.map(function (f) { return f[0] + ": " + f[1]; }).join("; "),
      neighbours: [],
      infeasible: infeasible,
      front: front
    };
  }

  // planner.recommend.recommend
  function recommend(candidates, policy, fp32, deviceBudget, neighbours) {
    if (neighbours === undefined) { neighbours = 2; }
    var budget = policy.memory_budget_bytes || deviceBudget;
    var sloS = (policy.latency_slo_ms !== null && policy.latency_slo_ms !== undefined) ? policy.latency_slo_ms / 1000 : null;
    var floor = floorOf(policy, fp32);
    var front = paretoFront(candidates);
    var feasible = front.filter(function (c) { return violations(c, sloS, budget, floor).length === 0; });
    var described = describe(policy);
    if (!candidates.length) {
      return { policy: described, chosen: null, binding: "no candidates", reason: "the search produced no variant",
               neighbours: [], infeasible: {}, front: [] };
    }
    if (!feasible.length) { return explainInfeasible(candidates, front, described, sloS, budget, floor); }
    var chosen, better, objective;
    if (policy.kind === "max_accuracy") {
      chosen = argBest(feasible, function (c) { return [c.accuracy, -c.latency_s, -c.memory_bytes]; }, true);
      better = front.filter(function (c) { return c.accuracy > chosen.accuracy; });
      objective = "highest accuracy";
    } else if (policy.kind === "min_latency") {
      chosen = argBest(feasible, function (c) { return [c.latency_s, -c.accuracy, c.memory_bytes]; }, false);
      better = front.filter(function (c) { return c.latency_s < chosen.latency_s; });
      objective = "lowest latency";
    } else {
      chosen = argBest(feasible, function (c) { return [c.memory_bytes, c.latency_s, -c.accuracy]; }, false);
      better = front.filter(function (c) { return c.memory_bytes < chosen.memory_bytes; });
      objective = "lowest memory";
    }
    var binding = objective;
    if (better.length) {
      // planner.recommend._objective_gap: the runner-up on the objective's own scale
      var nearest = argBest(better, function (c) {
        if (policy.kind === "max_accuracy") { return [c.accuracy - chosen.accuracy]; }
        if (policy.kind === "min_latency") { return [chosen.latency_s - c.latency_s]; }
        return [chosen.memory_bytes - c.memory_bytes];
      }, false);
      var misses = violations(nearest, sloS, budget, floor);
      if (misses.length) {
        var worst = misses[0];
        misses.forEach(function (m) { if (m[1] > worst[1]) { worst = m; } });
        if (worst[0] === "latency") { binding = "latency SLO " + g(policy.latency_slo_ms) + " ms"; }
        else if (worst[0] === "memory") { binding = "memory budget " + mib(budget); }
        else { binding = "accuracy floor " + fixed(floor, 4); }
      }
    }
    var lossPoints = (fp32 - chosen.accuracy) * 100;
    var reason = objective + " among " + feasible.length + " feasible of " + front.length + " front variants: accuracy " +
      fixed(chosen.accuracy, 4) + " (" + chosen.accuracy_source + "; " + signed(lossPoints, 2) + " points vs FP32 loss), latency " +
      ms(chosen.latency_s) + " (" + chosen.latency_source + "), memory " + mib(chosen.memory_bytes) + " (predicted) ≤ budget " +
      mib(budget) + "; binding: " + binding;
    var ordered = front.slice().sort(function (a, b) { return a.latency_s - b.latency_s; });
    var at = ordered.indexOf(chosen);
    var near = ordered.slice(Math.max(0, at - neighbours), at).concat(ordered.slice(at + 1, at + 1 + neighbours));
    return { policy: described, chosen: chosen, binding: binding, reason: reason, neighbours: near, infeasible: {}, front: front };
  }

  function feasibleKeys(candidates, policy, fp32, deviceBudget) {
    var budget = policy.memory_budget_bytes || deviceBudget;
    var sloS = (policy.latency_slo_ms !== null && policy.latency_slo_ms !== undefined) ? policy.latency_slo_ms / 1000 : null;
    var floor = floorOf(policy, fp32);
    return candidates.filter(function (c) {
      return c.memory_bytes <= budget && (sloS === null || c.latency_s <= sloS) && (floor === null || c.accuracy >= floor);
    }).map(function (c) { return c.key; }).sort();
  }

  // registry.dashboard.recommendation
  function recommendation(device, policy, fp32) {
    if (!device.planned) {
      return { status: "unplanned", chosen: null, reason: "no finished planning run covers this device" };
    }
    if (!device.candidates.length) {
      var stored = device.stored || {};
      return { status: "infeasible", chosen: null, binding: stored.binding || "",
               reason: stored.reason || "the search found no variant", infeasible: stored.infeasible || {},
               neighbours: [], front_keys: [], feasible_keys: [], policy: describe(policy) };
    }
    var rec = recommend(device.candidates, policy, fp32, device.budget_bytes);
    return {
      status: rec.chosen ? "ok" : "infeasible",
      chosen: rec.chosen,
      binding: rec.binding,
      reason: rec.reason,
      infeasible: rec.infeasible,
      neighbours: rec.neighbours,
      front_keys: rec.front.map(function (c) { return c.key; }),
      feasible_keys: feasibleKeys(device.candidates, policy, fp32, device.budget_bytes),
      policy: rec.policy
    };
  }

  // registry.dashboard.coverage
  function coverage(devices, recs) {
    var total = 0, covered = 0, unplanned = 0, count = 0;
    devices.forEach(function (d) {
      var rec = recs[d.id] || {};
      total += d.share;
      if (rec.chosen) { covered += d.share; count += 1; }
      if (rec.status === "unplanned") { unplanned += d.share; }
    });
    return { covered_share: covered, total_share: total, unplanned_share: unplanned,
             fraction: total > 0 ? covered / total : 0, devices_covered: count, devices: devices.length };
  }

  function coverageSentence(cov, policy) {
    var parts = [];
    if (policy.max_loss_points !== null && policy.max_loss_points !== undefined) {
      parts.push("within " + g(policy.max_loss_points) + " point" + (policy.max_loss_points !== 1 ? "s" : "") + " of full accuracy");
    }
    if (policy.latency_slo_ms !== null && policy.latency_slo_ms !== undefined) { parts.push("under " + g(policy.latency_slo_ms) + " ms"); }
    if (policy.memory_budget_bytes) { parts.push("in " + g(policy.memory_budget_bytes / MIB) + " MiB"); }
    return fixed(cov.fraction * 100, 0) + " % of the fleet gets a package " + parts.join(" ");
  }

  function inRange(v, low, high) { return typeof v === "number" && isFinite(v) && v >= low && v <= high; }

  // registry.dashboard.policy_from_params, over already-parsed control values (null = blank).
  function policyFromState(state, notices) {
    var kind = POLICY_KINDS[state.policy] ? state.policy : "max_accuracy";
    if (state.policy && !POLICY_KINDS[state.policy]) { notices.push("Policy: unknown value '" + state.policy + "'; using 'max_accuracy'."); }
    var loss = state.loss, slo = state.slo, budget = state.budget;
    if (loss !== null && !inRange(loss, 0, 100)) { notices.push("Accuracy floor: not a number from 0 to 100; using " + g(DEFAULT_LOSS) + "."); loss = DEFAULT_LOSS; }
    if (slo !== null && !inRange(slo, 0.001, 3600000)) { notices.push("Latency SLO: not a number from 0.001 to 3,600,000; using " + g(DEFAULT_SLO) + "."); slo = DEFAULT_SLO; }
    if (budget !== null && !inRange(budget, 0.001, 2 * 1024 * 1024)) { notices.push("Memory budget: not a number from 0.001 to 2,097,152 MiB; using none."); budget = null; }
    if ((kind === "min_latency" || kind === "min_memory") && loss === null) {
      notices.push("Policy " + kind + " needs an accuracy floor: using max_accuracy."); kind = "max_accuracy";
    }
    if (kind === "min_memory" && slo === null) {
      notices.push("Policy min_memory needs a latency SLO: using max_accuracy."); kind = "max_accuracy";
    }
    return { kind: kind, latency_slo_ms: slo, max_loss_points: loss, accuracy_floor: null,
             memory_budget_bytes: budget !== null ? Math.floor(budget * MIB) : null };
  }

  var api = {
    POLICY_KINDS: POLICY_KINDS, paretoFront: paretoFront, recommend: recommend, recommendation: recommendation,
    feasibleKeys: feasibleKeys, coverage: coverage, coverageSentence: coverageSentence, policyFromState: policyFromState,
    describe: describe, format: { g: g, ms: ms, mib: mib }
  };
  root.EdgeFitWhatIf = api;
  if (typeof module !== "undefined" && module.exports) { module.exports = api; }
})(typeof window !== "undefined" ? window : this);
