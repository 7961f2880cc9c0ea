// `corral check` (cxm's check and check-cpu): consistency of VMs across the cluster.
// - orphans: QEMU processes on this host unknown to the store (or not assigned here);
// - VMs defined twice: one MAC or one read-write disk in two VMs; a VM reported running on two nodes;
// - bridges a VM needs missing on a node it may run on; disks missing on this host;
// - CPU models/flags that differ between nodes (live migration with cpuModel host fails);
// - definitions that diverge from their latest stored history version.
// Exit 0 when nothing is wrong, 1 when an error is found (warnings alone exit 0); --json for monitoring.
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { basename, sep } from 'node:path';
import type { Command } from 'commander';
import { parse as parseYamlText } from 'yaml';
import { action } from '../program.js';
import { addConfigOption, withCluster, type ClusterContext, type GlobalOpts } from '../context.js';
import { printJson, table } from '../table.js';
import { localInfo } from '../local.js';
import { ResourceSpec } from '../../core/spec.js';
import { VmDefinition, vmResourceInput } from '../../core/vm-spec.js';
import type { AgentStatus, NodeRegistration, ResourceRecord } from '../../core/types.js';
import { signalPid } from '../../drivers/proc.js';

export interface CheckProblem {
  severity: 'error' | 'warning';
  check: 'orphan' | 'defined-twice' | 'running-twice' | 'bridge' | 'disk' | 'cpu' | 'history';
  object: string;
  message: string;
}

/** flags quoted per node pair in a CPU mismatch message */
const CPU_FLAGS_SHOWN_MAX = 8;

interface QemuProc {
  pid: number;
  id: string | undefined;
  /** node whose state dir holds its QMP socket, when under the state root */
  node: string | undefined;
}

