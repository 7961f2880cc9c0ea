// cluster.yaml: every broken fixture gives exact `file:line:col path: message` lines; valid files
// round-trip through `show`; the CLI is run as a real process for its exit codes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { renderConfigYaml } from '../src/cli/commands/config.js';
import {
  configVersionCurrent,
  migrateDoc,
  supportedVersions,
  type Migration,
} from '../src/config/migrate.js';
import {
  loadClusterConfig,
  parseClusterConfig,
  parseStoreUrl,
  resolveSecret,
  SecretError,
} from '../src/config/schema.js';
import { closest, ConfigError, editDistance, formatIssue, loadYamlWithSchema } from '../src/config/yaml.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const fixtures = join(root, 'test', 'fixtures', 'config');
const example = join(root, 'examples', 'cluster.yaml');
const cliTimeoutMs = 60_000;
const cliProcessesMax = 2;

function issuesOf(file: string, env: NodeJS.ProcessEnv = {}): string[] {
  const r = parseClusterConfig(readFileSync(file, 'utf8'), basename(file), dirname(file), { env });
  return r.ok ? [] : r.errors.map(formatIssue);
}

const dnsRule = 'lowercase letters, digits and dashes, 1-63 characters, no dash at either end';
const broken: Record<string, string[]> = {
  'wrong-types.yaml': [
    'wrong-types.yaml:6:18 network.heartbeatPort: expected a port number (1-65535), got "7946"',
    'wrong-types.yaml:7:19 network.knownAddresses: expected a list of IP addresses, got "10.0.0.1"',
    'wrong-types.yaml:11:23 nodes[0].capacity.cpus: expected a positive integer (CPUs), got "two"',
    'wrong-types.yaml:12:21 nodes[0].labels.rack: expected a string (quote numbers and booleans: "1"), got 12',
    'wrong-types.yaml:15:15 nodes[1].capacity: expected `{ cpus: N, memory: MiB }`, got 4',
  ],
  'negative-memory.yaml': [
    'negative-memory.yaml:9:15 nodes[0].capacity.memory: expected a positive integer (MiB), got -512',
    'negative-memory.yaml:13:13 nodes[1].capacity.cpus: expected a positive integer (CPUs), got 2.5',
  ],
  'unknown-key-typo.yaml': [
    'unknown-key-typo.yaml:5:3 timings.leaseTTLMs: unknown key, did you mean `leaseTtlMs`?',
    'unknown-key-typo.yaml:7:5 nodes[0].capacity: missing required field, expected `{ cpus: N, memory: MiB }`',
    'unknown-key-typo.yaml:9:5 nodes[0].capacty: unknown key, did you mean `capacity`?',
    'unknown-key-typo.yaml:10:5 nodes[0].colour: unknown key; allowed here: `name`, `address`, `capacity`, `labels`, `fence`, `disk`',
  ],
  'duplicate-node.yaml': [
    'duplicate-node.yaml:11:11 nodes[2].name: duplicate node name "n1" (also nodes[0])',
    'duplicate-node.yaml:12:14 nodes[2].address: duplicate node address "127.0.0.2" (also nodes[1])',
  ],
  'bad-store-url.yaml': [
    'bad-store-url.yaml:4:8 store: expected sqlite:PATH or etcd://host:port[,host:port...], ' +
      'got "etcd://10.0.0.1:2379,10.0.0.2": endpoint "10.0.0.2": expected host:port (IPv6 in brackets: [::1]:7440)',
  ],
  'bad-fence-type.yaml': [
    'bad-fence-type.yaml:9:15 nodes[0].fence[0].type: expected type to be one of `command`, `fence-agent`, `local`, `sbd`, got "ipmi"',
    'bad-fence-type.yaml:12:16 nodes[0].fence[1].agent: expected a fence agent name like fence_xvm (fence_[a-z0-9_]+), got "fence-xvm"',
    'bad-fence-type.yaml:13:25 nodes[0].fence[1].params.port: expected a string, number or boolean, got a list',
    'bad-fence-type.yaml:15:18 nodes[0].fence[2].command: expected the command as a list of arguments, ' +
      'e.g. [/usr/local/sbin/fence-node, --force], got "/usr/local/sbin/fence-node"',
  ],
  'yaml-syntax.yaml': [
    'yaml-syntax.yaml:6:14: YAML syntax: Nested mappings are not allowed in compact mappings',
    'yaml-syntax.yaml:6:14: YAML syntax: Implicit keys need to be on a single line',
  ],
  'missing-required.yaml': [
    `missing-required.yaml:2:1 cluster.name: missing required field, expected a cluster name: ${dnsRule}`,
    'missing-required.yaml:4:5 nodes[0].address: missing required field, expected an IPv4/IPv6 address or a host name',
    'missing-required.yaml:5:5 nodes[0].capacity.memory: missing required field, expected a positive integer (MiB)',
    `missing-required.yaml:7:5 nodes[1].name: missing required field, expected a node name: ${dnsRule}`,
    'missing-required.yaml:8:26 nodes[1].capacity.memory: expected a positive integer (MiB), got nothing',
  ],
  'timing-cross-check.yaml': [
    'timing-cross-check.yaml:4:1 timings.fenceRetryBackoffMaxMs: fenceRetryBackoffMaxMs (30000) must be at least fenceRetryBackoffMs (60000)',
    'timing-cross-check.yaml:6:20 timings.renewIntervalMs: renewIntervalMs (1500) must be at most ' +
      '(leaseTtlMs - selfFenceMarginMs) / 2 = 1000: renew at least twice before the self-fence deadline',
  ],
  'future-version.yaml': [
    'future-version.yaml:1:10 version: version 2 is newer than this corral supports (1); upgrade corral to read this file',
  ],
  'secret-env-missing.yaml': [
    'secret-env-missing.yaml:5:19 network.authKey.env: environment variable CORRAL_TEST_AUTH_KEY is not set; ' +
      'it must hold the auth key (at least 16 bytes)',
  ],
  'secret-file-missing.yaml': [
    `secret-file-missing.yaml:6:11 network.authKey.file: cannot read auth key file ${fixtures}/no-such.key: no such file`,
  ],
  'bad-names.yaml': [
    `bad-names.yaml:3:9 cluster.name: expected a cluster name: ${dnsRule}, got "Prod_Cluster"`,
    `bad-names.yaml:5:11 nodes[0].name: expected a node name: ${dnsRule}, got "-n1"`,
    'bad-names.yaml:6:14 nodes[0].address: expected an IPv4/IPv6 address or a host name, got "not a host"',
    'bad-names.yaml:10:34 nodes[1].capacity.memory: expected a positive integer (MiB) no greater than 67108864, got 99999999999',
  ],
  'issue-example/cluster.yaml': [
    'cluster.yaml:15:15 nodes[2].capacity.memory: expected a positive integer (MiB), got "lots"',
  ],
};

