/* global document, window, location, localStorage, fetch, EventSource, setTimeout, clearTimeout */
// Corral dashboard: plain ES module, no build step. Hash routes: #/ (overview), #/node/NAME,
// #/resource/ID, #/console/ID. Live: one EventSource on /api/v1/events/stream; every 'change'
// re-reads /api/v1/status (debounced), every 'event' goes to the feed.
const $ = (s, el = document) => el.querySelector(s);
const esc = (v) =>
  String(v ?? '').replace(
    /[&<>"']/g,
    (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c],
  );
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });
const ago = (now, then) => {
  if (!then) return '-';
  const s = Math.max(0, Math.round((now - then) / 1000));
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m` : `${Math.floor(s / 3600)}h`;
};
const feedMax = 200;

const state = {
  token: localStorage.getItem('corral.token') || '',
  who: null,
  status: null,
  feed: [],
  filter: 'all',
  es: null,
  detail: null,
};

async function api(method, path, body) {
  const headers = { authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(`/api/v1${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(data.message || `${res.status}`);
    err.status = res.status;
    err.hint = data.hint;
    throw err;
  }
  return data;
}

function toast(msg, bad = false) {
  const t = $('#toast');
  t.textContent = msg;
  t.className = bad ? 'bad' : '';
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), 5000);
}

// ---- login -------------------------------------------------------------------------------------
function renderLogin(error = '') {
  $('#logout').hidden = true;
  $('#who').textContent = '';
  $('#app').innerHTML = `
    <div class="panel login">
      <h2>Log in to Corral</h2>
      <p class="small">Paste an API token (<code>corral token create --role operator</code>;
        <code>corral demo</code> prints an admin token).</p>
      <form id="login-form">
        <input id="token-input" type="password" autocomplete="off" placeholder="crl_…" />
        <button class="primary" type="submit">Log in</button>
        <p class="err">${esc(error)}</p>
      </form>
    </div>`;
  $('#login-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    state.token = $('#token-input').value.trim();
    try {
      state.who = await api('GET', '/whoami');
      localStorage.setItem('corral.token', state.token);
      start();
    } catch (err) {
      renderLogin(err.status === 401 ? 'unknown or revoked token' : err.message);
    }
  });
}

function logout() {
  localStorage.removeItem('corral.token');
  state.token = '';
  state.es?.close();
  state.es = null;
  setLive(false);
  renderLogin();
}

// ---- live updates ------------------------------------------------------------------------------
function setLive(on) {
  const l = $('#live');
  l.className = `live ${on ? 'on' : 'off'}`;
  l.textContent = on ? 'live' : 'offline';
}

let refreshTimer = null;
function scheduleRefresh() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    await refresh();
  }, 150);
}

function connectStream() {
  state.es?.close();
  const es = new EventSource(`/api/v1/events/stream?access_token=${encodeURIComponent(state.token)}`);
  state.es = es;
  es.addEventListener('hello', () => setLive(true));
  es.addEventListener('change', () => scheduleRefresh());
  es.addEventListener('event', (m) => {
    const e = JSON.parse(m.data);
    if (state.feed.some((x) => x.key === e.key)) return;
    state.feed.push({ ...e, fresh: true });
    if (state.feed.length > feedMax) state.feed.splice(0, state.feed.length - feedMax);
    renderFeed();
    scheduleRefresh();
  });
  es.onerror = () => {
    setLive(false);
    // EventSource reconnects by itself; a revoked token shows up on the next status read
  };
}

async function refresh() {
  try {
    state.status = await api('GET', '/status');
    const route = parseRoute();
    if (route.page === 'resource')
      state.detail = await api('GET', `/resources/${encodeURIComponent(route.arg)}`).catch(() => null);
    render();
  } catch (err) {
    if (err.status === 401) return logout();
    setLive(false);
  }
}

// ---- rendering ---------------------------------------------------------------------------------
function parseRoute() {
  const [, page = '', arg = ''] = location.hash.split('/').map(decodeURIComponent);
  return { page, arg };
}

