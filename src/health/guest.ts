// Guest liveness probes for VMs (cxm pinged its guests with fping):
// - ping: fping when installed, else ping, else a bounded TCP connect to `port` (an answer,
//   even "connection refused", proves the guest's network stack is up);
// - guest-agent: guest-sync on the QEMU guest agent's Unix socket.
import { execFile } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { createConnection } from 'node:net';
import type { GuestCheck } from '../core/vm-spec.js';

export type GuestProbeResult = { ok: true } | { ok: false; error: string };

const PING_PATHS = ['/usr/bin/fping', '/usr/sbin/fping', '/bin/ping', '/usr/bin/ping'];
/** extra time an external ping tool gets beyond the check's own timeout before it is killed */
const TOOL_GRACE_MS = 500;

function findTool(): string | undefined {
  for (const p of PING_PATHS) {
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // next
    }
  }
  return undefined;
}

export function describeGuestCheck(c: GuestCheck): string {
  return c.type === 'ping' ? `ping ${c.address}` : 'guest agent';
}

export async function probeGuest(c: GuestCheck, guestAgentSocket: string): Promise<GuestProbeResult> {
  if (c.type === 'guest-agent') return guestAgentPing(guestAgentSocket, c.timeoutMs);
  const tool = findTool();
  if (tool) return pingWith(tool, c.address, c.timeoutMs);
  return tcpReach(c.address, c.port, c.timeoutMs);
}

function pingWith(tool: string, address: string, timeoutMs: number): Promise<GuestProbeResult> {
  const fping = tool.endsWith('fping');
  const args = fping
    ? ['-c', '1', '-t', String(timeoutMs), '-q', '--', address]
    : ['-c', '1', '-n', '-W', String(Math.max(1, Math.ceil(timeoutMs / 1000))), '--', address];
  return new Promise((resolve) => {
    execFile(tool, args, { timeout: timeoutMs + TOOL_GRACE_MS }, (err, _out, stderr) => {
      if (!err) resolve({ ok: true });
      else resolve({ ok: false, error: `${tool} ${address}: ${stderr.trim() || err.message}` });
    });
  });
}

function tcpReach(host: string, port: number, timeoutMs: number): Promise<GuestProbeResult> {
  return new Promise((resolve) => {
    const s = createConnection({ host, port });
    const done = (r: GuestProbeResult) => {
      clearTimeout(timer);
      s.destroy();
      resolve(r);
    };
    const timer = setTimeout(
      () => done({ ok: false, error: `${host}:${port}: no answer in ${timeoutMs} ms` }),
      timeoutMs,
    );
    s.once('connect', () => done({ ok: true }));
    s.once('error', (e: NodeJS.ErrnoException) =>
      done(e.code === 'ECONNREFUSED' ? { ok: true } : { ok: false, error: `${host}:${port}: ${e.message}` }),
    );
  });
}

/** guest-sync with a random id; the agent must echo it back */
function guestAgentPing(path: string, timeoutMs: number): Promise<GuestProbeResult> {
  const id = Math.floor(Math.random() * 2 ** 31);
  return new Promise((resolve) => {
    const s = createConnection({ path });
    let buf = '';
    const done = (r: GuestProbeResult) => {
      clearTimeout(timer);
      s.destroy();
      resolve(r);
    };
    const timer = setTimeout(
      () => done({ ok: false, error: `guest agent did not answer within ${timeoutMs} ms` }),
      timeoutMs,
    );
    s.once('connect', () => s.write(JSON.stringify({ execute: 'guest-sync', arguments: { id } }) + '\n'));
    s.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      for (const line of buf.split('\n')) {
        try {
          const v = JSON.parse(line) as { return?: unknown };
          if (v.return === id) return done({ ok: true });
        } catch {
          // partial line
        }
      }
    });
    s.once('error', (e) => done({ ok: false, error: `guest agent socket ${path}: ${e.message}` }));
  });
}