for (const [name, expected] of Object.entries(broken)) {
  test(`broken fixture ${name}: every problem, with file:line:col and path`, () => {
    assert.deepEqual(issuesOf(join(fixtures, name)), expected);
  });
}

test('an empty env var is reported as empty; a short key as too short', () => {
  const file = join(fixtures, 'secret-env-missing.yaml');
  assert.match(issuesOf(file, { CORRAL_TEST_AUTH_KEY: '' })[0] ?? '', /CORRAL_TEST_AUTH_KEY is empty;/);
  assert.match(
    issuesOf(file, { CORRAL_TEST_AUTH_KEY: 'short' })[0] ?? '',
    /environment variable CORRAL_TEST_AUTH_KEY holds 5 bytes; expected at least 16$/,
  );
  assert.deepEqual(issuesOf(file, { CORRAL_TEST_AUTH_KEY: 'k'.repeat(32) }), []);
});

test('the example and the full fixture are valid; defaults are filled in; paths resolve against the file', () => {
  const c = loadClusterConfig(example, { env: {} });
  assert.equal(c.cluster.name, 'demo');
  assert.equal(c.nodes.length, 3);
  assert.equal(c.store, `sqlite:${join(root, 'examples', 'corral-store.db')}`);
  assert.deepEqual(c.timings, {
    leaseTtlMs: 4000,
    renewIntervalMs: 1000,
    selfFenceMarginMs: 1000,
    fenceTimeoutMs: 10000,
    fenceRetryBackoffMs: 2000,
    fenceRetryBackoffMaxMs: 30000,
    noDeviceFenceMarginMs: 2000,
    twoNodeFenceDelayMs: 3000,
    failureExpiryMs: 600000,
    monitorIntervalMs: 1000,
  });
  assert.equal(c.network.api.listen, '127.0.0.1:7440');
  assert.deepEqual(c.nodes[2]?.fence, []);

  const full = loadClusterConfig(join(fixtures, 'valid-full.yaml'));
  assert.equal(full.store, 'etcd://127.0.0.1:2379,[::1]:2380');
  assert.deepEqual(full.network.api.tls, {
    cert: join(fixtures, 'tls/api.crt'),
    key: join(fixtures, 'tls/api.key'),
  });
  assert.deepEqual(full.nodes[0]?.fence, [
    {
      type: 'fence-agent',
      agent: 'fence_xvm',
      params: { port: 'alpha', delay: 2, verbose: true },
      timeoutMs: 10000,
    },
    { type: 'command', command: [join(fixtures, 'fence/node.sh'), '--hard'], timeoutMs: 3000 },
  ]);
  assert.deepEqual(full.nodes[0]?.labels, { zone: 'a', 'example.com/role': 'db' });
});

