// `corral vm ...`: define (YAML, validated against the cluster before anything runs), edit
// ($EDITOR), history (every version kept in the store), undefine, list, show, start, stop,
// shutdown, destroy, migrate (live, with progress) and console; `drainNode` for `node drain`.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Command } from 'commander';
import { stringify } from 'yaml';
import { z } from 'zod';
import { action, UsageError } from '../program.js';
import { addConfigOption, withCluster, type ClusterContext, type GlobalOpts } from '../context.js';
import { printJson, table } from '../table.js';
import { operatorEvent } from './resource.js';
import { nodeStateDir } from './agent.js';
import { localInfo } from '../local.js';
import { ConfigError, loadYamlWithSchema } from '../../config/yaml.js';
import { CorralError } from '../../core/errors.js';
import { ResourceSpec } from '../../core/spec.js';
import { VM_MEMORY_OVERHEAD_MIB, VmDefinition, vmNameProblem, vmResourceInput } from '../../core/vm-spec.js';
import type { AgentStatus, MigrationProgress, NodeAdmin, ResourceRecord } from '../../core/types.js';
import { vmPaths } from '../../drivers/qemu-paths.js';
import { addClientOptions, openApiClient, type ClientOpts } from '../client.js';
import { vmConsoleViaApi, type ConsoleCliOpts } from '../console.js';

/** how often migrate/drain read the store while following progress */
export const FOLLOW_POLL_MS = 250;
export const MIGRATE_WAIT_MS_DEFAULT = 600_000;
export const DRAIN_WAIT_MS_DEFAULT = 1_800_000;
/** versions `vm history` keeps per VM before the oldest are dropped */
export const VM_HISTORY_VERSIONS_MAX = 1000;
/** bound on a definition file */
const DEFINITION_BYTES_MAX = 256 * 1024;

interface HistoryEntry {
  version: number;
  atMs: number;
  by: string;
  action: 'define' | 'edit' | 'undefine';
  yaml: string;
}

const histPrefix = (c: ClusterContext, name: string) => `${c.k.prefix}vmhistory/${name}/`;
const histKey = (c: ClusterContext, name: string, n: number) =>
  `${histPrefix(c, name)}${String(n).padStart(8, '0')}`;

function checkName(name: string): void {
  const p = vmNameProblem(name);
  if (p) throw new UsageError(`"${name}" is not a VM name: ${p}`, 'VM names are FQDNs like web1.example.org');
}

async function allSpecs(c: ClusterContext): Promise<ResourceSpec[]> {
  const r = await c.store.range(c.k.resources);
  const out: ResourceSpec[] = [];
  for (const kv of r.kvs) {
    const s = ResourceSpec.safeParse(JSON.parse(kv.value));
    if (s.success) out.push(s.data);
  }
  return out;
}

async function getVm(c: ClusterContext, name: string): Promise<{ spec: ResourceSpec; rev: number }> {
  checkName(name);
  const kv = await c.store.get(c.k.resource(name));
  if (!kv) throw new CorralError('CORRAL_NOT_FOUND', `no VM "${name}"`, 'see `corral vm list`');
  const spec = ResourceSpec.parse(JSON.parse(kv.value));
  if (spec.kind !== 'vm')
    throw new CorralError(
      'CORRAL_NOT_A_VM',
      `resource "${name}" is a ${spec.kind}, not a VM`,
      'use `corral resource`',
    );
  return { spec, rev: kv.modRevision };
}

async function history(c: ClusterContext, name: string): Promise<HistoryEntry[]> {
  const r = await c.store.range(histPrefix(c, name));
  return r.kvs.map((kv) => JSON.parse(kv.value) as HistoryEntry).sort((a, b) => a.version - b.version);
}

/**
 * Parse and validate a definition against the cluster: schema (file:line:col), disks present
 * on this host, MACs unique among the cluster's VMs, memory and cpus within the largest node.
 */