function render() {
  const s = state.status;
  if (!s) return;
  $('#cluster-info').innerHTML =
    `cluster <b>${esc(s.cluster)}</b> · leader <b>${esc(s.leader ? s.leader.node : 'none')}</b>` +
    (s.leader ? ` (term ${s.leader.term})` : '') +
    ` · ${s.flags.armed ? 'armed' : '<b>DISARMED</b>'}${s.flags.halted ? ' · <b>HALTED</b>' : ''} · rev ${s.revision}`;
  const r = parseRoute();
  const main =
    r.page === 'node' ? renderNode(r.arg) : r.page === 'resource' ? renderResource(r.arg) : renderOverview();
  $('#app').innerHTML =
    `<div class="grid"><div>${main}</div><div class="panel"><h2>Live events</h2><ul class="feed" id="feed"></ul></div></div>`;
  renderFeed();
}

function renderFeed() {
  const ul = $('#feed');
  if (!ul) return;
  const { page, arg } = parseRoute();
  const list = state.feed
    .filter((e) => !arg || page === '' || e.object === arg)
    .slice(-100)
    .reverse();
  ul.innerHTML =
    list
      .map(
        (e) =>
          `<li class="${e.fresh ? 'fresh' : ''}" data-kind="${esc(e.kind)}"><span class="t">${clock(e.atMs)}</span>${esc(e.message)} <span class="small">— ${esc(e.by)}</span></li>`,
      )
      .join('') || '<li class="small">no events yet</li>';
  for (const e of state.feed) e.fresh = false;
}

const pct = (u, t) => (t > 0 ? Math.min(100, Math.round((u / t) * 100)) : 0);

function nodeCard(n) {
  return `<div class="node ${esc(n.state)}" data-node="${esc(n.name)}" data-state="${esc(n.state)}">
    <h3><a href="#/node/${encodeURIComponent(n.name)}">${esc(n.name)}</a>
      <span>${n.leader ? '<span class="badge leader">leader</span> ' : ''}<span class="badge ${esc(n.state)}">${esc(n.state)}</span></span></h3>
    <div class="small">${esc(n.address)} · ${n.resources} resource${n.resources === 1 ? '' : 's'}${n.maintenance ? ' · maintenance' : ''}</div>
    <div class="small">CPU ${n.cpus.used}/${n.cpus.total}</div><div class="bar"><span style="width:${pct(n.cpus.used, n.cpus.total)}%"></span></div>
    <div class="small">Memory ${n.memory.used}/${n.memory.total} MiB</div><div class="bar"><span style="width:${pct(n.memory.used, n.memory.total)}%"></span></div>
    ${n.reason ? `<div class="small">${esc(n.reason)}</div>` : ''}
  </div>`;
}

function resourceRows(rows, now) {
  if (rows.length === 0) return '<p class="small">none</p>';
  return `<table><thead><tr><th>Resource</th><th>State</th><th>Node</th><th>Epoch</th><th>Since</th><th>Reason</th><th></th></tr></thead><tbody>
    ${rows
      .map(
        (
          r,
        ) => `<tr data-resource="${esc(r.id)}" data-state="${esc(r.state)}" data-node="${esc(r.node ?? '')}">
      <td><a href="#/resource/${encodeURIComponent(r.id)}">${esc(r.id)}</a>${r.kind === 'vm' ? ' <span class="small">VM</span>' : ''}</td>
      <td><span class="badge ${esc(r.state)}">${esc(r.state)}</span></td>
      <td class="res-node">${r.node ? `<a href="#/node/${encodeURIComponent(r.node)}">${esc(r.node)}</a>` : '-'}</td>
      <td>${r.epoch}</td><td>${ago(now, r.sinceMs)}</td><td class="reason">${esc(r.reason)}</td>
      <td><div class="actions">${resourceButtons(r)}</div></td></tr>`,
      )
      .join('')}</tbody></table>`;
}

function resourceButtons(r) {
  const id = esc(r.id);
  const b = (act, label, cls = '') =>
    `<button class="${cls}" data-act="${act}" data-id="${id}">${label}</button>`;
  return [
    r.desired === 'stopped' ? b('start', 'Start') : b('stop', 'Stop'),
    r.kind === 'vm' ? b('migrate', 'Migrate') : b('move', 'Move'),
    r.failures > 0 || r.state === 'failed' ? b('cleanup', 'Cleanup') : '',
    r.kind === 'vm' && r.state === 'started'
      ? `<a href="/ui/console.html#${encodeURIComponent(r.id)}" target="_blank"><button>Console</button></a>`
      : '',
  ].join('');
}

