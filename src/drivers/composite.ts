// One Driver for the agent that routes by resource kind: `vm` to the qemu driver, everything
// else to the process driver. Both share the node's run/ pidfiles (so the watchdog and the
// local fence device kill VMs too); the process driver would also adopt a VM's pidfile after
// an agent restart, so what it reports about ids the qemu driver owns is filtered out here.
import type { ResourceSpec } from '../core/spec.js';
import type { MigrationProgress } from '../core/types.js';
import type { Driver, DriverEvent, LocalResource, MigrateOutcome, StopOptions } from '../env/types.js';
import { readPidfile, pidfileSpec } from './pidfile.js';

export interface CompositeDriverOptions {
  process: Driver;
  vm: Driver & { owns(id: string): boolean };
  stateDir: string;
}

export class CompositeDriver implements Driver {
  private readonly vmIds = new Set<string>();

  constructor(private readonly o: CompositeDriverOptions) {}

  private isVm(id: string): boolean {
    if (this.vmIds.has(id) || this.o.vm.owns(id)) return true;
    const pf = readPidfile(this.o.stateDir, id);
    return pf !== null && pidfileSpec(pf)?.kind === 'vm';
  }

  private of(id: string): Driver {
    return this.isVm(id) ? this.o.vm : this.o.process;
  }

  async recover(): Promise<LocalResource[]> {
    // VMs first: the qemu driver claims their pidfiles
    const vms = await this.o.vm.recover();
    for (const v of vms) this.vmIds.add(v.id);
    const procs = await this.o.process.recover();
    return [...vms, ...procs.filter((p) => !this.isVm(p.id))];
  }

  start(spec: ResourceSpec, epoch: number): Promise<LocalResource> {
    if (spec.kind === 'vm') {
      this.vmIds.add(spec.id);
      return this.o.vm.start(spec, epoch);
    }
    this.vmIds.delete(spec.id);
    return this.o.process.start(spec, epoch);
  }

  stop(id: string, opts?: StopOptions): Promise<LocalResource> {
    return this.of(id).stop(id, opts);
  }

  async killAll(): Promise<void> {
    await Promise.all([this.o.vm.killAll(), this.o.process.killAll()]);
  }

  list(): LocalResource[] {
    const vms = this.o.vm.list();
    const ids = new Set(vms.map((v) => v.id));
    return [...vms, ...this.o.process.list().filter((p) => !ids.has(p.id) && !this.vmIds.has(p.id))];
  }

  supportsMigration(spec: ResourceSpec): boolean {
    return spec.kind === 'vm' && (this.o.vm.supportsMigration?.(spec) ?? false);
  }

  prepareIncoming(
    spec: ResourceSpec,
    epoch: number,
  ): Promise<{ ok: true; host: string; port: number } | { ok: false; reason: string }> {
    const d = spec.kind === 'vm' ? this.o.vm : this.o.process;
    if (spec.kind === 'vm') this.vmIds.add(spec.id);
    if (!d.prepareIncoming)
      return Promise.resolve({ ok: false, reason: `kind ${spec.kind} cannot migrate live` });
    return d.prepareIncoming(spec, epoch);
  }

  migrateOut(
    id: string,
    target: { host: string; port: number },
    onProgress: (p: MigrationProgress) => void,
  ): Promise<MigrateOutcome> {
    const d = this.of(id);
    if (!d.migrateOut) return Promise.resolve({ ok: false, reason: `${id} cannot migrate live` });
    return d.migrateOut(id, target, onProgress);
  }

  async cancelMigration(id: string): Promise<void> {
    await this.of(id).cancelMigration?.(id);
  }

  onEvent(handler: (ev: DriverEvent) => void): void {
    this.o.vm.onEvent(handler);
    // the process driver may watch a VM's pidfile it adopted: the qemu driver speaks for VMs
    this.o.process.onEvent((ev) => {
      if (!this.isVm(ev.id)) handler(ev);
    });
  }

  async close(): Promise<void> {
    await Promise.all([this.o.vm.close(), this.o.process.close()]);
  }
}
