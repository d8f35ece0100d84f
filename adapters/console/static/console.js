// flowledger console: the API token for mutating actions, and the duration chart.
// No inline script anywhere (the pages' Content-Security-Policy forbids it).
(function () {
  "use strict";
  var KEY = "flowledger.api-token";
  var pending = null; // what to do once a token is given

  function tokenRequired() {
    return document.body.dataset.tokenRequired === "true";
  }

  function storedToken() {
    try { return window.sessionStorage.getItem(KEY); } catch (e) { return null; }
  }

  function storeToken(value) {
    try {
      if (value) { window.sessionStorage.setItem(KEY, value); } else { window.sessionStorage.removeItem(KEY); }
    } catch (e) { /* storage refused: the token lives for this request only */ }
  }

  var onceToken = null; // when storage is refused

  function askToken(message, then) {
    var dialog = document.getElementById("token-dialog");
    var error = document.getElementById("token-error");
    error.textContent = message || "";
    error.hidden = !message;
    document.getElementById("token-input").value = "";
    pending = then;
    dialog.showModal();
    document.getElementById("token-input").focus();
  }

  function resend(elt) {
    if (elt && elt.tagName === "FORM") { elt.requestSubmit(); } else if (elt) { window.htmx.trigger(elt, "click"); }
  }

  function isRead(verb) {
    return !verb || verb.toLowerCase() === "get";
  }

  document.addEventListener("htmx:confirm", function (event) {
    if (isRead(event.detail.verb) || !tokenRequired() || storedToken() || onceToken) { return; }
    event.preventDefault();
    askToken("", function () { event.detail.issueRequest(true); });
  });

  document.addEventListener("htmx:configRequest", function (event) {
    if (isRead(event.detail.verb)) { return; }
    var token = storedToken() || onceToken;
    if (token) { event.detail.headers.Authorization = "Bearer " + token; }
  });

  document.addEventListener("htmx:responseError", function (event) {
    if (!event.detail.xhr || event.detail.xhr.status !== 401) { return; }
    storeToken(null);
    onceToken = null;
    var elt = event.detail.elt;
    askToken("The server refused this token. Check FLOWLEDGER_API_TOKEN and try again.", function () { resend(elt); });
  });

  // The live part of a page is redrawn every second: keep open what the reader opened.
  var opened = [];
  document.addEventListener("htmx:beforeSwap", function (event) {
    opened = Array.prototype.map.call(
      event.detail.target.querySelectorAll("details[id]"),
      function (d) { return [d.id, d.open]; });
  });
  document.addEventListener("htmx:afterSettle", function () {
    opened.forEach(function (pair) {
      var d = document.getElementById(pair[0]);
      if (d) { d.open = pair[1]; }
    });
    opened = [];
  });

  function setUpDialog() {
    var form = document.getElementById("token-form");
    if (!form) { return; }
    form.addEventListener("submit", function (event) {
      var cancelled = event.submitter && event.submitter.value === "cancel";
      if (cancelled) { pending = null; return; }
      var value = document.getElementById("token-input").value.trim();
      if (!value) {
        event.preventDefault();
        var error = document.getElementById("token-error");
        error.textContent = "Enter the token.";
        error.hidden = false;
        return;
      }
      storeToken(value);
      if (!storedToken()) { onceToken = value; }
      var then = pending;
      pending = null;
      if (then) { window.setTimeout(then, 0); }
    });
  }

  function drawPercentiles() {
    var holder = document.getElementById("percentiles");
    var source = document.getElementById("percentile-data");
    if (!holder || !source || !window.uPlot || holder.dataset.drawn) { return; }
    var series = JSON.parse(source.textContent);
    if (!series.points || !series.points.length) { return; }
    holder.dataset.drawn = "true";
    var xs = [], p50 = [], p95 = [], p99 = [];
    series.points.forEach(function (p) {
      xs.push(Date.parse(p.start) / 1000);
      p50.push(p.p50); p95.push(p.p95); p99.push(p.p99);
    });
    if (xs.length === 1) {
      // One bucket alone leaves uPlot to guess a span (years): frame it by its neighbours.
      var step = series.bucket_seconds;
      xs = [xs[0] - step, xs[0], xs[0] + step];
      [p50, p95, p99].forEach(function (ys) { ys.unshift(null); ys.push(null); });
    }
    var seconds = function (u, v) { return v == null ? "–" : v.toFixed(3) + " s"; };
    var options = {
      width: Math.max(holder.clientWidth, 320),
      height: 260,
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, (max || 1) * 1.1]; } } },
      series: [
        {},
        { label: "p50", stroke: "#2563eb", width: 2, value: seconds, points: { show: true } },
        { label: "p95", stroke: "#d97706", width: 2, value: seconds, points: { show: true } },
        { label: "p99", stroke: "#dc2626", width: 2, value: seconds, points: { show: true } }
      ],
      axes: [{}, { size: 60, values: function (u, vals) { return vals.map(function (v) { return v + " s"; }); } }]
    };
    new window.uPlot(options, [xs, p50, p95, p99], holder);
  }

  document.addEventListener("DOMContentLoaded", function () {
    setUpDialog();
    drawPercentiles();
  });
})();