test('loadClusterConfig throws ConfigError listing every problem', () => {
  const file = join(fixtures, 'duplicate-node.yaml');
  assert.throws(
    () => loadClusterConfig(file),
    (err: unknown) =>
      err instanceof ConfigError &&
      err.code === 'CORRAL_CONFIG_INVALID' &&
      err.issues.length === 2 &&
      err.message.startsWith(`${file}: 2 problems\n${file}:11:11 nodes[2].name: duplicate`),
  );
  assert.throws(
    () => loadClusterConfig(join(fixtures, 'nope.yaml')),
    /cannot read config file .*nope.yaml: no such file/,
  );
});

test('show output round-trips: parsing it again gives the same config, and never holds the secret', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'corral-config-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const secret = 'not-printed-0123456789abcdef';
  writeFileSync(join(dir, 'corral.key'), `${secret}\n`, { mode: 0o600 });
  const withKey = readFileSync(join(fixtures, 'valid-full.yaml'), 'utf8').replace(
    'network:\n',
    'network:\n  authKey: { file: ./corral.key }\n',
  );
  for (const [text, baseDir] of [
    [readFileSync(example, 'utf8'), dirname(example)],
    [readFileSync(join(fixtures, 'valid-full.yaml'), 'utf8'), fixtures],
    [withKey, dir],
  ] as const) {
    const first = parseClusterConfig(text, 'in.yaml', baseDir);
    assert.ok(first.ok, JSON.stringify(!first.ok && first.errors));
    const shown = renderConfigYaml(first.value);
    assert.ok(!shown.includes(secret));
    const second = parseClusterConfig(shown, 'shown.yaml', '/elsewhere');
    assert.ok(second.ok, JSON.stringify(!second.ok && second.errors));
    assert.deepEqual(second.value, first.value);
  }
  const keyed = parseClusterConfig(withKey, 'in.yaml', dir);
  assert.ok(keyed.ok);
  assert.deepEqual(keyed.value.network.authKey, { file: join(dir, 'corral.key') });
  assert.match(renderConfigYaml(keyed.value), /authKey: # value: <redacted>\n {4}file: .*corral\.key\n/);
  assert.equal(resolveSecret({ file: join(dir, 'corral.key') }), secret);
});

