// The dashboard: polls the driver API once a second and draws, per deployment, its state,
// progress, region map (remote / zero / filling / local) and fetch throughput over time.
// The token comes from the URL fragment (#token=…, never sent to the server) or a form,
// and is kept in sessionStorage for this tab only.
'use strict';

const COLORS = { r: '#30363d', z: '#58a6ff', f: '#d29922', L: '#3fb950' };
const HISTORY_SECONDS = 120;
const rates = new Map(); // node -> [{t, bps}]
let token = null;

function takeToken() {
  const m = /(?:^|&)token=([^&]+)/.exec(location.hash.slice(1));
  if (m) {
    sessionStorage.setItem('smartnic-token', decodeURIComponent(m[1]));
    window.history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem('smartnic-token');
}

async function api(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${token}` } });
  if (res.status === 401) {
    sessionStorage.removeItem('smartnic-token');
    token = null;
    showLogin('That token is not accepted.');
    throw new Error('unauthorized');
  }
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
  return res.json();
}

function showLogin(message) {
  const form = document.getElementById('login');
  form.hidden = false;
  if (message) document.getElementById('deployments').innerHTML = `<div class="card err">${message}</div>`;
}

function fmtBytes(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

/** Expands "3L2r" into a Uint8Array of state characters' codes. */
function decodeRle(map, count) {
  const out = new Uint8Array(count);
  let i = 0;
  for (const m of map.matchAll(/(\d+)([rzfL])/g)) {
    const n = Number(m[1]);
    out.fill(m[2].charCodeAt(0), i, i + n);
    i += n;
  }
  return out;
}

function drawRegions(canvas, states) {
  const width = canvas.clientWidth || 800;
  // Cells as large as fit a ~140 px tall map (2–14 px); past that, a cell covers several regions.
  const cell = Math.max(2, Math.min(14, Math.floor(Math.sqrt((width * 140) / Math.max(1, states.length)))));
  const cols = Math.floor(width / cell);
  const per = Math.max(1, Math.ceil(states.length / (cols * Math.max(1, Math.floor(140 / cell)))));
  const cells = Math.ceil(states.length / per);
  const rows = Math.ceil(cells / cols);
  canvas.width = cols * cell;
  canvas.height = Math.max(cell, rows * cell);
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let c = 0; c < cells; c++) {
    // A cell covering several regions shows the least advanced state among them.
    let pick = 'L';
    for (let k = c * per; k < Math.min(states.length, (c + 1) * per); k++) {
      const s = String.fromCharCode(states[k]);
      if (s === 'r') { pick = 'r'; break; }
      if (s === 'f') pick = 'f';
      else if (s === 'z' && pick === 'L') pick = 'z';
    }
    ctx.fillStyle = COLORS[pick];
    ctx.fillRect((c % cols) * cell, Math.floor(c / cols) * cell, cell - (cell > 2 ? 1 : 0), cell - (cell > 2 ? 1 : 0));
  }
}

function drawThroughput(canvas, points) {
  const w = (canvas.width = canvas.clientWidth || 300);
  const h = (canvas.height = 90);
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, w, h);
  const now = Date.now() / 1000;
  const max = Math.max(1, ...points.map((p) => p.bps));
  ctx.strokeStyle = '#3fb950';
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach((p, i) => {
    const x = w - ((now - p.t) / HISTORY_SECONDS) * w;
    const y = h - 4 - (p.bps / max) * (h - 18);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = '#8a9199';
  ctx.font = '11px system-ui';
  ctx.fillText(`peak ${fmtBytes(max)}/s`, 4, 12);
}

/** What the deployment did with boot profiles: replayed (how many regions, from how many boots), and its own boot's recording. */
function profileText(bp) {
  if (!bp) return 'off';
  const replay = bp.applied ? `replayed ${bp.regions} regions (${bp.boots} boot${bp.boots === 1 ? '' : 's'})` : 'none replayed';
  const rec = bp.collected ? 'this boot stored' : `recording ${bp.recording}`;
  return `${replay} · ${rec}`;
}

function card(d) {
  let el = document.getElementById(`dep-${d.node_uuid}`);
  if (!el) {
    el = document.createElement('div');
    el.className = 'card';
    el.id = `dep-${d.node_uuid}`;
    el.innerHTML = `
      <div class="row"><span class="node"></span><span class="state"></span>
        <span class="kv">local <b class="local"></b></span><span class="kv">fetched <b class="fetched"></b></span>
        <span class="kv">rate <b class="rate"></b></span><span class="kv">export <b class="export"></b></span>
        <span class="kv">boot profile <b class="profile" data-testid="profile"></b></span></div>
      <div class="bar"><div></div></div>
      <div class="grid2">
        <div><div class="label">region map</div><canvas class="regions" data-testid="regions"></canvas>
          <div class="legend"><span><i style="background:${COLORS.L}"></i>local</span><span><i style="background:${COLORS.f}"></i>filling</span><span><i style="background:${COLORS.z}"></i>zero</span><span><i style="background:${COLORS.r}"></i>remote</span></div></div>
        <div><div class="label">fetch throughput, last ${HISTORY_SECONDS} s</div><canvas class="tput"></canvas></div>
      </div>
      <div class="err"></div>`;
    document.getElementById('deployments').appendChild(el);
  }
  return el;
}

async function tick() {
  if (!token) return;
  let list;
  try {
    list = (await api('/v1/deployments')).deployments;
  } catch {
    return;
  }
  const root = document.getElementById('deployments');
  const seen = new Set(list.map((d) => `dep-${d.node_uuid}`));
  for (const el of [...root.children]) if (!seen.has(el.id)) el.remove();
  if (list.length === 0) root.innerHTML = '<div class="card empty">No deployments.</div>';
  else root.querySelector('.empty')?.remove();
  const counts = {};
  for (const d of list) {
    counts[d.state] = (counts[d.state] || 0) + 1;
    const el = card(d);
    const p = d.progress;
    el.querySelector('.node').textContent = d.node_uuid;
    const st = el.querySelector('.state');
    st.textContent = d.state;
    st.className = `state ${d.state}`;
    el.querySelector('.local').textContent = `${p.regions_local}/${p.regions_total} regions (${(p.fraction * 100).toFixed(1)}%)`;
    el.querySelector('.fetched').textContent = fmtBytes(p.bytes_fetched);
    el.querySelector('.rate').textContent = `${fmtBytes(p.fetch_rate_bps)}/s`;
    el.querySelector('.export').textContent = d.export_uri || '—';
    el.querySelector('.profile').textContent = profileText(d.boot_profile);
    el.querySelector('.bar > div').style.width = `${(p.fraction * 100).toFixed(1)}%`;
    el.querySelector('.err').textContent = d.last_error || '';
    const h = rates.get(d.node_uuid) || [];
    h.push({ t: Date.now() / 1000, bps: p.fetch_rate_bps });
    while (h.length && Date.now() / 1000 - h[0].t > HISTORY_SECONDS) h.shift();
    rates.set(d.node_uuid, h);
    drawThroughput(el.querySelector('.tput'), h);
    if (d.state === 'ready' || d.state === 'complete') {
      try {
        const m = await api(`/v1/deployments/${encodeURIComponent(d.node_uuid)}/regions`);
        const canvas = el.querySelector('.regions');
        drawRegions(canvas, decodeRle(m.map, m.count));
        canvas.dataset.local = String((m.map.match(/(\d+)L/g) || []).reduce((a, x) => a + Number(x.slice(0, -1)), 0));
        canvas.dataset.count = String(m.count);
      } catch {
        // the agent may be restarting: keep the last picture
      }
    }
  }
  document.getElementById('summary').textContent = Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(' · ');
}

document.getElementById('login').addEventListener('submit', (e) => {
  e.preventDefault();
  token = document.getElementById('token').value.trim();
  sessionStorage.setItem('smartnic-token', token);
  document.getElementById('login').hidden = true;
  document.getElementById('deployments').innerHTML = '';
  tick();
});

token = takeToken();
if (!token) showLogin();
tick();
setInterval(tick, 1000);
