// Agents of a cluster that runs on this one host (the demo, tests, a lab): where their state
// lives and how to start one. The demo writes local.json beside its cluster.yaml.
import { existsSync, readFileSync, mkdirSync, openSync, closeSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { defaultStateRoot, nodeStateDir } from './commands/agent.js';

export interface LocalInfo {
  stateRoot: string;
}

export function localInfo(configPath: string, stateRootOpt?: string): LocalInfo {
  if (stateRootOpt) return { stateRoot: resolve(stateRootOpt) };
  const p = join(dirname(resolve(configPath)), 'local.json');
  if (existsSync(p)) {
    const j = JSON.parse(readFileSync(p, 'utf8')) as Partial<LocalInfo>;
    if (typeof j.stateRoot === 'string') return { stateRoot: j.stateRoot };
  }
  return { stateRoot: process.env.CORRAL_STATE_ROOT ?? defaultStateRoot };
}

export const corralBin = resolve(
  dirname(fileURLToPath(import.meta.url)),
  '..',
  '..',
  ...(import.meta.url.includes('/dist/') ? ['..'] : []),
  'bin',
  'corral.js',
);

/** Start `corral agent` for a node in the background; its output goes to <state>/agent.log. */
export function spawnLocalAgent(
  configPath: string,
  node: string,
  stateRoot: string,
  extraArgs: string[] = [],
): number {
  const dir = nodeStateDir(stateRoot, node);
  mkdirSync(dir, { recursive: true });
  const out = openSync(join(dir, 'agent.log'), 'a');
  const child = spawn(
    process.execPath,
    [
      corralBin,
      'agent',
      '--config',
      resolve(configPath),
      '--node',
      node,
      '--state-root',
      stateRoot,
      ...extraArgs,
    ],
    { detached: true, stdio: ['ignore', out, out], env: { ...process.env } },
  );
  closeSync(out);
  child.unref();
  return child.pid ?? 0;
}

export function agentPid(stateRoot: string, node: string): number | undefined {
  const p = join(nodeStateDir(stateRoot, node), 'agent.pid');
  if (!existsSync(p)) return undefined;
  const pid = readPid(readFileSync(p, 'utf8'));
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  try {
    process.kill(pid, 0);
    return pid;
  } catch {
    return undefined;
  }
}

/** agent.pid holds {"pid", "startTime"} (older files: a bare pid). */
export function readPid(text: string): number {
  const t = text.trim();
  if (t.startsWith('{')) return Number((JSON.parse(t) as { pid: number }).pid);
  return Number(t);
}