async function validateDefinition(
  c: ClusterContext,
  text: string,
  file: string,
  opts: { expectName?: string },
): Promise<{ def: VmDefinition; spec: ResourceSpec }> {
  const others = (await allSpecs(c)).filter((s) => s.kind === 'vm');
  const maxMem = Math.max(...c.config.nodes.map((n) => n.capacity.memory));
  const maxCpus = Math.max(...c.config.nodes.map((n) => n.capacity.cpus));
  const nodeNames = c.config.nodes.map((n) => n.name);
  const schema = VmDefinition.superRefine((d, ctx) => {
    const issue = (path: (string | number)[], message: string) =>
      ctx.addIssue({ code: 'custom', path, message });
    if (opts.expectName !== undefined && d.name !== opts.expectName)
      issue(
        ['name'],
        `renaming is not supported (was "${opts.expectName}"): define a new VM and undefine the old`,
      );
    d.disks.forEach((disk, i) => {
      if (!existsSync(disk.path))
        issue(
          ['disks', i, 'path'],
          `${disk.path} does not exist on this host (${hostname()}); disks must be on storage every node reaches`,
        );
    });
    const seen = new Map<string, number>();
    d.nics.forEach((n, i) => {
      const first = seen.get(n.mac);
      if (first !== undefined) issue(['nics', i, 'mac'], `MAC ${n.mac} is also nics[${first}].mac`);
      seen.set(n.mac, i);
      const owner = others.find((o) => o.id !== d.name && o.vm?.nics.some((x) => x.mac === n.mac));
      if (owner) issue(['nics', i, 'mac'], `MAC ${n.mac} is already used by VM ${owner.id}`);
    });
    if (d.memory + VM_MEMORY_OVERHEAD_MIB > maxMem)
      issue(
        ['memory'],
        `${d.memory} MiB (+${VM_MEMORY_OVERHEAD_MIB} MiB QEMU overhead) exceeds the largest node's capacity (${maxMem} MiB)`,
      );
    if (d.cpus > maxCpus) issue(['cpus'], `${d.cpus} exceeds the largest node's capacity (${maxCpus} cpus)`);
    if (d.preferredNode !== undefined && !nodeNames.includes(d.preferredNode))
      issue(['preferredNode'], `unknown node "${d.preferredNode}" (known: ${nodeNames.join(', ')})`);
    const clash = others.find((o) => o.id === d.name && o.kind !== 'vm');
    if (clash) issue(['name'], `"${d.name}" is already a ${clash.kind} resource`);
  });
  const r = loadYamlWithSchema(text, file, schema);
  if (!r.ok)
    throw new ConfigError(r.errors, 'fix the fields named above; nothing was changed in the cluster');
  const spec = ResourceSpec.safeParse(vmResourceInput(r.value));
  if (!spec.success)
    throw new CorralError(
      'CORRAL_CONFIG_INVALID',
      `${file}: ${spec.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`,
    );
  return { def: r.value, spec: spec.data };
}

function readDefinition(file: string): string {
  let text: Buffer;
  try {
    text = readFileSync(file);
  } catch (e) {
    throw new UsageError(`cannot read ${file}: ${(e as Error).message}`);
  }
  if (text.length > DEFINITION_BYTES_MAX)
    throw new UsageError(
      `${file} is ${text.length} bytes; a VM definition is at most ${DEFINITION_BYTES_MAX}`,
    );
  return text.toString('utf8');
}