test('resolveSecret: clear errors for a missing file, an unset or empty variable', () => {
  assert.equal(resolveSecret({ env: 'K' }, { K: 'x'.repeat(16) }), 'x'.repeat(16));
  assert.throws(
    () => resolveSecret({ file: '/nonexistent/corral.key' }),
    (e: unknown) =>
      e instanceof SecretError &&
      /cannot read auth key file \/nonexistent\/corral.key: no such file/.test(e.message),
  );
  assert.throws(() => resolveSecret({ env: 'K' }, {}), /environment variable K is not set/);
  assert.throws(() => resolveSecret({ env: 'K' }, { K: '' }), /environment variable K is empty/);
});

test('authKey needs exactly one of file or env, and suggests keys', () => {
  const base =
    'version: 1\ncluster: {name: a}\nnodes: [{name: n, address: 127.0.0.1, capacity: {cpus: 1, memory: 1}}]\n';
  const run = (net: string) => {
    const r = parseClusterConfig(`${base}network:\n${net}`, 'c.yaml', '/tmp', { checkSecrets: false });
    return r.ok ? [] : r.errors.map(formatIssue);
  };
  assert.deepEqual(run('  authKey: { file: k, env: K }\n'), [
    'c.yaml:5:12 network.authKey: set exactly one of `file` or `env`',
  ]);
  assert.deepEqual(run('  authKey: { fiel: k }\n'), [
    'c.yaml:5:14 network.authKey.fiel: unknown key, did you mean `file`?',
  ]);
  assert.deepEqual(run('  authKey: { env: 1BAD }\n'), [
    'c.yaml:5:19 network.authKey.env: expected an environment variable name, got "1BAD"',
  ]);
});

test('store URLs are validated precisely', () => {
  assert.deepEqual(parseStoreUrl('sqlite:store.db', '/srv/corral'), {
    kind: 'sqlite',
    path: '/srv/corral/store.db',
  });
  assert.deepEqual(parseStoreUrl('sqlite:/var/lib/c.db', '/x'), { kind: 'sqlite', path: '/var/lib/c.db' });
  assert.deepEqual(parseStoreUrl('etcd://a.example:2379,10.0.0.2:2379,[fd00::1]:2379'), {
    kind: 'etcd',
    endpoints: [
      { host: 'a.example', port: 2379 },
      { host: '10.0.0.2', port: 2379 },
      { host: 'fd00::1', port: 2379 },
    ],
  });
  const bad: Record<string, string> = {
    'sqlite:': 'the sqlite path is empty (e.g. sqlite:./corral-store.db)',
    'sqlite:///x.db':
      'write sqlite:PATH without slashes after the colon (e.g. sqlite:/var/lib/corral/store.db)',
    'etcd://': 'no etcd endpoint after etcd://',
    'etcd://h:0': 'endpoint "h:0": port 0 is outside 1-65535',
    'etcd://h:1,h:1': 'endpoint h:1 is listed twice',
    'etcd://::1:2379': 'endpoint "::1:2379": expected host:port (IPv6 in brackets: [::1]:7440)',
    'etcd://[10.0.0.1]:2379': 'endpoint "[10.0.0.1]:2379": bad host "10.0.0.1"',
    'etcd://h:2379/path': 'has a path or query; etcd URLs are only endpoints',
    'etcd://u:p@h:2379': 'credentials in the URL are not supported',
    ' sqlite:/x.db': 'has leading or trailing spaces',
    'http://h:2379': 'unknown scheme "http"',
    'store.db': 'no scheme',
  };
  for (const [url, error] of Object.entries(bad))
    assert.equal((parseStoreUrl(url) as { error: string }).error, error, url);
  // one trailing slash is allowed (the store opens the same URL)
  assert.deepEqual(parseStoreUrl('etcd://h:2379/'), { kind: 'etcd', endpoints: [{ host: 'h', port: 2379 }] });
});

