// Virtual machine definitions (QEMU/KVM). Zod at the edge; see src/drivers/qemu*.ts.
// Everything QEMU runs comes from these fields: no free-form QEMU arguments.
import { z } from 'zod';

export const macPattern = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
/** a VM name: an FQDN of lowercase labels, at most this long (it is also the resource id) */
export const VM_NAME_CHARS_MAX = 64;
const fqdnLabel = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** why `name` is not a valid VM name (FQDN, no path parts), or null when it is */
export function vmNameProblem(name: string): string | null {
  if (name.length === 0 || name.length > VM_NAME_CHARS_MAX)
    return `expected 1-${VM_NAME_CHARS_MAX} characters, got ${name.length}`;
  if (name.includes('/') || name.includes('\\') || name.includes('\0'))
    return 'a VM name may not contain path separators';
  const labels = name.split('.');
  for (const l of labels)
    if (!fqdnLabel.test(l))
      return `label "${l}" is not a DNS label (lowercase letters, digits and "-", not at either end, 1-63 chars)`;
  return null;
}

export const VmName = z.string().superRefine((s, ctx) => {
  const p = vmNameProblem(s);
  if (p) ctx.addIssue({ code: 'custom', message: `invalid VM name "${s}": ${p}` });
});

const Mac = z.string().toLowerCase().regex(macPattern, 'expected a MAC like 52:54:00:12:34:56');
const ms = (def: number, min = 0) => z.number().int().min(min).default(def);

export const VmDisk = z
  .strictObject({
    /** file on shared storage, block device or LVM volume (absolute path, no `..`) */
    path: z
      .string()
      .regex(/^\/[^\0,]*$/, 'expected an absolute path without commas')
      .refine((p) => !p.split('/').includes('..'), 'a disk path may not contain ".."'),
    format: z.enum(['raw', 'qcow2']).default('raw'),
    readOnly: z.boolean().default(false),
    /** the bus the guest sees */
    bus: z.enum(['virtio', 'ide']).default('virtio'),
  })
  .refine((d) => !(d.readOnly && d.bus === 'ide'), {
    message: 'QEMU cannot attach a read-only disk on the ide bus: use bus virtio',
    path: ['readOnly'],
  });
export type VmDisk = z.infer<typeof VmDisk>;

export const VmNic = z.discriminatedUnion('type', [
  z.strictObject({ type: z.literal('user'), mac: Mac }),
  z.strictObject({
    type: z.literal('bridge'),
    bridge: z
      .string()
      .min(1)
      .max(15)
      .regex(/^[A-Za-z0-9_.-]+$/, 'expected a Linux interface name'),
    mac: Mac,
  }),
]);
export type VmNic = z.infer<typeof VmNic>;

/** Guest liveness: the VM counts as failed after `failures` consecutive failed checks. */
export const GuestCheck = z.discriminatedUnion('type', [
  z.strictObject({
    type: z.literal('ping'),
    /** the guest's address (fping, else ping, else a TCP connect to `port`: refused still means up) */
    address: z.string().min(1).max(253),
    port: z.number().int().min(1).max(65535).default(22),
    intervalMs: ms(5000, 100),
    timeoutMs: ms(1000, 50),
    failures: z.number().int().min(1).max(100).default(3),
    /** no check before the guest had this long to boot */
    startGraceMs: ms(60000),
  }),
  z.strictObject({
    /** the QEMU guest agent (qemu-ga) answers guest-sync on its virtio-serial channel */
    type: z.literal('guest-agent'),
    intervalMs: ms(5000, 100),
    timeoutMs: ms(1000, 50),
    failures: z.number().int().min(1).max(100).default(3),
    startGraceMs: ms(60000),
  }),
]);
export type GuestCheck = z.infer<typeof GuestCheck>;

