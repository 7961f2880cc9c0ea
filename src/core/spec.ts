// Resource definitions: the desired state users write (YAML, CLI, API). Zod at the edge;
// the core sees only the parsed types. Durations are integers in ms, sizes in MiB.
import { z } from 'zod';
import { VmSpec } from './vm-spec.js';

export const resourceIdPattern = /^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$/;
export const ResourceId = z
  .string()
  .regex(resourceIdPattern, 'expected a resource id: lowercase letters, digits, ".", "_" or "-", 1-64 chars');

export const HealthCheck = z.discriminatedUnion('type', [
  z.strictObject({
    type: z.literal('exec'),
    command: z.array(z.string().min(1)).min(1),
    intervalMs: z.number().int().min(100).default(1000),
    timeoutMs: z.number().int().min(50).default(1000),
    failures: z.number().int().min(1).default(3),
  }),
  z.strictObject({
    type: z.literal('tcp'),
    host: z.string().min(1).default('127.0.0.1'),
    port: z.number().int().min(1).max(65535),
    intervalMs: z.number().int().min(100).default(1000),
    timeoutMs: z.number().int().min(50).default(1000),
    failures: z.number().int().min(1).default(3),
  }),
  z.strictObject({
    type: z.literal('http'),
    url: z.string().url(),
    expectStatus: z.number().int().min(100).max(599).default(200),
    intervalMs: z.number().int().min(100).default(1000),
    timeoutMs: z.number().int().min(50).default(1000),
    failures: z.number().int().min(1).default(3),
  }),
]);
export type HealthCheck = z.infer<typeof HealthCheck>;

export const ProcessSpec = z.strictObject({
  /** argv; run directly, never through a shell unless `shell: true` (then command must have one element) */
  command: z.array(z.string().min(1)).min(1),
  shell: z.boolean().default(false),
  env: z.record(z.string(), z.string()).default({}),
  cwd: z.string().optional(),
  user: z.string().optional(),
  /** log file; default <stateDir>/logs/<id>.log */
  log: z.string().optional(),
  stopSignal: z.enum(['SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGUSR1', 'SIGUSR2']).default('SIGTERM'),
  stopTimeoutMs: z.number().int().min(0).default(5000),
  /** how long after spawn the first health check must pass (or the process must still live) */
  startTimeoutMs: z.number().int().min(0).default(10000),
});
export type ProcessSpec = z.infer<typeof ProcessSpec>;

export const RestartPolicy = z.strictObject({
  /** restarts in place within windowMs before relocating (Pacemaker: migration-threshold) */
  maxRestarts: z.number().int().min(0).default(3),
  windowMs: z.number().int().min(1000).default(60000),
  /** relocations after in-place restarts are exhausted, before the resource is failed */
  maxRelocations: z.number().int().min(0).default(1),
});
export type RestartPolicy = z.infer<typeof RestartPolicy>;

export const ResourceSpec = z
  .strictObject({
    id: ResourceId,
    /** process: a supervised command; vm: a QEMU virtual machine (live-migratable) */
    kind: z.enum(['process', 'vm']).default('process'),
    process: ProcessSpec.optional(),
    vm: VmSpec.optional(),
    health: HealthCheck.optional(),
    cpus: z.number().positive().default(1),
    /** memory the resource reserves on its node, MiB */
    memory: z.number().int().positive().default(128),
    /** higher is placed first when capacity is short */
    priority: z.number().int().min(-1000).max(1000).default(0),
    /** node labels the resource requires */
    nodeSelector: z.record(z.string(), z.string()).default({}),
    /** run on the same node as these resources */
    affinity: z.array(ResourceId).default([]),
    /** never on the same node as these resources */
    antiAffinity: z.array(ResourceId).default([]),
    restart: RestartPolicy.default({ maxRestarts: 3, windowMs: 60000, maxRelocations: 1 }),
    /** preferred node (set by `corral resource move`); used when online and eligible */
    preferredNode: z.string().optional(),
    desired: z.enum(['started', 'stopped']).default('started'),
    /**
     * set by `corral vm destroy`: while desired is stopped, stop by killing at once (no grace,
     * no ACPI power-down); `corral vm start|shutdown|stop` clear it
     */
    killOnStop: z.boolean().optional(),
  })
  .superRefine((r, ctx) => {
    if (r.kind === 'process' && !r.process)
      ctx.addIssue({
        code: 'custom',
        path: ['process'],
        message: 'expected a `process:` section (kind is process)',
      });
    if (r.kind === 'vm' && !r.vm)
      ctx.addIssue({ code: 'custom', path: ['vm'], message: 'expected a `vm:` section (kind is vm)' });
    if (r.kind === 'process' && r.vm)
      ctx.addIssue({ code: 'custom', path: ['vm'], message: 'a `vm:` section needs `kind: vm`' });
    if (r.kind === 'vm' && r.process)
      ctx.addIssue({
        code: 'custom',
        path: ['process'],
        message: 'a `process:` section needs `kind: process`',
      });
  });
export type ResourceSpec = z.infer<typeof ResourceSpec>;

/**
 * How long a stop of this resource may take before the kill, from its current definition
 * (an edit applies to a copy already running): 0 after `corral vm destroy`.
 */
export function stopGraceMs(spec: ResourceSpec): number | undefined {
  if (spec.killOnStop === true && spec.desired === 'stopped') return 0;
  return spec.vm?.shutdownTimeoutMs ?? spec.process?.stopTimeoutMs;
}
export type ResourceSpecInput = z.input<typeof ResourceSpec>;
