"""``GET /dashboard``: one self-contained page (vanilla JS + SVG, nothing fetched but our API).

It polls ``/v1/cluster`` and draws, live, every instance's rBlocks as a grid coloured by the
instance whose request occupies each block (a block of another colour is lent: borrowing
made visible; a free block that keeps a prefix's KV for the prefix cache has a colour of its
own: free, yet worth a prefill to the next request with that prefix), and the debt graph: instances as nodes, ledger edges debtor -> creditor with
the number of rBlocks owed. ``#key=<api key>`` in the URL is sent as the bearer token;
``?interval=<ms>`` sets the polling period.
"""

from __future__ import annotations

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
FREE_COLOUR = "#e6e6e6"
CACHED_COLOUR = "#f5dc82"


def dashboard_html(title: str) -> str:
    palette = ",".join(f'"{c}"' for c in PALETTE)
    return (
        _PAGE.replace("__TITLE__", _escape(title))
        .replace("__PALETTE__", palette)
        .replace("__FREE__", FREE_COLOUR)
        .replace("__CACHED__", CACHED_COLOUR)
    )


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>infinite-llm: __TITLE__</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  #status { color: #555; margin-bottom: 10px; }
  #status.error { color: #c00; }
  .row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
  .panel { border: 1px solid #ccc; border-radius: 6px; padding: 8px; }
  .panel h2 { font-size: 14px; margin: 0 0 6px; }
  .legend span { display: inline-block; margin-right: 12px; }
  .swatch { display: inline-block; width: 12px; height: 12px; vertical-align: -2px; margin-right: 4px;
            border: 1px solid #999; }
  .counts { color: #444; font-size: 12px; margin-top: 4px; white-space: pre-line; }
  table { border-collapse: collapse; font-size: 12px; }
  td { padding: 1px 8px 1px 0; }
</style>
</head>
<body>
<h1>infinite-llm cluster: __TITLE__</h1>
<div id="status">connecting...</div>
<div class="legend" id="legend"></div>
<div class="row">
  <div class="row" id="grids"></div>
  <div class="panel"><h2>debt graph (debtor &rarr; creditor, rBlocks)</h2>
    <svg id="graph" width="360" height="320" role="img" aria-label="debt graph"></svg>
    <table id="totals"></table></div>
</div>
<script>
"use strict";
const PALETTE = [__PALETTE__];
const FREE = "__FREE__";
const CACHED = "__CACHED__";
const SVGNS = "http://www.w3.org/2000/svg";
const params = new URLSearchParams(location.search);
const interval = Math.max(100, parseInt(params.get("interval") || "500", 10));
const keyMatch = /key=([^&]+)/.exec(location.hash);
const headers = keyMatch ? {"Authorization": "Bearer " + decodeURIComponent(keyMatch[1])} : {};
const grids = {};  // instance id -> {svg, rects, counts, n}

function colour(owner) { return owner === null ? FREE : PALETTE[owner % PALETTE.length]; }
// A block's state: the instance whose request holds it, "cached" (free, keeps a prefix's KV) or "free".
function fill(state) { return state === "cached" ? CACHED : colour(state === "free" ? null : Number(state)); }

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function makeGrid(inst) {
  const n = inst.num_blocks;
  const cols = Math.max(1, Math.min(n, Math.ceil(Math.sqrt(n * 2))));
  const rows = Math.ceil(n / cols);
  const cell = Math.max(3, Math.min(22, Math.floor(440 / cols)));
  const gap = cell >= 8 ? 2 : 1;
  const panel = document.createElement("div");
  panel.className = "panel";
  panel.id = "instance-" + inst.instance_id;
  const h2 = document.createElement("h2");
  const kind = inst.kind && inst.kind !== "model" ? ", " + inst.kind + " pool" : "";
  h2.innerHTML = '<span class="swatch" style="background:' + colour(inst.instance_id) + '"></span>instance '
    + inst.instance_id + " (" + n + " rBlocks" + kind + ")";
  panel.appendChild(h2);
  const svg = el("svg", {width: cols * cell, height: rows * cell, "data-instance": inst.instance_id});
  const rects = [];
  for (let b = 0; b < n; b++) {
    rects.push(el("rect", {x: (b % cols) * cell, y: Math.floor(b / cols) * cell, width: cell - gap,
                            height: cell - gap, fill: FREE, "data-owner": "free"}, svg));
  }
  panel.appendChild(svg);
  const counts = document.createElement("div");
  counts.className = "counts";
  panel.appendChild(counts);
  document.getElementById("grids").appendChild(panel);
  return {svg, rects, counts, n, states: new Array(n).fill("free")};
}

function drawGrids(snap) {
  const seen = new Set();
  for (const inst of snap.instances) {
    seen.add(String(inst.instance_id));
    let g = grids[inst.instance_id];
    if (!g || g.n !== inst.num_blocks) {
      if (g) g.svg.parentNode.remove();
      g = grids[inst.instance_id] = makeGrid(inst);
    }
    const owners = inst.block_owners || [];
    const cached = new Set(inst.cached_block_ids || []);
    for (let b = 0; b < g.n; b++) {
      const owner = owners[b] === undefined ? null : owners[b];
      const state = owner !== null ? String(owner) : cached.has(b) ? "cached" : "free";
      if (state !== g.states[b]) {
        g.states[b] = state;
        const r = g.rects[b];
        r.setAttribute("fill", fill(state));
        r.setAttribute("data-owner", state);
        r.setAttribute("stroke", owner !== null && owner !== inst.instance_id ? "#000" : "none");
      }
    }
    // two lines: one would widen the panel until two grids no longer fit side by side
    g.counts.textContent = "free " + inst.free + " (cached " + (inst.cached ?? 0) + ") · used "
      + inst.used + " · lent " + inst.lent + " · borrowed " + inst.borrowed + "\\nrunning "
      + inst.running + " · waiting " + inst.waiting + " · preemptions " + inst.preemptions;
  }
  for (const id of Object.keys(grids)) {
    if (!seen.has(id)) { grids[id].svg.parentNode.remove(); delete grids[id]; }
  }
}

function drawGraph(snap) {
  const svg = document.getElementById("graph");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = el("defs", {}, svg);
  const marker = el("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 12,
                               markerHeight: 12, markerUnits: "userSpaceOnUse", orient: "auto"}, defs);
  el("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: "#333"}, marker);
  const ids = snap.instances.map((i) => i.instance_id);
  const cx = 180, cy = 160, radius = ids.length > 1 ? 115 : 0, node = 24;
  const pos = {};
  ids.forEach((id, k) => {
    const a = -Math.PI / 2 + 2 * Math.PI * k / ids.length;
    pos[id] = [cx + radius * Math.cos(a), cy + radius * Math.sin(a)];
  });
  const maxBlocks = Math.max(1, ...snap.ledger.map((e) => e.blocks));
  for (const e of snap.ledger) {
    const [x1, y1] = pos[e.debtor] || [cx, cy], [x2, y2] = pos[e.creditor] || [cx, cy];
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy) || 1;
    const nx = -dy / len * 8, ny = dx / len * 8;  // offset so A->B and B->A do not overlap
    const sx = x1 + dx / len * node + nx, sy = y1 + dy / len * node + ny;
    const ex = x2 - dx / len * node + nx, ey = y2 - dy / len * node + ny;
    el("line", {x1: sx, y1: sy, x2: ex, y2: ey, stroke: colour(e.debtor), "stroke-width": 1.5 + 5 * e.blocks / maxBlocks,
                "marker-end": "url(#arrow)", "data-debtor": e.debtor, "data-creditor": e.creditor}, svg);
    const label = el("text", {x: (sx + ex) / 2 + nx, y: (sy + ey) / 2 + ny, "text-anchor": "middle",
                              "font-size": 12, fill: "#000"}, svg);
    label.textContent = e.blocks;
  }
  for (const id of ids) {
    const [x, y] = pos[id];
    el("circle", {cx: x, cy: y, r: node, fill: colour(id), stroke: "#333"}, svg);
    const t = el("text", {x, y: y + 5, "text-anchor": "middle", "font-size": 14, fill: "#fff",
                          "font-weight": "bold"}, svg);
    t.textContent = id;
  }
}

function sum(items, key) { return items.reduce((s, i) => s + (i[key] ?? 0), 0); }

function drawTotals(snap) {
  const loc = snap.locality || {};
  const req = snap.requests || {};
  const rows = [["requests running / waiting", (req.running ?? "-") + " / " + (req.waiting ?? "-")],
                ["ledger edges", snap.ledger.length],
                ["rBlocks owed", snap.ledger.reduce((s, e) => s + e.blocks, 0)],
                ["borrows / false replies", (snap.borrows ?? 0) + " / " + (snap.false_replies ?? 0)],
                ["migrated rBlocks", snap.migrated_blocks ?? 0],
                ["prefix cache hits / queries (tokens)",
                 sum(snap.instances, "prefix_cache_hits") + " / " + sum(snap.instances, "prefix_cache_queries")],
                ["locality (mean)", loc.mean === undefined ? "-" : Number(loc.mean).toFixed(3)]];
  document.getElementById("totals").innerHTML = rows.map(
    ([k, v]) => "<tr><td>" + k + "</td><td><b>" + v + "</b></td></tr>").join("");
}

function drawLegend(snap) {
  const parts = snap.instances.map((i) => '<span><span class="swatch" style="background:' + colour(i.instance_id)
    + '"></span>request of instance ' + i.instance_id + "</span>");
  parts.push('<span><span class="swatch" style="background:' + FREE + '"></span>free</span>');
  parts.push('<span><span class="swatch" style="background:' + CACHED
    + '"></span>cached (free, keeps a prefix&rsquo;s KV)</span>');
  parts.push("<span>black outline: lent to another instance</span>");
  document.getElementById("legend").innerHTML = parts.join("");
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/v1/cluster", {headers, cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const snap = await response.json();
    drawGrids(snap);
    drawGraph(snap);
    drawTotals(snap);
    drawLegend(snap);
    status.className = "";
    status.textContent = "block size " + snap.block_size + " tokens · borrowing "
      + (snap.borrowing ? "on" : "off") + " · updated " + new Date().toLocaleTimeString()
      + (snap.fresh ? "" : " · engine in a long step: view " + Number(snap.age_s || 0).toFixed(1) + " s old");
    document.body.setAttribute("data-updates", String(1 + Number(document.body.getAttribute("data-updates") || 0)));
  } catch (err) {
    status.className = "error";
    status.textContent = "cannot read /v1/cluster: " + err.message;
  }
  setTimeout(poll, interval);
}
poll();
</script>
</body>
</html>
"""