test('the generic loader works for any strict schema (resource files, scenarios...)', () => {
  const schema = z.strictObject({
    replicas: z.number().int().positive(),
    image: z.string(),
    mode: z.enum(['fast', 'safe']),
    ports: z.array(z.number()).min(1),
  });
  const text = 'replicas: 0\nimgae: web\nmode: quick\nports: []\n';
  const r = loadYamlWithSchema(text, 'svc.yaml', schema);
  assert.ok(!r.ok);
  assert.deepEqual(r.errors.map(formatIssue), [
    'svc.yaml:1:1 image: missing required field, expected a string',
    'svc.yaml:1:11 replicas: expected a number > 0, got 0',
    'svc.yaml:2:1 imgae: unknown key, did you mean `image`?',
    'svc.yaml:3:7 mode: expected one of "fast", "safe", got "quick"',
    'svc.yaml:4:8 ports: expected a list with at least 1 item(s), got an empty list',
  ]);
  const ok = loadYamlWithSchema('replicas: 2\nimage: web\nmode: safe\nports: [80]\n', 'svc.yaml', schema);
  assert.deepEqual(ok, { ok: true, value: { replicas: 2, image: 'web', mode: 'safe', ports: [80] } });
});

test('edit distance and suggestions', () => {
  assert.equal(editDistance('capacty', 'capacity'), 1);
  assert.equal(editDistance('', 'abc'), 3);
  assert.equal(editDistance('kitten', 'sitting'), 3);
  assert.equal(closest('leaseTTLMs', ['leaseTtlMs', 'renewIntervalMs']), 'leaseTtlMs');
  assert.equal(closest('colour', ['name', 'address']), undefined);
});

test('migrations: the machinery runs N -> N+1 steps; unknown versions are rejected', () => {
  assert.equal(configVersionCurrent, 1);
  assert.deepEqual(supportedVersions(), [1]);
  assert.deepEqual(migrateDoc({ version: 1, a: 1 }), {
    ok: true,
    doc: { version: 1, a: 1 },
    from: 1,
    to: 1,
    applied: [],
  });
  assert.deepEqual(migrateDoc({ version: 0 }), {
    ok: false,
    message: 'version 0 is not supported (this corral supports 1)',
  });
  assert.deepEqual(migrateDoc({ version: 7 }), {
    ok: false,
    message: 'version 7 is newer than this corral supports (1); upgrade corral to read this file',
  });
  assert.deepEqual(migrateDoc({ cluster: {} }), {
    ok: false,
    message: 'the file has no integer `version` field (this corral supports 1)',
  });
  // A synthetic table (test only, not a real schema version) exercises the stepping.
  const table: Migration[] = [
    { from: 1, describe: 'synthetic: a becomes b', up: ({ a, ...rest }) => ({ ...rest, b: a }) },
    { from: 2, describe: 'synthetic: b doubles', up: (d) => ({ ...d, b: Number(d.b) * 2 }) },
  ];
  const input = { version: 1, a: 21 };
  assert.deepEqual(migrateDoc(input, table, 3), {
    ok: true,
    doc: { version: 3, b: 42 },
    from: 1,
    to: 3,
    applied: ['1 -> 2: synthetic: a becomes b', '2 -> 3: synthetic: b doubles'],
  });
  assert.deepEqual(input, { version: 1, a: 21 }, 'the input is not mutated');
  assert.deepEqual(supportedVersions(table, 3), [1, 2, 3]);
  assert.deepEqual(migrateDoc({ version: 0 }, table, 3), {
    ok: false,
    message: 'version 0 is not supported (this corral supports 1, 2, 3)',
  });
});

// ---- the CLI as a real process ------------------------------------------------------------------

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function corral(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((done) => {
    execFile(
      process.execPath,
      [join(root, 'bin', 'corral.js'), ...args],
      { cwd: root, timeout: cliTimeoutMs, env: { ...process.env, CORRAL_FROM_SOURCE: '1', ...env } },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
        done({ code, stdout, stderr });
      },
    );
  });
}

/** Runs the jobs at most `cliProcessesMax` at a time (each CLI process compiles the sources). */
async function pooled<T extends unknown[] | []>(jobs: { [K in keyof T]: () => Promise<T[K]> }): Promise<T> {
  const results = [] as unknown[] as T;
  let next = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const i = next++;
      results[i] = await (jobs[i] as () => Promise<T[number]>)();
    }
  };
  await Promise.all(Array.from({ length: cliProcessesMax }, worker));
  return results;
}

