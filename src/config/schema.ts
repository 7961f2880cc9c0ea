// cluster.yaml: the schema (zod; types are inferred from it), loading with precise errors, and
// secret references. Paths in the file (sqlite store, auth key file, TLS files) are resolved against
// the directory of the config file, so the normalised config holds absolute paths only.
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { dirname, isAbsolute, resolve } from 'node:path';
import { z } from 'zod';
import { CorralError } from '../core/errors.js';
import { formatStoreUrl, isHostname, parseHostPort, parseStoreUrl, type StoreUrl } from '../store/url.js';

export { formatStoreUrl, parseHostPort, parseStoreUrl, type HostPort, type StoreUrl } from '../store/url.js';
import { configVersionCurrent, migrateIfPossible, supportedVersions } from './migrate.js';
import { ConfigError, loadYamlWithSchema, showValue, type LoadResult } from './yaml.js';

/** Bounds (STYLE habit 6): anything outside them is a typo or a unit mistake, not a real cluster. */
export const configLimits = {
  nodesMax: 128,
  fenceDevicesPerNodeMax: 8,
  cpusMax: 4096,
  memoryMiBMax: 64 * 1024 * 1024, // 64 TiB
  timingMsMax: 24 * 60 * 60 * 1000, // one day
  authKeyBytesMin: 16,
} as const;

export const defaultStoreUrl = 'sqlite:./corral-store.db';

// ---- field helpers ----------------------------------------------------------------------------

function boundedInt(min: number, max: number, unit: string) {
  const kind =
    min === 1 ? 'a positive integer' : min === 0 ? 'a non-negative integer' : `an integer >= ${min}`;
  const error = `expected ${kind} (${unit})`;
  return z
    .number({ error })
    .int({ error })
    .min(min, { error })
    .max(max, { error: `expected ${kind} (${unit}) no greater than ${max}` });
}

const ms = (defaultMs: number) => boundedInt(1, configLimits.timingMsMax, 'ms').default(defaultMs);

const dnsLabelRe = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const dnsLabel = (what: string) => {
  const error = `expected a ${what}: lowercase letters, digits and dashes, 1-63 characters, no dash at either end`;
  return z.string({ error }).regex(dnsLabelRe, { error });
};

const address = z
  .string({ error: 'expected an IPv4/IPv6 address or a host name' })
  .refine((s) => isIP(s) !== 0 || isHostname(s), { error: 'expected an IPv4/IPv6 address or a host name' });

const ipAddress = z
  .string({ error: 'expected an IP address' })
  .refine((s) => isIP(s) !== 0, { error: 'expected an IP address' });

const port = z
  .number({ error: 'expected a port number (1-65535)' })
  .int({ error: 'expected a port number (1-65535)' })
  .min(1, { error: 'expected a port number (1-65535)' })
  .max(65535, { error: 'expected a port number (1-65535)' });

/** A file path in the config: non-empty, resolved against the config file's directory. */
const filePath = (baseDir: string) =>
  z
    .string({ error: 'expected a file path' })
    .min(1, { error: 'expected a file path' })
    .transform((p) => resolve(baseDir, p));

// ---- host:port and store URLs -----------------------------------------------------------------

const storeUrlShape = 'sqlite:PATH or etcd://host:port[,host:port...]';

const storeUrl = (baseDir: string) =>
  z.string({ error: `expected a store URL: ${storeUrlShape}` }).transform((s, ctx) => {
    const u = parseStoreUrl(s, baseDir);
    if (!('error' in u)) return formatStoreUrl(u);
    ctx.addIssue({ code: 'custom', message: `expected ${storeUrlShape}, got ${showValue(s)}: ${u.error}` });
    return z.NEVER;
  });

// ---- secrets ----------------------------------------------------------------------------------

export type SecretRef = { file: string } | { env: string };

export class SecretError extends CorralError {
  constructor(message: string, hint: string) {
    super('CORRAL_SECRET_UNAVAILABLE', message, hint);
  }
}

type SecretRead =
  { ok: true; value: string } | { ok: false; field: 'file' | 'env'; message: string; hint: string };