/** Store the spec and a new history version in one txn (guarded on the spec's revision). */
async function storeVersion(
  c: ClusterContext,
  spec: ResourceSpec,
  yaml: string,
  act: HistoryEntry['action'],
  expectRev: number,
): Promise<number> {
  const hist = await history(c, spec.id);
  const version = (hist.at(-1)?.version ?? 0) + 1;
  const entry: HistoryEntry = {
    version,
    atMs: Date.now(),
    by: `operator@${process.env.USER ?? 'cli'}`,
    action: act,
    yaml,
  };
  const ops: Parameters<typeof c.store.txn>[0]['success'] = [
    { type: 'put', key: histKey(c, spec.id, version), value: JSON.stringify(entry) },
  ];
  if (act === 'undefine') ops.push({ type: 'delete', key: c.k.resource(spec.id) });
  else ops.push({ type: 'put', key: c.k.resource(spec.id), value: JSON.stringify(spec) });
  for (const old of hist.slice(0, Math.max(0, hist.length + 1 - VM_HISTORY_VERSIONS_MAX)))
    ops.push({ type: 'delete', key: histKey(c, spec.id, old.version) });
  const r = await c.store.txn({
    compare: [{ key: c.k.resource(spec.id), target: 'modRevision', op: '==', value: expectRev }],
    success: ops,
  });
  if (!r.succeeded)
    throw new CorralError(
      'CORRAL_CONFLICT',
      `VM "${spec.id}" changed while we wrote it`,
      'run the command again',
    );
  return version;
}

async function updateVm(
  c: ClusterContext,
  name: string,
  f: (s: ResourceSpec) => ResourceSpec,
): Promise<ResourceSpec> {
  for (let attempt = 0; attempt < 10; attempt++) {
    const { spec, rev } = await getVm(c, name);
    const next = f(spec);
    const r = await c.store.txn({
      compare: [{ key: c.k.resource(name), target: 'modRevision', op: '==', value: rev }],
      success: [{ type: 'put', key: c.k.resource(name), value: JSON.stringify(next) }],
    });
    if (r.succeeded) return next;
  }
  throw new CorralError('CORRAL_CONFLICT', `VM "${name}" keeps changing under us`, 'try again');
}

async function record(c: ClusterContext, id: string): Promise<ResourceRecord | undefined> {
  const kv = await c.store.get(c.k.assign(id));
  return kv ? (JSON.parse(kv.value) as ResourceRecord) : undefined;
}

async function statusOf(c: ClusterContext, node: string, id: string): Promise<AgentStatus | undefined> {
  const kv = await c.store.get(c.k.status(node, id));
  return kv ? (JSON.parse(kv.value) as AgentStatus) : undefined;
}

const mib = (b: number) => (b / 1048576).toFixed(1);
export function describeProgress(p: MigrationProgress | undefined): string {
  if (!p) return 'starting';
  const pct = p.totalBytes > 0 ? Math.min(100, Math.round((100 * p.transferredBytes) / p.totalBytes)) : 0;
  const rate = p.rateBps > 0 ? `, ${mib(p.rateBps)} MiB/s` : '';
  const down = p.downtimeMs !== undefined ? `, downtime ${p.downtimeMs} ms` : '';
  return `${mib(p.transferredBytes)}/${mib(p.totalBytes)} MiB (${pct}%)${rate}${down}`;
}

/** a VM definition as YAML (for `vm edit` when no history exists, e.g. defined through `resource define`) */
function specToYaml(s: ResourceSpec): string {
  const vm = s.vm as NonNullable<ResourceSpec['vm']>;
  return stringify({
    name: s.id,
    cpus: vm.cpus,
    memory: vm.memory,
    disks: vm.disks,
    nics: vm.nics,
    vnc: vm.vnc,
    machine: vm.machine,
    cpuModel: vm.cpuModel,
    accel: vm.accel,
    guestAgent: vm.guestAgent,
    shutdownTimeoutMs: vm.shutdownTimeoutMs,
    ...(vm.liveness ? { liveness: vm.liveness } : {}),
    ...(vm.migrationBandwidthMiBps !== undefined
      ? { migrationBandwidthMiBps: vm.migrationBandwidthMiBps }
      : {}),
    priority: s.priority,
    nodeSelector: s.nodeSelector,
    affinity: s.affinity,
    antiAffinity: s.antiAffinity,
    restart: s.restart,
    ...(s.preferredNode ? { preferredNode: s.preferredNode } : {}),
    desired: s.desired,
  });
}