export const VmSpec = z.strictObject({
  /** guest memory, MiB (the resource's `memory` reservation defaults to it) */
  memory: z
    .number()
    .int()
    .min(16)
    .max(1024 * 1024),
  cpus: z.number().int().min(1).max(256).default(1),
  disks: z.array(VmDisk).max(16).default([]),
  nics: z.array(VmNic).max(16).default([]),
  vnc: z.boolean().default(true),
  machine: z
    .string()
    .regex(/^[a-z0-9.-]+$/)
    .default('pc'),
  /** guest CPU model: the same on every node keeps live migration possible */
  cpuModel: z
    .string()
    .regex(/^[A-Za-z0-9_.-]+$/)
    .default('qemu64'),
  /** kvm when /dev/kvm is usable (auto), else tcg (software emulation) */
  accel: z.enum(['auto', 'kvm', 'tcg']).default('auto'),
  /** a virtio-serial channel for the QEMU guest agent (qga.sock on the node) */
  guestAgent: z.boolean().default(false),
  /** stop: ACPI power-down, then this long for the guest to go, then kill */
  shutdownTimeoutMs: ms(30000),
  liveness: GuestCheck.optional(),
  /** live-migration bandwidth cap, MiB/s (fractions allowed; unset: the driver's 4096) */
  migrationBandwidthMiBps: z
    .number()
    .positive()
    .max(1024 * 1024)
    .optional(),
});
export type VmSpec = z.infer<typeof VmSpec>;

/**
 * A VM definition file (`corral vm define -f vm.yaml`): the VM's name (an FQDN, also its
 * resource id), its hardware, and its placement like any resource.
 */
export const VmDefinition = z.strictObject({
  name: VmName,
  cpus: z.number().int().min(1).max(256).default(1),
  memory: VmSpec.shape.memory,
  disks: VmSpec.shape.disks,
  nics: VmSpec.shape.nics,
  vnc: VmSpec.shape.vnc,
  machine: VmSpec.shape.machine,
  cpuModel: VmSpec.shape.cpuModel,
  accel: VmSpec.shape.accel,
  guestAgent: VmSpec.shape.guestAgent,
  shutdownTimeoutMs: VmSpec.shape.shutdownTimeoutMs,
  liveness: VmSpec.shape.liveness,
  migrationBandwidthMiBps: VmSpec.shape.migrationBandwidthMiBps,
  priority: z.number().int().min(-1000).max(1000).default(0),
  nodeSelector: z.record(z.string(), z.string()).default({}),
  affinity: z.array(z.string()).default([]),
  antiAffinity: z.array(z.string()).default([]),
  restart: z
    .strictObject({
      maxRestarts: z.number().int().min(0).default(3),
      windowMs: z.number().int().min(1000).default(60000),
      maxRelocations: z.number().int().min(0).default(1),
    })
    .optional(),
  preferredNode: z.string().optional(),
  desired: z.enum(['started', 'stopped']).default('started'),
});
export type VmDefinition = z.infer<typeof VmDefinition>;

/** QEMU's own memory beyond the guest's, reserved on the node (MiB) */
export const VM_MEMORY_OVERHEAD_MIB = 32;

/** The resource spec (input form) of a VM definition. */
export function vmResourceInput(d: VmDefinition): Record<string, unknown> {
  const { name, cpus, priority, nodeSelector, affinity, antiAffinity, restart, preferredNode, desired } = d;
  const vm = {
    memory: d.memory,
    cpus: d.cpus,
    disks: d.disks,
    nics: d.nics,
    vnc: d.vnc,
    machine: d.machine,
    cpuModel: d.cpuModel,
    accel: d.accel,
    guestAgent: d.guestAgent,
    shutdownTimeoutMs: d.shutdownTimeoutMs,
    ...(d.liveness ? { liveness: d.liveness } : {}),
    ...(d.migrationBandwidthMiBps !== undefined
      ? { migrationBandwidthMiBps: d.migrationBandwidthMiBps }
      : {}),
  };
  return {
    id: name,
    kind: 'vm',
    vm,
    cpus,
    memory: d.memory + VM_MEMORY_OVERHEAD_MIB,
    priority,
    nodeSelector,
    affinity,
    antiAffinity,
    ...(restart ? { restart } : {}),
    ...(preferredNode ? { preferredNode } : {}),
    desired,
  };
}