function readSecret(ref: SecretRef, env: NodeJS.ProcessEnv): SecretRead {
  let value: string;
  let from: string;
  const field = 'file' in ref ? 'file' : 'env';
  if ('file' in ref) {
    from = `auth key file ${ref.file}`;
    try {
      value = readFileSync(ref.file, 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : String(code);
      return {
        ok: false,
        field,
        message: `cannot read ${from}: ${why}`,
        hint: `create it, e.g. \`head -c 32 /dev/urandom | base64 > ${ref.file} && chmod 600 ${ref.file}\``,
      };
    }
  } else {
    from = `environment variable ${ref.env}`;
    value = env[ref.env] ?? '';
    if (!value)
      return {
        ok: false,
        field,
        message: `${from} is ${ref.env in env ? 'empty' : 'not set'}; it must hold the auth key (at least ${configLimits.authKeyBytesMin} bytes)`,
        hint: `export ${ref.env}=<a random key of at least ${configLimits.authKeyBytesMin} bytes> before running corral`,
      };
  }
  const bytes = Buffer.byteLength(value);
  if (bytes < configLimits.authKeyBytesMin)
    return {
      ok: false,
      field,
      message: `${from} holds ${bytes} bytes; expected at least ${configLimits.authKeyBytesMin}`,
      hint: 'use a longer random key, e.g. `head -c 32 /dev/urandom | base64`',
    };
  return { ok: true, value };
}

/** Reads the auth key a config refers to. Throws SecretError naming the file or variable. */
export function resolveSecret(ref: SecretRef, env: NodeJS.ProcessEnv = process.env): string {
  const r = readSecret(ref, env);
  if (!r.ok) throw new SecretError(r.message, r.hint);
  return r.value;
}

const secretRef = (ctx: SchemaContext) =>
  z
    .strictObject(
      {
        file: filePath(ctx.baseDir).optional(),
        env: z
          .string({ error: 'expected an environment variable name' })
          .regex(/^[A-Za-z_][A-Za-z0-9_]*$/, { error: 'expected an environment variable name' })
          .optional(),
      },
      // only for "not a mapping": unknown keys must reach the loader's "did you mean" handling
      {
        error: (iss) =>
          iss.code === 'invalid_type' ? 'expected `{ file: PATH }` or `{ env: VARNAME }`' : undefined,
      },
    )
    .transform((r, zc): SecretRef => {
      if (zc.issues.some((i) => i.code === 'unrecognized_keys')) return z.NEVER; // a typo: reported already
      if ((r.file === undefined) === (r.env === undefined)) {
        zc.addIssue({ code: 'custom', message: 'set exactly one of `file` or `env`' });
        return z.NEVER;
      }
      const ref = r.file !== undefined ? { file: r.file } : { env: r.env as string };
      if (ctx.checkSecrets) {
        const s = readSecret(ref, ctx.env);
        if (!s.ok) zc.addIssue({ code: 'custom', path: [s.field], message: s.message });
      }
      return ref;
    });

// ---- the cluster.yaml schema --------------------------------------------------------------------

export interface SchemaContext {
  /** Directory relative paths resolve against (the config file's directory). */
  baseDir: string;
  /** Environment for `authKey: { env }` (default process.env). */
  env: NodeJS.ProcessEnv;
  /** Check that the auth key can be read now (default true). */
  checkSecrets: boolean;
}

const fenceTimeoutMs = boundedInt(1, configLimits.timingMsMax, 'ms').default(10_000);

/** A program given as a relative path (`./fence.sh`, `bin/fence`) resolves against the config's directory. */
const resolveProgram = (baseDir: string, program: string) =>
  program.includes('/') && !isAbsolute(program) ? resolve(baseDir, program) : program;

const fenceDevice = (baseDir: string) =>
  z.discriminatedUnion('type', [
    z.strictObject({
      type: z.literal('command'),
      command: z
        .array(
          z
            .string({ error: 'expected a string argument' })
            .min(1, { error: 'expected a non-empty argument' }),
          {
            error: 'expected the command as a list of arguments, e.g. [/usr/local/sbin/fence-node, --force]',
          },
        )
        .min(1, { error: 'expected a non-empty list of arguments (argv)' })
        .transform(([program, ...args]) => [resolveProgram(baseDir, program as string), ...args]),
      timeoutMs: fenceTimeoutMs,
    }),
    z.strictObject({
      type: z.literal('fence-agent'),
      agent: z.string({ error: 'expected a fence agent name like fence_xvm' }).regex(/^fence_[a-z0-9_]+$/, {
        error: 'expected a fence agent name like fence_xvm (fence_[a-z0-9_]+)',
      }),
      params: z
        .record(
          z.string(),
          z.union([z.string(), z.number(), z.boolean()], { error: 'expected a string, number or boolean' }),
        )
        .default({}),
      timeoutMs: fenceTimeoutMs,
    }),
    z.strictObject({ type: z.literal('local') }),
    z.strictObject({
      type: z.literal('sbd'),
      device: filePath(baseDir),
      timeoutMs: fenceTimeoutMs,
      msgwaitMs: boundedInt(1, configLimits.timingMsMax, 'ms').default(4000),
    }),
  ]);

/** the node's slot on a shared heartbeat disk (src/health/diskhb.ts) */
const diskHeartbeat = (baseDir: string) =>
  z.strictObject({
    device: filePath(baseDir),
    slot: boundedInt(0, 254, 'slot number'),
    // 500 ms: with the sbd device's default msgwaitMs (4000) the disk vouches for 2000 ms,
    // more than two intervals, as the agent requires (at 1000 ms the vouch was off by default)
    intervalMs: boundedInt(50, configLimits.timingMsMax, 'ms').default(500),
  });

const nodeSchema = (baseDir: string) =>
  z.strictObject({
    name: dnsLabel('node name'),
    address,
    capacity: z.strictObject(
      {
        cpus: boundedInt(1, configLimits.cpusMax, 'CPUs'),
        memory: boundedInt(1, configLimits.memoryMiBMax, 'MiB'),
      },
      { error: (iss) => (iss.code === 'invalid_type' ? 'expected `{ cpus: N, memory: MiB }`' : undefined) },
    ),
    labels: z
      .record(z.string(), z.string({ error: 'expected a string (quote numbers and booleans: "1")' }))
      .default({}),
    fence: z
      .array(fenceDevice(baseDir), { error: 'expected a list of fence devices' })
      .max(configLimits.fenceDevicesPerNodeMax, {
        error: `expected at most ${configLimits.fenceDevicesPerNodeMax} fence devices`,
      })
      .default([]),
    disk: diskHeartbeat(baseDir).optional(),
  });

/** Reports a repeated value at the repeating entry, naming the first one. Runs even if other fields fail. */
function unique(field: 'name' | 'address') {
  return z.superRefine(
    (nodes: unknown, ctx) => {
      if (!Array.isArray(nodes)) return;
      const firstIndex = new Map<unknown, number>();
      nodes.forEach((n: unknown, i) => {
        const v = (n as Record<string, unknown> | null)?.[field];
        if (typeof v !== 'string') return;
        const first = firstIndex.get(v);
        if (first === undefined) firstIndex.set(v, i);
        else
          ctx.addIssue({
            code: 'custom',
            path: [i, field],
            message: `duplicate node ${field} "${v}" (also nodes[${first}])`,
          });
      });
    },
    { when: () => true },
  );
}

const timings = z
  .strictObject({
    leaseTtlMs: ms(4000),
    renewIntervalMs: ms(1000),
    selfFenceMarginMs: ms(1000),
    fenceTimeoutMs: ms(10_000),
    fenceRetryBackoffMs: ms(2000),
    fenceRetryBackoffMaxMs: ms(30_000),
    noDeviceFenceMarginMs: ms(2000),
    twoNodeFenceDelayMs: ms(3000),
    failureExpiryMs: ms(600_000),
    monitorIntervalMs: ms(1000),
  })
  .superRefine((t, ctx) => {
    const fail = (field: keyof typeof t, message: string) =>
      ctx.addIssue({ code: 'custom', path: [field], message });
    if (t.selfFenceMarginMs >= t.leaseTtlMs)
      fail(
        'selfFenceMarginMs',
        `selfFenceMarginMs (${t.selfFenceMarginMs}) must be less than leaseTtlMs (${t.leaseTtlMs}): ` +
          'the agent self-fences at leaseTtlMs - selfFenceMarginMs after its last renewal',
      );
    else if (t.renewIntervalMs * 2 > t.leaseTtlMs - t.selfFenceMarginMs)
      fail(
        'renewIntervalMs',
        `renewIntervalMs (${t.renewIntervalMs}) must be at most (leaseTtlMs - selfFenceMarginMs) / 2 = ` +
          `${Math.floor((t.leaseTtlMs - t.selfFenceMarginMs) / 2)}: renew at least twice before the self-fence deadline`,
      );
    if (t.fenceRetryBackoffMs > t.fenceRetryBackoffMaxMs)
      fail(
        'fenceRetryBackoffMaxMs',
        `fenceRetryBackoffMaxMs (${t.fenceRetryBackoffMaxMs}) must be at least fenceRetryBackoffMs (${t.fenceRetryBackoffMs})`,
      );
    if (t.failureExpiryMs <= t.monitorIntervalMs)
      fail(
        'failureExpiryMs',
        `failureExpiryMs (${t.failureExpiryMs}) must be greater than monitorIntervalMs (${t.monitorIntervalMs}), ` +
          'or failures expire before the next check',
      );
  });

const versionField = z
  .number({
    error: `expected the config schema version, an integer (this corral supports ${configVersionCurrent})`,
  })
  .int({
    error: `expected the config schema version, an integer (this corral supports ${configVersionCurrent})`,
  })
  .superRefine((v, ctx) => {
    if (v === configVersionCurrent) return;
    const supported = supportedVersions().join(', ');
    ctx.addIssue({
      code: 'custom',
      message:
        v > configVersionCurrent
          ? `version ${v} is newer than this corral supports (${supported}); upgrade corral to read this file`
          : `version ${v} is not supported (this corral supports ${supported})`,
    });
  });

export function clusterConfigSchema(ctx: SchemaContext) {
  const hostPort = z.string({ error: 'expected host:port' }).transform((s, zc) => {
    const hp = parseHostPort(s);
    if ('error' in hp)
      zc.addIssue({ code: 'custom', message: `expected host:port, got ${showValue(s)}: ${hp.error}` });
    return s;
  });
  return z.strictObject({
    version: versionField,
    cluster: z.strictObject({ name: dnsLabel('cluster name') }),
    store: storeUrl(ctx.baseDir).default(
      formatStoreUrl(parseStoreUrl(defaultStoreUrl, ctx.baseDir) as StoreUrl),
    ),
    timings: timings.prefault({}),
    network: z
      .strictObject({
        heartbeatPort: port.default(7946),
        authKey: secretRef(ctx).optional(),
        knownAddresses: z.array(ipAddress, { error: 'expected a list of IP addresses' }).default([]),
        api: z
          .strictObject({
            listen: hostPort.default('127.0.0.1:7440'),
            tls: z.strictObject({ cert: filePath(ctx.baseDir), key: filePath(ctx.baseDir) }).optional(),
            /** /metrics needs a viewer token when true */
            metricsAuth: z.boolean().default(false),
          })
          .prefault({}),
        /** every event is also published to this AMQP broker (topic exchange corral.events) */
        amqp: z
          .strictObject({
            url: z.string().regex(/^amqps?:\/\/\S+$/, { error: 'expected amqp://HOST[:PORT][/VHOST]' }),
          })
          .optional(),
      })
      .prefault({}),
    nodes: z
      .array(nodeSchema(ctx.baseDir), { error: 'expected a list of nodes' })
      .min(1, { error: 'expected at least one node' })
      .max(configLimits.nodesMax, { error: `expected at most ${configLimits.nodesMax} nodes` })
      .check(unique('name'), unique('address')),
  });
}

export type ClusterConfig = z.output<ReturnType<typeof clusterConfigSchema>>;
export type NodeConfig = ClusterConfig['nodes'][number];
export type FenceDeviceConfig = NodeConfig['fence'][number];
export type Timings = ClusterConfig['timings'];

export interface ParseOptions {
  env?: NodeJS.ProcessEnv;
  checkSecrets?: boolean;
}

/** Validates cluster.yaml text. `fileName` is used in messages; `baseDir` resolves relative paths. */
export function parseClusterConfig(
  text: string,
  fileName: string,
  baseDir: string,
  opts: ParseOptions = {},
): LoadResult<ClusterConfig> {
  const schema = clusterConfigSchema({
    baseDir: resolve(baseDir),
    env: opts.env ?? process.env,
    checkSecrets: opts.checkSecrets ?? true,
  });
  return loadYamlWithSchema(text, fileName, schema, migrateIfPossible);
}

export class ConfigReadError extends CorralError {
  constructor(path: string, why: string) {
    super(
      'CORRAL_CONFIG_UNREADABLE',
      `cannot read config file ${path}: ${why}`,
      'check the path (see examples/cluster.yaml)',
    );
  }
}

export function readConfigText(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ConfigReadError(
      path,
      code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'it is a directory' : String(code),
    );
  }
}

/** Reads and validates a cluster.yaml; throws ConfigError listing every problem. */
export function loadClusterConfig(path: string, opts: ParseOptions = {}): ClusterConfig {
  const r = parseClusterConfig(
    readConfigText(path),
    path,
    dirname(isAbsolute(path) ? path : resolve(path)),
    opts,
  );
  if (!r.ok) throw new ConfigError(r.errors);
  return r.value;
}