export function registerVm(program: Command): void {
  const vm = program.command('vm').description('define and operate virtual machines (QEMU)');
  const cmd = (name: string, desc: string) => addConfigOption(vm.command(name).description(desc));

  cmd('define', 'create or update a VM from a YAML definition (validated before anything changes)')
    .requiredOption('-f, --file <file>', 'VM definition file')
    .action(
      action((opts: GlobalOpts & { file: string }) => {
        const text = readDefinition(opts.file);
        return withCluster(opts, async (c) => {
          const { spec } = await validateDefinition(c, text, opts.file, {});
          const kv = await c.store.get(c.k.resource(spec.id));
          const version = await storeVersion(c, spec, text, 'define', kv?.modRevision ?? 0);
          const what = kv ? 'updated' : 'defined';
          await operatorEvent(
            c,
            spec.id,
            what,
            `VM ${spec.id}: ${what} from ${opts.file} (version ${version})`,
          );
          process.stdout.write(`${spec.id}: ${what} (version ${version})\n`);
          return 0;
        });
      }),
    );

  cmd('edit', 'edit a VM definition with $EDITOR; a refused edit leaves the current version')
    .argument('<name>')
    .action(
      action((name: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          const { spec, rev } = await getVm(c, name);
          const before = (await history(c, name)).at(-1)?.yaml ?? specToYaml(spec);
          const file = join(mkdtempSync(join(tmpdir(), 'corral-vm-edit-')), `${name}.yaml`);
          writeFileSync(file, before);
          const editor = (process.env.VISUAL || process.env.EDITOR || 'vi').split(/\s+/).filter(Boolean);
          const r = spawnSync(editor[0] as string, [...editor.slice(1), file], { stdio: 'inherit' });
          if (r.error || r.status !== 0)
            throw new UsageError(
              `editor ${editor.join(' ')} failed (${r.error?.message ?? `exit ${r.status}`}); nothing changed`,
              'set EDITOR to your editor',
            );
          const after = readFileSync(file, 'utf8');
          if (after === before) {
            process.stdout.write(`${name}: no change\n`);
            return 0;
          }
          let next: ResourceSpec;
          try {
            next = (await validateDefinition(c, after, file, { expectName: name })).spec;
          } catch (e) {
            process.stderr.write(`your edit is kept in ${file}\n`);
            throw e;
          }
          const version = await storeVersion(c, next, after, 'edit', rev);
          await operatorEvent(c, name, 'updated', `VM ${name}: edited (version ${version})`);
          process.stdout.write(`${name}: updated (version ${version})\n`);
          return 0;
        }),
      ),
    );

  cmd('history', 'every stored version of a VM definition')
    .argument('<name>')
    .option('--show <version>', 'print one version')
    .option('--json', 'machine-readable output')
    .action(
      action((name: string, opts: GlobalOpts & { show?: string }) =>
        withCluster(opts, async (c) => {
          checkName(name);
          const h = await history(c, name);
          if (h.length === 0) throw new CorralError('CORRAL_NOT_FOUND', `no history for VM "${name}"`);
          if (opts.show !== undefined) {
            const v = h.find((e) => e.version === Number(opts.show));
            if (!v)
              throw new UsageError(
                `${name} has no version ${opts.show}`,
                `versions: ${h.map((e) => e.version).join(', ')}`,
              );
            if (opts.json) printJson(v);
            else process.stdout.write(v.yaml.endsWith('\n') ? v.yaml : v.yaml + '\n');
            return 0;
          }
          if (opts.json) printJson(h);
          else
            process.stdout.write(
              table(
                ['VERSION', 'WHEN', 'BY', 'ACTION', 'BYTES'],
                h.map((e) => [e.version, new Date(e.atMs).toISOString(), e.by, e.action, e.yaml.length]),
              ) + '\n',
            );
          return 0;
        }),
      ),
    );

  cmd('undefine', 'stop a VM and forget its definition (its history is kept)')
    .argument('<name>')
    .action(
      action((name: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          const { spec, rev } = await getVm(c, name);
          const version = await storeVersion(c, spec, '', 'undefine', rev);
          await operatorEvent(c, name, 'undefined', `VM ${name}: undefined (history version ${version})`);
          process.stdout.write(`${name}: undefined (stopping)\n`);
          return 0;
        }),
      ),
    );

  cmd('list', 'every VM with state, node, memory and cpus')
    .option('--json', 'machine-readable output')
    .action(
      action((opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          const vms = (await allSpecs(c)).filter((s) => s.kind === 'vm');
          const rows = await Promise.all(vms.map(async (s) => ({ spec: s, rec: await record(c, s.id) })));
          if (opts.json)
            printJson(
              rows.map(({ spec, rec }) => ({
                name: spec.id,
                state: rec?.state ?? 'stopped',
                node: rec?.node ?? null,
                desired: spec.desired,
                memory: spec.vm?.memory,
                cpus: spec.vm?.cpus,
                reason: rec?.reason ?? '',
              })),
            );
          else
            process.stdout.write(
              table(
                ['VM', 'STATE', 'NODE', 'DESIRED', 'MEM', 'CPUS', 'REASON'],
                rows.map(({ spec, rec }) => [
                  spec.id,
                  rec?.state ?? 'stopped',
                  rec?.node ?? '-',
                  spec.desired,
                  `${spec.vm?.memory ?? '?'}M`,
                  spec.vm?.cpus ?? '?',
                  rec?.reason ?? '',
                ]),
              ) + '\n',
            );
          return 0;
        }),
      ),
    );

  cmd('show', 'one VM: definition, state, agent observations, history')
    .argument('<name>')
    .option('--json', 'machine-readable output')
    .action(
      action((name: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          const { spec } = await getVm(c, name);
          const rec = await record(c, name);
          const statuses = await c.store.range(c.k.statuses);
          const observed = statuses.kvs
            .filter((kv) => kv.key.endsWith(`/${name}`))
            .map((kv) => ({
              node: kv.key.slice(c.k.statuses.length).split('/')[0],
              ...(JSON.parse(kv.value) as AgentStatus),
            }));
          const versions = (await history(c, name)).length;
          if (opts.json) printJson({ spec, record: rec ?? null, observed, versions });
          else {
            const v = spec.vm as NonNullable<ResourceSpec['vm']>;
            const w = (s: string) => process.stdout.write(s + '\n');
            w(`vm ${name}`);
            w(`  state     ${rec?.state ?? 'stopped'} on ${rec?.node ?? '-'} (epoch ${rec?.epoch ?? 0})`);
            w(`  reason    ${rec?.reason ?? 'not yet seen by the manager'}`);
            w(
              `  hardware  ${v.cpus} cpu, ${v.memory} MiB, machine ${v.machine}, cpu ${v.cpuModel}, accel ${v.accel}`,
            );
            for (const d of v.disks)
              w(`  disk      ${d.path} (${d.format}, ${d.bus}${d.readOnly ? ', read-only' : ''})`);
            for (const n of v.nics)
              w(`  nic       ${n.type}${n.type === 'bridge' ? ` ${n.bridge}` : ''} ${n.mac}`);
            w(`  console   ${v.vnc ? 'vnc (corral vm console)' : 'none'}`);
            if (v.liveness)
              w(
                `  liveness  ${v.liveness.type} every ${v.liveness.intervalMs} ms, ${v.liveness.failures} failures`,
              );
            w(
              `  desired   ${spec.desired}, priority ${spec.priority}${spec.preferredNode ? `, prefers ${spec.preferredNode}` : ''}`,
            );
            w(`  versions  ${versions} (corral vm history ${name})`);
            if (rec?.migration)
              w(`  migration ${rec.migration.source} -> ${rec.migration.target} (${rec.migration.phase})`);
            for (const o of observed) w(`  agent@${o.node}: ${o.state} at epoch ${o.epoch} (${o.reason})`);
          }
          return 0;
        }),
      ),
    );

  const setDesired = (desired: 'started' | 'stopped', verb: string) =>
    action((name: string, opts: GlobalOpts) =>
      withCluster(opts, async (c) => {
        // a start or a shutdown ends an earlier destroy's kill-at-once
        await updateVm(c, name, (s) => ({ ...s, desired, killOnStop: undefined }));
        await operatorEvent(c, name, verb, `VM ${name}: ${verb} requested`);
        process.stdout.write(`${name}: ${verb} requested (desired ${desired})\n`);
        return 0;
      }),
    );
  cmd('start', 'run a VM (the manager places it)').argument('<name>').action(setDesired('started', 'start'));
  cmd('shutdown', 'ACPI power-down; killed after its shutdownTimeoutMs')
    .argument('<name>')
    .action(setDesired('stopped', 'shutdown'));
  cmd('stop', 'same as shutdown').argument('<name>').action(setDesired('stopped', 'stop'));
  cmd('destroy', 'stop a VM by killing its QEMU at once (no ACPI power-down, no shutdownTimeoutMs)')
    .argument('<name>')
    .action(
      action((name: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          await updateVm(c, name, (s) => ({ ...s, desired: 'stopped', killOnStop: true }));
          await operatorEvent(c, name, 'destroy', `VM ${name}: destroy requested`);
          process.stdout.write(`${name}: destroy requested\n`);
          return 0;
        }),
      ),
    );

  cmd('migrate', 'live-migrate a VM to a node (it becomes its preferred node) and follow the transfer')
    .argument('<name>')
    .argument('<node>')
    .option('--no-wait', 'return once the request is recorded')
    .option('--timeout-ms <ms>', 'give up waiting after this long', String(MIGRATE_WAIT_MS_DEFAULT))
    .action(
      action((name: string, node: string, opts: GlobalOpts & { wait: boolean; timeoutMs: string }) =>
        withCluster(opts, async (c) => {
          if (!c.config.nodes.some((n) => n.name === node))
            throw new UsageError(
              `node "${node}" is not in the cluster`,
              `known nodes: ${c.config.nodes.map((n) => n.name).join(', ')}`,
            );
          const timeoutMs = z.coerce.number().int().positive().safeParse(opts.timeoutMs);
          if (!timeoutMs.success)
            throw new UsageError(`--timeout-ms ${opts.timeoutMs}: expected a positive integer`);
          const rec0 = await record(c, name);
          await updateVm(c, name, (s) => ({ ...s, preferredNode: node }));
          if (rec0?.node === node && rec0.state === 'started') {
            process.stdout.write(`${name}: already on ${node}\n`);
            return 0;
          }
          await operatorEvent(c, name, 'migrate', `VM ${name}: live migration to ${node} requested`);
          if (!opts.wait) {
            process.stdout.write(`${name}: migration to ${node} requested\n`);
            return 0;
          }
          const r = await followMigration(c, name, node, rec0?.epoch ?? 0, timeoutMs.data);
          return r.ok ? 0 : 1;
        }),
      ),
    );

  addClientOptions(
    cmd(
      'console',
      "a VM's console: through the API a one-time ticket (--listen: a local port for a VNC viewer), else its node and VNC socket",
    )
      .argument('<name>')
      .option('--state-root <dir>', 'state root of the agents (default: local.json or /var/lib/corral)')
      .option(
        '--listen <host:port>',
        'serve a local port for a VNC viewer (each connection gets a new ticket)',
      )
      .option('--once', 'with --listen: stop after the first viewer disconnects')
      .option('--json', 'machine-readable output'),
  ).action(
    action(async (name: string, opts: GlobalOpts & ClientOpts & ConsoleCliOpts & { stateRoot?: string }) => {
      checkName(name);
      const api = await openApiClient(opts);
      if (api) return vmConsoleViaApi(api, name, opts);
      if (opts.listen)
        throw new UsageError(
          '--listen needs the Corral API',
          'pass --url and --token (or set CORRAL_URL/CORRAL_TOKEN), with `corral api` or an agent run with --api',
        );
      return withCluster(opts, async (c) => {
        const { spec } = await getVm(c, name);
        if (!spec.vm?.vnc)
          throw new CorralError('CORRAL_NO_CONSOLE', `VM ${name} has no VNC console`, 'set `vnc: true`');
        const rec = await record(c, name);
        if (!rec?.node || !rec.run)
          throw new CorralError('CORRAL_NOT_RUNNING', `VM ${name} is not running`, `corral vm start ${name}`);
        const socket = vmPaths(
          nodeStateDir(localInfo(c.configPath, opts.stateRoot).stateRoot, rec.node),
          name,
        ).vncSocket;
        if (opts.json) printJson({ name, node: rec.node, vncSocket: socket });
        else process.stdout.write(`${name}: VNC on node ${rec.node}, Unix socket ${socket}\n`);
        return 0;
      });
    }),
  );
}