test('CLI: validate, show, migrate exit codes and output', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'corral-config-cli-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  mkdirSync(join(dir, 'etc'));
  const secret = 'cli-secret-0123456789abcdef';
  const keyed = join(dir, 'etc', 'cluster.yaml');
  writeFileSync(
    keyed,
    readFileSync(example, 'utf8').replace('  # authKey:', '  authKey: { env: CORRAL_TEST_CLI_KEY } #'),
  );

  const [valid, invalid, missing, usage, showYaml, showJson, showKeyed, migrate, migrateFuture, noKey] =
    await pooled([
      () => corral(['config', 'validate', 'examples/cluster.yaml']),
      () => corral(['config', 'validate', 'test/fixtures/config/duplicate-node.yaml']),
      () => corral(['config', 'validate', 'examples/nope.yaml']),
      () => corral(['config', 'validate']),
      () => corral(['config', 'show', 'examples/cluster.yaml']),
      () => corral(['config', 'show', '--json', keyed], { CORRAL_TEST_CLI_KEY: secret }),
      () => corral(['config', 'show', keyed], { CORRAL_TEST_CLI_KEY: secret }),
      () => corral(['config', 'migrate', 'examples/cluster.yaml', '--write']),
      () => corral(['config', 'migrate', 'test/fixtures/config/future-version.yaml']),
      () => corral(['config', 'validate', keyed], { CORRAL_TEST_CLI_KEY: '' }),
    ]);
  assert.deepEqual(valid, {
    code: 0,
    stdout: 'examples/cluster.yaml: valid (cluster demo, 3 nodes)\n',
    stderr: '',
  });
  assert.equal(invalid.code, 1);
  assert.equal(invalid.stdout, '');
  assert.deepEqual(invalid.stderr.trim().split('\n'), [
    'test/fixtures/config/duplicate-node.yaml:11:11 nodes[2].name: duplicate node name "n1" (also nodes[0])',
    'test/fixtures/config/duplicate-node.yaml:12:14 nodes[2].address: duplicate node address "127.0.0.2" (also nodes[1])',
  ]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /^corral: cannot read config file examples\/nope.yaml: no such file\nhint: /);
  assert.equal(usage.code, 2, usage.stderr);

  assert.equal(showYaml.code, 0, showYaml.stderr);
  const reparsed = parseClusterConfig(showYaml.stdout, 'shown.yaml', '/');
  assert.ok(reparsed.ok);
  assert.deepEqual(reparsed.value, loadClusterConfig(example));

  for (const r of [showJson, showKeyed]) {
    assert.equal(r.code, 0, r.stderr);
    assert.ok(!r.stdout.includes(secret), 'the secret is never printed');
  }
  assert.deepEqual(JSON.parse(showJson.stdout).network.authKey, { env: 'CORRAL_TEST_CLI_KEY' });
  assert.match(showKeyed.stdout, /authKey: # value: <redacted>\n {4}env: CORRAL_TEST_CLI_KEY\n/);

  assert.deepEqual(migrate, { code: 0, stdout: 'examples/cluster.yaml: already at version 1\n', stderr: '' });
  assert.equal(migrateFuture.code, 1);
  assert.equal(
    migrateFuture.stderr,
    'test/fixtures/config/future-version.yaml: version 2 is newer than this corral supports (1); upgrade corral to read this file\n',
  );
  assert.equal(noKey.code, 1);
  assert.match(
    noKey.stderr,
    /cluster.yaml:\d+:\d+ network.authKey.env: environment variable CORRAL_TEST_CLI_KEY is empty;/,
  );
});

test('corral agent refuses a bad --nice before touching anything', async () => {
  const bad = await pooled(
    ['99', 'fast', '-21', '1.5'].map(
      (n) => () => corral(['agent', '--config', 'examples/cluster.yaml', '--node', 'node1', `--nice=${n}`]),
    ),
  );
  for (const [i, r] of bad.entries()) {
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /--nice .*: expected a whole number from -20 to 19\nhint: /, `case ${i}`);
  }
});
