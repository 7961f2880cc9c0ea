// The production Fencer: runs a node's fence devices in the configured order until one
// succeeds, each bounded by its own timeoutMs and all by the caller's deadline.
import { hostname } from 'node:os';
import { basename } from 'node:path';
import { CorralError } from '../core/errors.js';
import type { FenceOutcome, Fencer } from '../env/types.js';
import { fenceWithAgent } from './fence-agent.js';
import { fenceLocal } from './local.js';
import { runDevice } from './run.js';
import { fenceSbd } from './sbd.js';
import type { DeviceResult, FenceDeviceConfig, FenceNodeConfig, FencerOptions } from './types.js';

export type { FenceDeviceConfig, FenceNodeConfig, FencerOptions } from './types.js';
export { fenceAgentStdin, resolveFenceAgent } from './fence-agent.js';
export { AGENT_PIDFILE, fenceLocal, writeAgentPidfile } from './local.js';

/** the `local` device's timeout when the config gives none */
export const LOCAL_FENCE_TIMEOUT_MS = 5000;
/**
 * deadlineMs is absolute wall-clock ms (nowMs() + budget). A value below this cannot be a
 * date after 2001: it is taken as a budget relative to now, so a caller passing a duration
 * still gets a bounded fence instead of an instant "deadline passed".
 */
const ABSOLUTE_DEADLINE_MIN_MS = 1_000_000_000_000;

export class FenceConfigError extends CorralError {
  constructor(where: string, message: string, hint?: string) {
    super('CORRAL_FENCE_CONFIG', `${where}: ${message}`, hint);
  }
}

/** how a device is named in outcomes and events */
export function deviceName(d: FenceDeviceConfig): string {
  switch (d.type) {
    case 'command':
      return `command:${basename(d.command[0] ?? '?')}`;
    case 'fence-agent':
      return `fence-agent:${d.agent}`;
    case 'local':
      return 'local';
    case 'sbd':
      return `sbd:${d.device}`;
  }
}

function deviceTimeoutMs(d: FenceDeviceConfig): number {
  return d.type === 'local' ? (d.timeoutMs ?? LOCAL_FENCE_TIMEOUT_MS) : d.timeoutMs;
}

export function createFencer(nodes: FenceNodeConfig[], opts: FencerOptions): Fencer {
  const byName = new Map<string, FenceDeviceConfig[]>();
  for (const n of nodes) {
    if (byName.has(n.name))
      throw new FenceConfigError(`nodes.${n.name}`, 'node listed twice', 'name each node once');
    n.fence.forEach((d, i) => {
      if (d.type === 'command' && d.command.length === 0) {
        throw new FenceConfigError(
          `nodes.${n.name}.fence[${i}].command`,
          'empty argv',
          'give the executable and its arguments',
        );
      }
      if (d.type === 'sbd' && !(d.msgwaitMs < d.timeoutMs)) {
        throw new FenceConfigError(
          `nodes.${n.name}.fence[${i}].msgwaitMs`,
          `msgwaitMs (${d.msgwaitMs}) must be less than timeoutMs (${d.timeoutMs})`,
          'a silent slot counts as fenced only after msgwaitMs, which must fit in the device timeout',
        );
      }
      if (!(deviceTimeoutMs(d) > 0)) {
        throw new FenceConfigError(
          `nodes.${n.name}.fence[${i}].timeoutMs`,
          'must be a positive number of ms',
        );
      }
    });
    byName.set(n.name, n.fence);
  }
  const now = opts.nowMs ?? Date.now;

  async function runOne(
    node: string,
    d: FenceDeviceConfig,
    timeoutMs: number,
    note?: string,
  ): Promise<DeviceResult> {
    switch (d.type) {
      case 'command':
        return runDevice([...d.command, node, 'off'], { timeoutMs, timeoutNote: note });
      case 'fence-agent':
        return fenceWithAgent(d.agent, d.params, node, timeoutMs, opts.fenceAgentDirs ?? [], note);
      case 'local': {
        if (!opts.localStateDir) {
          return {
            ok: false,
            error: 'the local fence device needs the state directory of the node (localStateDir)',
          };
        }
        return fenceLocal(opts.localStateDir(node), timeoutMs, note);
      }
      case 'sbd':
        return fenceSbd({
          device: d.device,
          node,
          slot: d.slot ?? opts.diskSlot?.(node),
          timeoutMs,
          msgwaitMs: d.msgwaitMs,
          from: opts.self ?? hostname(),
          nowMs: now,
          note,
        });
    }
  }

  return {
    deviceCount: (node) => byName.get(node)?.length ?? 0,

    async fence(node, deadlineMs): Promise<FenceOutcome> {
      const t0 = now();
      const deadline = deadlineMs < ABSOLUTE_DEADLINE_MIN_MS ? t0 + deadlineMs : deadlineMs;
      const devices = byName.get(node) ?? [];
      const attempts: { device: string; error: string }[] = [];
      if (devices.length === 0) {
        attempts.push({ device: 'none', error: `node ${node} has no fence device configured` });
        return { ok: false, attempts, durationMs: now() - t0 };
      }
      for (const d of devices) {
        const device = deviceName(d);
        const remainingMs = Math.floor(deadline - now());
        if (remainingMs <= 0) {
          attempts.push({ device, error: 'not tried: the fence deadline passed' });
          continue;
        }
        const configured = deviceTimeoutMs(d);
        const timeoutMs = Math.min(configured, remainingMs);
        const note = timeoutMs < configured ? '(cut short by the fence deadline)' : undefined;
        const tDev = now();
        const r = await runOne(node, d, timeoutMs, note);
        if (r.ok) {
          opts.log('info', `fenced ${node} with ${device}`, { node, device, durationMs: now() - tDev });
          return { ok: true, device, durationMs: now() - t0 };
        }
        opts.log('warn', `fence device ${device} failed for ${node}: ${r.error}`, { node, device });
        attempts.push({ device, error: r.error });
      }
      return { ok: false, attempts, durationMs: now() - t0 };
    },
  };
}
