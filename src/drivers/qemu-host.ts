// What this host offers VMs, recorded in the node registration at join and compared across
// nodes by `corral check` (cxm's check-cpu): CPU model and flags, bridges, QEMU version.
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import type { HostInfo } from '../core/types.js';
import { QEMU_BINARY_DEFAULT } from './qemu-args.js';

/** bound on `qemu-system-x86_64 -version` */
const QEMU_VERSION_TIMEOUT_MS = 5000;

export function parseCpuinfo(text: string): { cpuModel: string; cpuFlags: string[] } {
  const first = text.split(/\n\s*\n/)[0] ?? '';
  const field = (name: string) =>
    first
      .split('\n')
      .find((l) => l.startsWith(name))
      ?.split(':')
      .slice(1)
      .join(':')
      .trim() ?? '';
  return {
    cpuModel: field('model name') || 'unknown',
    cpuFlags: field('flags').split(/\s+/).filter(Boolean).sort(),
  };
}

export function probeHost(qemuBinary = QEMU_BINARY_DEFAULT): HostInfo {
  let cpu = { cpuModel: 'unknown', cpuFlags: [] as string[] };
  try {
    cpu = parseCpuinfo(readFileSync('/proc/cpuinfo', 'utf8'));
  } catch {
    // not Linux: nothing to compare
  }
  let bridges: string[] = [];
  try {
    bridges = readdirSync('/sys/class/net')
      .filter((n) => existsSync(`/sys/class/net/${n}/bridge`))
      .sort();
  } catch {
    // no sysfs
  }
  const v = spawnSync(qemuBinary, ['-version'], { encoding: 'utf8', timeout: QEMU_VERSION_TIMEOUT_MS });
  const qemu = v.status === 0 ? (v.stdout.split('\n')[0] ?? '').trim() : null;
  return { ...cpu, bridges, qemu };
}