function renderOverview() {
  const s = state.status;
  const counts = {};
  for (const r of s.resources) counts[r.state] = (counts[r.state] || 0) + 1;
  const chips = ['all', ...Object.keys(counts).sort()]
    .map(
      (k) =>
        `<span class="chip ${state.filter === k ? 'sel' : ''}" data-filter="${esc(k)}">${esc(k)} ${k === 'all' ? s.resources.length : counts[k]}</span>`,
    )
    .join('');
  const rows = s.resources.filter((r) => state.filter === 'all' || r.state === state.filter);
  return `<div class="panel"><h2>Nodes <span class="small">${s.nodes.filter((n) => n.state === 'online').length}/${s.nodes.length} online</span></h2>
      <div class="nodes">${s.nodes.map(nodeCard).join('')}</div></div>
    <div class="panel"><h2>Resources</h2><div class="chips">${chips}</div>${resourceRows(rows, s.nowMs)}</div>`;
}

function renderNode(name) {
  const s = state.status;
  const n = s.nodes.find((x) => x.name === name);
  if (!n) return `<div class="panel"><p class="err">no node ${esc(name)}</p><a href="#/">back</a></div>`;
  const fence = n.lastFence
    ? `${n.lastFence.ok ? 'ok' : 'FAILED'} by ${esc(n.lastFence.device)} at ${clock(n.lastFence.atMs)}${n.lastFence.error ? ': ' + esc(n.lastFence.error) : ''}`
    : '-';
  return `<div class="panel"><a href="#/">← overview</a>
      <h2>Node ${esc(n.name)} <span class="badge ${esc(n.state)}">${esc(n.state)}</span>${n.leader ? ' <span class="badge leader">leader</span>' : ''}</h2>
      <dl class="kv"><dt>reason</dt><dd>${esc(n.reason || '-')}</dd><dt>address</dt><dd>${esc(n.address)}</dd>
      <dt>CPU</dt><dd>${n.cpus.used}/${n.cpus.total}</dd><dt>memory</dt><dd>${n.memory.used}/${n.memory.total} MiB</dd>
      <dt>labels</dt><dd>${esc(
        Object.entries(n.labels)
          .map(([k, v]) => `${k}=${v}`)
          .join(' ') || '-',
      )}</dd>
      <dt>maintenance</dt><dd>${n.maintenance ? 'on' : 'off'}</dd><dt>last fence</dt><dd>${fence}</dd></dl>
      <p class="actions">
        <button data-act="maintenance" data-node="${esc(n.name)}" data-on="${!n.maintenance}">Maintenance ${n.maintenance ? 'off' : 'on'}</button>
        <button class="danger" data-act="fence" data-node="${esc(n.name)}">Fence</button></p></div>
    <div class="panel"><h2>Resources on ${esc(n.name)}</h2>${resourceRows(
      s.resources.filter((r) => r.node === n.name),
      s.nowMs,
    )}</div>`;
}

function renderResource(id) {
  const s = state.status;
  const r = s.resources.find((x) => x.id === id);
  const d = state.detail;
  if (!r) return `<div class="panel"><p class="err">no resource ${esc(id)}</p><a href="#/">back</a></div>`;
  const transitions = (d?.history ?? [])
    .filter((e) => e.kind === 'resource' || e.kind === 'operator')
    .slice()
    .reverse();
  const spec = d?.spec ?? {};
  return `<div class="panel" data-resource-page="${esc(r.id)}"><a href="#/">← overview</a>
      <h2>${r.kind === 'vm' ? 'VM' : 'Resource'} ${esc(r.id)} <span class="badge ${esc(r.state)}" id="res-state">${esc(r.state)}</span></h2>
      <dl class="kv"><dt>node</dt><dd id="res-node">${r.node ? `<a href="#/node/${encodeURIComponent(r.node)}">${esc(r.node)}</a>` : '-'}</dd><dt>reason</dt><dd>${esc(r.reason)}</dd>
      <dt>desired</dt><dd>${esc(r.desired)}</dd><dt>epoch</dt><dd>${r.epoch}</dd><dt>priority</dt><dd>${r.priority}</dd>
      <dt>failures</dt><dd>${r.failures}</dd><dt>preferred node</dt><dd>${esc(spec.preferredNode ?? '-')}</dd>
      <dt>size</dt><dd>${esc(spec.cpus ?? '?')} cpu, ${esc(spec.memory ?? '?')} MiB</dd>
      <dt>observed</dt><dd>${(d?.observed ?? []).map((o) => `${esc(o.node)}: ${esc(o.state)} @${o.epoch}`).join('<br>') || '-'}</dd></dl>
      <p class="actions">${resourceButtons(r)}</p></div>
    <div class="panel"><h2>Transition history</h2>
      <table><thead><tr><th>Time</th><th>Change</th><th>By</th></tr></thead><tbody>
      ${transitions.map((e) => `<tr><td>${clock(e.atMs)}</td><td>${esc(e.message)}${e.epoch !== undefined ? ` <span class="small">epoch ${e.epoch}</span>` : ''}</td><td class="small">${esc(e.by)}</td></tr>`).join('') || '<tr><td colspan="3" class="small">none</td></tr>'}
      </tbody></table></div>`;
}