/** QEMU processes on this host, with the VM id from `-name guest=ID` and the node from their socket path */
export function scanQemu(stateRoot: string): QemuProc[] {
  const out: QemuProc[] = [];
  let names: string[];
  try {
    names = readdirSync('/proc').filter((n) => /^\d+$/.test(n));
  } catch {
    return out;
  }
  for (const n of names) {
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${n}/cmdline`, 'utf8').split('\0');
    } catch {
      continue;
    }
    if (!basename(argv[0] ?? '').startsWith('qemu-system')) continue;
    const nameArg = argv[argv.indexOf('-name') + 1] ?? '';
    const id =
      /(?:^|,)guest=([^,]+)/.exec(nameArg)?.[1] ?? (nameArg && !nameArg.includes('=') ? nameArg : undefined);
    const qmp = argv.find((a) => a.startsWith('unix:') && a.includes(`${sep}vm${sep}`)) ?? '';
    const prefix = `unix:${stateRoot}${sep}`;
    const node = qmp.startsWith(prefix) ? qmp.slice(prefix.length).split(sep)[0] : undefined;
    out.push({ pid: Number(n), id, node });
  }
  return out;
}

export async function runChecks(c: ClusterContext, stateRoot: string): Promise<CheckProblem[]> {
  const problems: CheckProblem[] = [];
  const add = (p: CheckProblem) => problems.push(p);
  const specs = (await c.store.range(c.k.resources)).kvs
    .map((kv) => ResourceSpec.safeParse(JSON.parse(kv.value)))
    .flatMap((r) => (r.success ? [r.data] : []));
  const vms = specs.filter((s) => s.kind === 'vm');
  const recs = new Map(
    (await c.store.range(c.k.assigns)).kvs.map((kv) => {
      const r = JSON.parse(kv.value) as ResourceRecord;
      return [r.id, r] as const;
    }),
  );
  const regs = (await c.store.range(c.k.nodes)).kvs.map((kv) => JSON.parse(kv.value) as NodeRegistration);
  const statuses = (await c.store.range(c.k.statuses)).kvs.map((kv) => ({
    node: kv.key.slice(c.k.statuses.length).split('/')[0] as string,
    id: kv.key.slice(c.k.statuses.length).split('/').slice(1).join('/'),
    s: JSON.parse(kv.value) as AgentStatus,
  }));

  // orphans: QEMU on this host the store does not place here
  for (const q of scanQemu(stateRoot)) {
    const rec = q.id ? recs.get(q.id) : undefined;
    const migratingHere =
      rec?.migration && (rec.migration.target === q.node || rec.migration.source === q.node);
    if (q.node === undefined) {
      // not started by an agent of this state root: reported, never touched
      if (!q.id || !vms.some((v) => v.id === q.id))
        add({
          severity: 'warning',
          check: 'orphan',
          object: `pid ${q.pid}`,
          message: `QEMU ${q.pid} (${q.id ?? 'no -name'}) runs on this host outside ${stateRoot}: not Corral's, left alone`,
        });
      continue;
    }
    if (!q.id || !vms.some((v) => v.id === q.id))
      add({
        severity: 'error',
        check: 'orphan',
        object: `pid ${q.pid}`,
        message: `QEMU ${q.pid} (${q.id ?? 'no -name'}) of node ${q.node} runs but no such VM is defined`,
      });
    else if (rec && rec.node !== q.node && !migratingHere)
      add({
        severity: 'error',
        check: 'orphan',
        object: q.id,
        message: `QEMU ${q.pid} runs ${q.id} for node ${q.node}, but the store assigns it to ${rec.node ?? 'no node'}`,
      });
    else if (rec && !rec.run && !migratingHere)
      add({
        severity: 'error',
        check: 'orphan',
        object: q.id,
        message: `QEMU ${q.pid} runs ${q.id} on ${q.node}, which the store has stopped`,
      });
  }

  // defined twice: MACs and read-write disks shared by two VMs
  const macs = new Map<string, string>();
  const disks = new Map<string, string>();
  for (const v of vms) {
    for (const n of v.vm?.nics ?? []) {
      const other = macs.get(n.mac);
      if (other)
        add({
          severity: 'error',
          check: 'defined-twice',
          object: v.id,
          message: `MAC ${n.mac} is used by ${other} and ${v.id}`,
        });
      else macs.set(n.mac, v.id);
    }
    for (const d of v.vm?.disks ?? []) {
      const other = disks.get(d.path);
      if (other && !d.readOnly)
        add({
          severity: 'error',
          check: 'defined-twice',
          object: v.id,
          message: `disk ${d.path} is written by ${other} and ${v.id}: the same machine defined twice?`,
        });
      if (!d.readOnly) disks.set(d.path, v.id);
      if (!existsSync(d.path))
        add({
          severity: 'error',
          check: 'disk',
          object: v.id,
          message: `disk ${d.path} of ${v.id} is missing on this host`,
        });
    }
  }
  // running twice: two nodes report a live copy (outside a migration hand-over)
  for (const v of vms) {
    const live = statuses.filter(
      (x) => x.id === v.id && (x.s.state === 'started' || x.s.state === 'migrating'),
    );
    if (live.length > 1 && !recs.get(v.id)?.migration)
      add({
        severity: 'error',
        check: 'running-twice',
        object: v.id,
        message: `${v.id} reported running on ${live.map((x) => x.node).join(' and ')}`,
      });
  }

  // bridges: every node a VM may run on must have its bridges
  for (const v of vms) {
    for (const n of v.vm?.nics ?? []) {
      if (n.type !== 'bridge') continue;
      for (const r of regs) {
        const selectorOk = Object.entries(v.nodeSelector).every(([k, val]) => r.labels[k] === val);
        if (selectorOk && r.host && !r.host.bridges.includes(n.bridge))
          add({
            severity: 'error',
            check: 'bridge',
            object: v.id,
            message: `bridge ${n.bridge} of ${v.id} is missing on node ${r.name}`,
          });
      }
    }
  }

  // CPU: models and flags must match for live migration of guests that see the host CPU
  const withHost = regs.filter((r) => r.host);
  const hostModelVms = vms.filter((v) => v.vm?.cpuModel === 'host' || v.vm?.cpuModel === 'max');
  for (let i = 0; i < withHost.length; i++)
    for (let j = i + 1; j < withHost.length; j++) {
      const a = withHost[i] as NodeRegistration & { host: NonNullable<NodeRegistration['host']> };
      const b = withHost[j] as NodeRegistration & { host: NonNullable<NodeRegistration['host']> };
      const fa = new Set(a.host.cpuFlags);
      const fb = new Set(b.host.cpuFlags);
      const onlyA = [...fa].filter((f) => !fb.has(f));
      const onlyB = [...fb].filter((f) => !fa.has(f));
      if (onlyA.length === 0 && onlyB.length === 0 && a.host.cpuModel === b.host.cpuModel) continue;
      const show = (l: string[]) =>
        l.slice(0, CPU_FLAGS_SHOWN_MAX).join(' ') + (l.length > CPU_FLAGS_SHOWN_MAX ? ' …' : '');
      add({
        severity: hostModelVms.length > 0 ? 'error' : 'warning',
        check: 'cpu',
        object: `${a.name}/${b.name}`,
        message:
          `CPU differs: ${a.name} "${a.host.cpuModel}" vs ${b.name} "${b.host.cpuModel}"` +
          (onlyA.length ? `; only ${a.name}: ${show(onlyA)}` : '') +
          (onlyB.length ? `; only ${b.name}: ${show(onlyB)}` : '') +
          (hostModelVms.length > 0
            ? `; live migration of ${hostModelVms.map((v) => v.id).join(', ')} (cpuModel host) between them may fail`
            : '; VMs use a named CPU model, so migration stays possible'),
      });
    }
  for (const r of regs)
    if (r.host && r.host.qemu === null)
      add({
        severity: 'warning',
        check: 'cpu',
        object: r.name,
        message: `QEMU is not installed on ${r.name}: it cannot run VMs`,
      });

  // history: the stored definition must match its latest version
  for (const v of vms) {
    const h = (await c.store.range(`${c.k.prefix}vmhistory/${v.id}/`)).kvs;
    const last = h.at(-1);
    if (!last) continue;
    const entry = JSON.parse(last.value) as { version: number; yaml: string };
    const def = VmDefinition.safeParse(parseYamlText(entry.yaml));
    if (!def.success) continue;
    const stored = ResourceSpec.safeParse(vmResourceInput(def.data));
    if (
      stored.success &&
      JSON.stringify(stored.data.vm) !==
        JSON.stringify({ ...v.vm, shutdownTimeoutMs: stored.data.vm?.shutdownTimeoutMs })
    )
      add({
        severity: 'warning',
        check: 'history',
        object: v.id,
        message: `${v.id}: the running definition differs from history version ${entry.version} (changed outside \`corral vm define/edit\`)`,
      });
  }
  return problems;
}

