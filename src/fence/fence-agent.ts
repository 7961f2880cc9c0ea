// The `fence-agent` device: a Pacemaker fence agent (Debian's fence-agents: fence_xvm,
// fence_ipmilan, fence_virsh...) driven through its documented stdin interface: one
// `key=value` a line (action=off, plug=<node>, then the configured params); exit 0 = fenced.
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import { runDevice } from './run.js';
import type { DeviceResult } from './types.js';

/** where Debian installs fence agents, after the configured and $CORRAL_FENCE_AGENT_PATH dirs */
const FENCE_AGENT_DIRS = ['/usr/sbin', '/sbin', '/usr/local/sbin'];
const AGENT_NAME = /^fence_[a-z0-9_]+$/;

/** Find a fence agent binary by name; null when not installed. */
export function resolveFenceAgent(agent: string, extraDirs: string[] = []): string | null {
  if (!AGENT_NAME.test(agent)) return null;
  const fromEnv = (process.env.CORRAL_FENCE_AGENT_PATH ?? '').split(delimiter).filter(Boolean);
  const fromPath = (process.env.PATH ?? '').split(delimiter).filter(Boolean);
  for (const dir of [...extraDirs, ...fromEnv, ...FENCE_AGENT_DIRS, ...fromPath]) {
    const p = join(dir, agent);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return null;
}

function paramValue(v: string | number | boolean): string {
  if (typeof v === 'boolean') return v ? '1' : '0';
  return String(v);
}

/** The stdin text for an action; an error when a key or value would break the line protocol. */
export function fenceAgentStdin(
  action: string,
  node: string,
  params: Record<string, string | number | boolean>,
): { text: string } | { error: string } {
  const lines = new Map<string, string>();
  lines.set('action', action);
  // a configured plug (or its old name, port) maps the node to the device's own name for it
  if (params.plug === undefined && params.port === undefined) lines.set('plug', node);
  for (const [k, v] of Object.entries(params)) {
    if (k === 'action') return { error: `params.action is set by corral (${action}); remove it` };
    const value = paramValue(v);
    if (!/^[A-Za-z0-9_-]+$/.test(k))
      return { error: `params key ${JSON.stringify(k)} is not a fence agent option name` };
    if (/[\r\n]/.test(value)) return { error: `params.${k} contains a line break` };
    lines.set(k, value);
  }
  return { text: [...lines].map(([k, v]) => `${k}=${v}\n`).join('') };
}

export async function fenceWithAgent(
  agent: string,
  params: Record<string, string | number | boolean>,
  node: string,
  timeoutMs: number,
  extraDirs: string[],
  timeoutNote?: string,
): Promise<DeviceResult> {
  const path = resolveFenceAgent(agent, extraDirs);
  if (!path) {
    return {
      ok: false,
      error: `fence agent ${agent} not found in ${[...extraDirs, ...FENCE_AGENT_DIRS].join(', ')} or $PATH (install fence-agents)`,
    };
  }
  const stdin = fenceAgentStdin('off', node, params);
  if ('error' in stdin) return { ok: false, error: stdin.error };
  return runDevice([path], { timeoutMs, stdin: stdin.text, timeoutNote });
}