/** Follow a live migration in the store until the target owns the VM, it fails, or time runs out. */
async function followMigration(
  c: ClusterContext,
  name: string,
  target: string,
  epoch0: number,
  timeoutMs: number,
): Promise<{ ok: boolean }> {
  const t0 = performance.now();
  const tty = process.stdout.isTTY === true;
  let lastLine = '';
  let lastProgress: MigrationProgress | undefined;
  let sawMigration = false;
  // a change of the VM's record or of an agent's report wakes the loop at once (the hand-over is
  // seen within a store hop, not up to FOLLOW_POLL_MS later); the poll stays as the fallback
  let wake: (() => void) | undefined;
  let changed = false;
  const watcher = await c.store
    .watch(c.k.prefix, {
      onEvents: (evs) => {
        if (evs.some((e) => e.kv.key === c.k.assign(name) || e.kv.key.endsWith(`/${name}`))) {
          changed = true;
          wake?.();
        }
      },
      onError: () => undefined,
    })
    .catch(() => undefined);
  try {
    return await followLoop();
  } finally {
    await watcher?.cancel().catch(() => undefined);
  }

  async function followLoop(): Promise<{ ok: boolean }> {
    while (performance.now() - t0 < timeoutMs) {
      const rec = await record(c, name);
      if (rec?.migration) {
        sawMigration = true;
        const s = await statusOf(c, rec.migration.source, name);
        if (s?.progress) lastProgress = s.progress;
        const line = `${name}: ${rec.migration.source} -> ${rec.migration.target} ${rec.migration.phase}: ${describeProgress(lastProgress)}`;
        if (line !== lastLine) process.stdout.write(tty ? `\r\x1b[K${line}` : `${line}\n`);
        lastLine = line;
        if (rec.migration.phase === 'abort') {
          process.stdout.write(`${tty ? '\n' : ''}${name}: migration aborted: ${rec.migration.reason}\n`);
          return { ok: false };
        }
      } else if (rec && rec.node === target && rec.epoch > epoch0 && rec.state === 'started') {
        const ms = Math.round(performance.now() - t0);
        process.stdout.write(
          `${tty && lastLine ? '\n' : ''}${name}: now on ${target} (epoch ${rec.epoch}, ${ms} ms; ${rec.reason})\n`,
        );
        return { ok: true };
      } else if (sawMigration && rec && !rec.migration && rec.node !== target) {
        process.stdout.write(`${tty ? '\n' : ''}${name}: migration did not complete: ${rec.reason}\n`);
        return { ok: false };
      }
      // a change seen while this round read the store: read again at once
      if (!changed)
        await new Promise<void>((r) => {
          const t = setTimeout(r, FOLLOW_POLL_MS);
          wake = () => {
            clearTimeout(t);
            r();
          };
        });
      wake = undefined;
      changed = false;
    }
    const rec = await record(c, name);
    process.stdout.write(
      `\n${name}: still not on ${target} after ${timeoutMs} ms: ${rec?.reason ?? 'no record'}\n`,
    );
    return { ok: false };
  }
}

