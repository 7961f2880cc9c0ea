// How a CLI command finds its cluster: --config FILE, else $CORRAL_CONFIG, else ./cluster.yaml,
// else the config the demo wrote (~/.corral/current). Opens the store it names.
import { existsSync, readFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { loadClusterConfig, type ClusterConfig } from '../config/schema.js';
import { openStore } from '../store/index.js';
import type { Store } from '../store/types.js';
import { keys as keysOf, type Keys } from '../core/keys.js';
import { UsageError } from './program.js';

export interface GlobalOpts {
  config?: string;
  json?: boolean;
}

export function addConfigOption(cmd: Command): Command {
  return cmd.option(
    '-c, --config <file>',
    'cluster.yaml (default: $CORRAL_CONFIG, ./cluster.yaml, or the demo cluster)',
  );
}

export function currentConfigPointer(): string {
  return join(process.env.CORRAL_HOME ?? join(homedir(), '.corral'), 'current');
}

export function rememberConfig(path: string): void {
  const p = currentConfigPointer();
  mkdirSync(join(p, '..'), { recursive: true });
  writeFileSync(p, resolve(path) + '\n');
}

export function resolveConfigPath(explicit?: string): string {
  if (explicit) return explicit;
  if (process.env.CORRAL_CONFIG) return process.env.CORRAL_CONFIG;
  if (existsSync('cluster.yaml')) return 'cluster.yaml';
  const ptr = currentConfigPointer();
  if (existsSync(ptr)) {
    const p = readFileSync(ptr, 'utf8').trim();
    if (p && existsSync(p)) return p;
  }
  throw new UsageError(
    'no cluster config found',
    'pass --config FILE, set CORRAL_CONFIG, run in a directory with cluster.yaml, or start `corral demo`',
  );
}

export interface ClusterContext {
  configPath: string;
  config: ClusterConfig;
  store: Store;
  k: Keys;
  close(): Promise<void>;
}

export async function openCluster(opts: GlobalOpts, storeOpTimeoutMs = 3000): Promise<ClusterContext> {
  const configPath = resolveConfigPath(opts.config);
  const config = loadClusterConfig(configPath);
  const store = await openStore(config.store, { opTimeoutMs: storeOpTimeoutMs });
  return {
    configPath,
    config,
    store,
    k: keysOf(config.cluster.name),
    close: () => store.close(),
  };
}

/** Run fn with an open cluster, always closing the store. */
export async function withCluster<T>(opts: GlobalOpts, fn: (c: ClusterContext) => Promise<T>): Promise<T> {
  const c = await openCluster(opts);
  try {
    return await fn(c);
  } finally {
    await c.close();
  }
}
