// A tiny chart drawer on <canvas> for the dashboard: line / dot charts over time and the request
// timeline. No chart library: it would weigh more than the whole page and need a CDN or a build step.
// Text on a canvas is drawn with fillText, never parsed as HTML.
"use strict";

const Charts = (() => {
  const AXIS = "#8a8f98", GRID = "#e3e6ea", FONT = "11px system-ui, sans-serif";

  function setup(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = FONT;
    return { ctx, w, h };
  }

  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 10) return v.toFixed(0);
    if (a >= 1) return v.toFixed(1);
    if (a >= 0.01) return v.toFixed(2);
    return String(+v.toPrecision(2));
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 4, 8, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // series: [{label, color, points: [[x, y], ...], dots}]; x in seconds relative to now (<= 0)
  function line(canvas, series, opts = {}) {
    const { ctx, w, h } = setup(canvas);
    if (w === 0) return;
    const L = 44, R = 8, T = 16, B = 16;
    const xmin = opts.xmin ?? -300, xmax = 0;
    let ymax = opts.ymax ?? 0;
    if (opts.ymax === undefined) {
      for (const s of series) for (const [x, y] of s.points) if (x >= xmin && y > ymax) ymax = y;
      ymax = niceMax(ymax);
    }
    const X = (x) => L + (x - xmin) / (xmax - xmin) * (w - L - R);
    const Y = (y) => T + (1 - y / ymax) * (h - T - B);
    ctx.strokeStyle = GRID;
    ctx.fillStyle = AXIS;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = ymax * i / 4;
      ctx.beginPath(); ctx.moveTo(L, Y(y)); ctx.lineTo(w - R, Y(y)); ctx.stroke();
      ctx.fillText(fmt(y) + (opts.unit || ""), L - 4, Y(y));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const div = -xmin % 60 === 0 ? 4 : 3;       // the spans are multiples of 15 s: whole-second ticks
    for (let i = 0; i <= div; i++) {
      const x = xmin + (xmax - xmin) * i / div;
      ctx.fillText(i === div ? "now" : Math.round(x) + "s", X(x), h - B + 3);
    }
    ctx.save();
    ctx.beginPath(); ctx.rect(L, T - 2, w - L - R, h - T - B + 4); ctx.clip();
    for (const s of series) {
      ctx.strokeStyle = ctx.fillStyle = s.color;
      ctx.lineWidth = 1.5;
      const pts = s.points.filter(([x, y]) => x >= xmin - 5 && y !== null && y !== undefined);
      if (s.dots) {
        for (const [x, y] of pts) { ctx.beginPath(); ctx.arc(X(x), Y(Math.min(y, ymax)), 2, 0, 7); ctx.fill(); }
      } else {
        ctx.beginPath();
        pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
        ctx.stroke();
      }
    }
    ctx.restore();
    ctx.textAlign = "left";
    let lx = L;
    for (const s of series) {
      ctx.fillStyle = s.color;
      ctx.fillRect(lx, 3, 8, 8);
      ctx.fillStyle = AXIS;
      ctx.fillText(s.label, lx + 11, 1);
      lx += ctx.measureText(s.label).width + 24;
    }
  }

  const COLORS = { queued: "#b8bec7", prefill: "#f0a030", decode: "#3b7ddd", preempted: "#d9363e" };

  // requests: [{arrival, scheduled, first_token, finished, preemptions}], times relative to now (<= 0)
  function timeline(canvas, requests) {
    const rowH = 7, gap = 2, T = 4, B = 16, L = 40, R = 8;
    canvas.style.height = Math.max(60, T + B + requests.length * (rowH + gap)) + "px";
    const { ctx, w, h } = setup(canvas);
    if (w === 0) return;
    let xmin = -10;
    for (const r of requests) if (r.arrival < xmin) xmin = r.arrival;
    xmin = -niceMax(-xmin);
    const X = (x) => L + (x - xmin) / -xmin * (w - L - R);
    ctx.fillStyle = AXIS;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.strokeStyle = GRID;
    for (let i = 0; i <= 4; i++) {
      const x = xmin * (1 - i / 4);
      ctx.beginPath(); ctx.moveTo(X(x), T); ctx.lineTo(X(x), h - B); ctx.stroke();
      ctx.fillText(i === 4 ? "now" : x.toFixed(-xmin < 40 ? 1 : 0) + "s", X(x), h - B + 3);
    }
    if (!requests.length) {
      ctx.fillText("no finished request yet", w / 2, T + 10);
      return;
    }
    requests.forEach((r, i) => {
      const y = T + i * (rowH + gap);
      const sched = r.scheduled ?? r.first_token ?? r.finished;
      const first = r.first_token ?? r.finished;
      const spans = [["queued", r.arrival, sched], ["prefill", sched, first], ["decode", first, r.finished]];
      for (const [kind, a, b] of spans) {
        if (a === null || b === null) continue;
        ctx.fillStyle = COLORS[kind];
        ctx.fillRect(X(a), y, Math.max(1, X(b) - X(a)), rowH);
      }
      if (r.preemptions > 0) {
        ctx.fillStyle = COLORS.preempted;
        ctx.fillRect(X(first), y, 3, rowH);
        ctx.textAlign = "right";
        ctx.textBaseline = "top";
        ctx.fillText("×" + r.preemptions, L - 4, y - 2);
      }
    });
  }

  return { line, timeline, fmt };
})();
