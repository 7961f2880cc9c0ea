// Fence device configuration, as cluster.yaml describes it (src/config/schema.ts validates
// the same shapes; this type mirrors its parsed output so the fencer does not depend on it).
import type { Env } from '../env/types.js';

export type FenceDeviceConfig =
  /** an executable called as argv + [node, 'off'] (like cxm's FENCE_CMD); exit 0 = success */
  | { type: 'command'; command: string[]; timeoutMs: number }
  /** a Pacemaker fence agent (fence_xvm, fence_ipmilan...) fed key=value lines on stdin */
  | {
      type: 'fence-agent';
      agent: string;
      params: Record<string, string | number | boolean>;
      timeoutMs: number;
    }
  /** demo and tests: kill the node's agent, watchdog and resources on this host */
  | { type: 'local'; timeoutMs?: number }
  /** poison pill through the shared heartbeat disk (src/fence/sbd.ts); slot: the node's, else found by name */
  | { type: 'sbd'; device: string; timeoutMs: number; msgwaitMs: number; slot?: number };

export interface FenceNodeConfig {
  name: string;
  fence: FenceDeviceConfig[];
}

export interface FencerOptions {
  log: Env['log'];
  /** state directory of a node running on this host (needed by the `local` device) */
  localStateDir?: (node: string) => string;
  /** directories searched first for fence agent binaries (then $CORRAL_FENCE_AGENT_PATH, /usr/sbin, /sbin, $PATH) */
  fenceAgentDirs?: string[];
  /** the heartbeat-disk slot of a node (the `sbd` device), from its `disk` setting */
  diskSlot?: (node: string) => number | undefined;
  /** who fences, written with a poison pill (default the host name) */
  self?: string;
  /** wall clock for deadlines (default Date.now) */
  nowMs?: () => number;
}

/** what one device attempt returns */
export type DeviceResult = { ok: true } | { ok: false; error: string };
