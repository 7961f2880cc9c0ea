/* global document, location, localStorage, fetch */
// VM console: asks the API for a one-time ticket, then noVNC speaks RFB over the proxy's WebSocket.
import RFB from '/novnc/core/rfb.js';

const id = decodeURIComponent(location.hash.slice(1));
const token = localStorage.getItem('corral.token') || '';
const live = document.querySelector('#live');
document.querySelector('#title').textContent = `console of ${id}`;

const res = await fetch(`/api/v1/vms/${encodeURIComponent(id)}/console`, {
  method: 'POST',
  headers: { authorization: `Bearer ${token}` },
});
const t = await res.json();
if (!res.ok) {
  live.textContent = t.message || 'no console';
} else {
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${t.url}`;
  const rfb = new RFB(document.querySelector('#screen'), url);
  rfb.scaleViewport = true;
  rfb.addEventListener('connect', () => {
    live.textContent = `connected (${t.node})`;
    live.className = 'live on';
  });
  rfb.addEventListener('disconnect', () => {
    live.textContent = 'disconnected';
    live.className = 'live off';
  });
}
