// Virtual machine definitions (QEMU/KVM). Zod at the edge; see src/drivers/qemu*.ts.
import { z } from 'zod';

export const macPattern = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;

export const VmDisk = z.strictObject({
  /** file on shared storage, block device or LVM volume (absolute path) */
  path: z.string().regex(/^\/[^\0]*$/, 'expected an absolute path'),
  format: z.enum(['raw', 'qcow2']).default('raw'),
  readOnly: z.boolean().default(false),
});

export const VmNic = z.discriminatedUnion('type', [
  z.strictObject({
    type: z.literal('user'),
    mac: z.string().toLowerCase().regex(macPattern, 'expected a MAC like 52:54:00:12:34:56'),
  }),
  z.strictObject({
    type: z.literal('bridge'),
    bridge: z.string().min(1).max(15),
    mac: z.string().toLowerCase().regex(macPattern, 'expected a MAC like 52:54:00:12:34:56'),
  }),
]);

export const VmSpec = z.strictObject({
  /** guest memory, MiB (the resource's `memory` reservation defaults to it) */
  memory: z
    .number()
    .int()
    .min(16)
    .max(1024 * 1024),
  cpus: z.number().int().min(1).max(256).default(1),
  disks: z.array(VmDisk).default([]),
  nics: z.array(VmNic).default([]),
  vnc: z.boolean().default(true),
  /** extra QEMU arguments are not accepted: everything QEMU runs comes from these fields */
  machine: z
    .string()
    .regex(/^[a-z0-9.-]+$/)
    .default('pc'),
});
export type VmSpec = z.infer<typeof VmSpec>;