// ---- actions -----------------------------------------------------------------------------------
function confirmDialog(title, text, extraHtml = '') {
  const dlg = $('#confirm');
  $('#confirm-title').textContent = title;
  $('#confirm-text').textContent = text;
  $('#confirm-extra').innerHTML = extraHtml;
  dlg.returnValue = '';
  dlg.showModal();
  return new Promise((resolve) =>
    dlg.addEventListener('close', () => resolve(dlg.returnValue === 'ok'), { once: true }),
  );
}

async function act(el) {
  const a = el.dataset.act;
  const id = el.dataset.id;
  const s = state.status;
  try {
    if (a === 'start' || a === 'stop' || a === 'cleanup') {
      if (
        !(await confirmDialog(
          `${a} ${id}?`,
          a === 'cleanup'
            ? `Clear ${id}'s failure count.`
            : `Set ${id} to ${a === 'start' ? 'run' : 'stop'}.`,
        ))
      )
        return;
      const r = await api('POST', `/resources/${encodeURIComponent(id)}/${a}`);
      toast(r.message);
    } else if (a === 'move' || a === 'migrate') {
      const cur = s.resources.find((x) => x.id === id)?.node;
      const opts = s.nodes
        .filter((n) => n.name !== cur)
        .map(
          (n) =>
            `<option value="${esc(n.name)}" ${n.state !== 'online' ? 'disabled' : ''}>${esc(n.name)} (${esc(n.state)})</option>`,
        )
        .join('');
      if (
        !(await confirmDialog(
          `${a === 'migrate' ? 'Migrate' : 'Move'} ${id}`,
          `Currently on ${cur ?? 'no node'}. Target node:`,
          `<select id="target-node">${opts}</select>`,
        ))
      )
        return;
      const node = $('#target-node').value;
      const r = await api(
        'POST',
        `/${a === 'migrate' ? 'vms' : 'resources'}/${encodeURIComponent(id)}/${a}`,
        { node },
      );
      toast(r.message);
    } else if (a === 'maintenance') {
      const on = el.dataset.on === 'true';
      const node = el.dataset.node;
      if (
        !(await confirmDialog(
          `Maintenance ${on ? 'on' : 'off'} for ${node}?`,
          on ? `Resources move off ${node}; nothing new is placed there.` : `${node} takes resources again.`,
        ))
      )
        return;
      toast((await api('POST', `/nodes/${encodeURIComponent(node)}/maintenance`, { on })).message);
    } else if (a === 'fence') {
      const node = el.dataset.node;
      if (
        !(await confirmDialog(
          `Fence ${node}?`,
          `${node} is cut off with its fence devices now; everything it runs is killed and recovered elsewhere.`,
        ))
      )
        return;
      toast((await api('POST', `/nodes/${encodeURIComponent(node)}/fence`)).message);
    }
  } catch (err) {
    toast(`${err.message}${err.hint ? ` (${err.hint})` : ''}`, true);
  }
}

document.addEventListener('click', (e) => {
  const chip = e.target.closest('[data-filter]');
  if (chip) {
    state.filter = chip.dataset.filter;
    render();
    return;
  }
  const b = e.target.closest('button[data-act]');
  if (b) void act(b);
});
window.addEventListener('hashchange', () => {
  state.detail = null;
  void refresh();
});
$('#logout').addEventListener('click', logout);

async function start() {
  $('#logout').hidden = false;
  $('#who').textContent = `${state.who.name} (${state.who.role})`;
  const ev = await api('GET', '/events?limit=100').catch(() => ({ events: [] }));
  state.feed = ev.events;
  await refresh();
  connectStream();
}

(async () => {
  if (!state.token) return renderLogin();
  try {
    state.who = await api('GET', '/whoami');
    await start();
  } catch {
    renderLogin();
  }
})();
