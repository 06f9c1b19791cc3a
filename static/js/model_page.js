// Model page: the ticked variants become the heatmap selection (?sel=1,2,3), other filters kept.
(function () {
  "use strict";
  var button = document.getElementById("heatmap-apply");
  if (!button) { return; }
  button.addEventListener("click", function () {
    var ids = Array.prototype.map.call(
      document.querySelectorAll("#variant-table input[name=selv]:checked"),
      function (box) { return box.value; }
    );
    var params = new URLSearchParams(window.location.search);
    if (ids.length) { params.set("sel", ids.join(",")); } else { params.delete("sel"); }
    window.location.search = params.toString();
  });
})();