/**
 * `corral node drain NODE`: maintenance on (the manager live-migrates VMs away, a limited
 * number at a time, and stops other resources to start them elsewhere), then wait with a
 * progress display until nothing runs on the node.
 */
export async function drainNode(
  c: ClusterContext,
  node: string,
  opts: { wait: boolean; timeoutMs: number },
): Promise<number> {
  const admin: NodeAdmin = { maintenance: true };
  await c.store.put(c.k.nodeAdmin(node), JSON.stringify(admin));
  await operatorEvent(c, node, 'drain', `${node}: drain (maintenance on, resources move away)`);
  if (!opts.wait) {
    process.stdout.write(`${node}: draining (maintenance on)\n`);
    return 0;
  }
  const t0 = performance.now();
  const tty = process.stdout.isTTY === true;
  const onNode = async () => {
    const r = await c.store.range(c.k.assigns);
    return r.kvs
      .map((kv) => JSON.parse(kv.value) as ResourceRecord)
      .filter(
        (rec) =>
          rec.node === node &&
          (rec.run || rec.migration) &&
          rec.state !== 'stopped' &&
          rec.state !== 'failed',
      );
  };
  const initial = (await onNode()).length;
  let lastLine = '';
  while (performance.now() - t0 < opts.timeoutMs) {
    const left = await onNode();
    if (left.length === 0) {
      const ms = Math.round(performance.now() - t0);
      process.stdout.write(
        `${tty && lastLine ? '\n' : ''}${node}: drained (${initial} moved in ${ms} ms); in maintenance\n`,
      );
      return 0;
    }
    const moving = left.filter((r) => r.migration);
    const parts = await Promise.all(
      moving.map(async (r) => {
        const s = await statusOf(c, node, r.id);
        return `${r.id} ${describeProgress(s?.progress)}`;
      }),
    );
    const done = initial - left.length;
    const bar =
      initial > 0 ? '#'.repeat(Math.round((20 * done) / initial)).padEnd(20, '.') : ''.padEnd(20, '.');
    const waiting = left.filter((r) => !r.migration).map((r) => `${r.id}: ${r.reason}`);
    const line = `${node} [${bar}] ${done}/${initial} moved, ${moving.length} migrating${parts.length ? `: ${parts.join('; ')}` : ''}`;
    if (line !== lastLine) process.stdout.write(tty ? `\r\x1b[K${line}` : `${line}\n`);
    lastLine = line;
    if (!tty && waiting.length > 0 && moving.length === 0)
      process.stdout.write(`  waiting: ${waiting.join('; ')}\n`);
    await new Promise((r) => setTimeout(r, FOLLOW_POLL_MS));
  }
  const left = await onNode();
  process.stdout.write(
    `\n${node}: ${left.length} resource(s) still on the node after ${opts.timeoutMs} ms: ${left.map((r) => `${r.id} (${r.reason})`).join('; ')}\n`,
  );
  return 1;
}

export async function undrainNode(c: ClusterContext, node: string): Promise<number> {
  const admin: NodeAdmin = { maintenance: false };
  await c.store.put(c.k.nodeAdmin(node), JSON.stringify(admin));
  await operatorEvent(c, node, 'undrain', `${node}: undrain (maintenance off)`);
  process.stdout.write(`${node}: back in service (maintenance off)\n`);
  return 0;
}