export function registerCheck(program: Command): void {
  addConfigOption(
    program
      .command('check')
      .description(
        'consistency checks: orphan QEMUs, VMs defined twice, missing bridges/disks, CPU mismatches, history',
      )
      .option('--json', 'machine-readable output')
      .option(
        '--state-root <dir>',
        'state root of the agents on this host (default: local.json or /var/lib/corral)',
      )
      .option('--stop-orphans', 'kill orphan QEMU processes found on this host (reported first)'),
  ).action(
    action((opts: GlobalOpts & { stateRoot?: string; stopOrphans?: boolean }) =>
      withCluster(opts, async (c) => {
        const stateRoot = localInfo(c.configPath, opts.stateRoot).stateRoot;
        const problems = await runChecks(c, stateRoot);
        const errors = problems.filter((p) => p.severity === 'error');
        if (opts.json) printJson({ ok: errors.length === 0, problems });
        else if (problems.length === 0) process.stdout.write('check: no problems found\n');
        else
          process.stdout.write(
            table(
              ['SEVERITY', 'CHECK', 'OBJECT', 'PROBLEM'],
              problems.map((p) => [p.severity, p.check, p.object, p.message]),
            ) + '\n',
          );
        if (opts.stopOrphans)
          for (const q of scanQemu(stateRoot)) {
            const orphan = problems.some(
              (p) =>
                p.severity === 'error' &&
                p.check === 'orphan' &&
                (p.object === `pid ${q.pid}` || p.message.startsWith(`QEMU ${q.pid} `)),
            );
            if (orphan && signalPid(q.pid, 'SIGKILL')) process.stdout.write(`killed orphan QEMU ${q.pid}\n`);
          }
        return errors.length === 0 ? 0 : 1;
      }),
    ),
  );
}
