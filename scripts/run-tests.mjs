// Runs every *.test.ts under src/ and test/ with node's own test runner (through tsx).
// Two phases: most files run two at a time; heavy ones (real QEMU, network namespaces, a
// browser) run alone afterwards, so timing-sensitive tests are not starved of CPU.
// Prints node's summary for each phase and one combined closing line for CI:
//   "N passed, N failed, N skipped"
// Usage: node scripts/run-tests.mjs [substring-filter ...]
import { readdirSync, statSync, readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { join, relative } from 'node:path';
import { tmpdir } from 'node:os';
import { spawnSync } from 'node:child_process';

const heavy = /(multihost|vm|qemu|dashboard|partition)/;
const files = [];
function walk(dir) {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (name === 'node_modules' || name === 'fixtures') continue;
    const st = statSync(p);
    if (st.isDirectory()) walk(p);
    else if (name.endsWith('.test.ts')) files.push(relative(process.cwd(), p));
  }
}
for (const r of ['src', 'test']) {
  try {
    walk(r);
  } catch {
    // a root that does not exist has no tests
  }
}
const filters = process.argv.slice(2);
const chosen = files.sort().filter((f) => filters.length === 0 || filters.some((s) => f.includes(s)));
if (chosen.length === 0) {
  console.error(`no test files match ${filters.join(' ') || '(all)'}`);
  process.exit(1);
}
const tmp = mkdtempSync(join(tmpdir(), 'corral-tests-'));
const totals = { pass: 0, fail: 0, skipped: 0, cancelled: 0 };
let status = 0;
const phases = [
  { files: chosen.filter((f) => !heavy.test(f)), concurrency: process.env.CORRAL_TEST_CONCURRENCY ?? '2' },
  { files: chosen.filter((f) => heavy.test(f)), concurrency: '1' },
];
for (const [i, phase] of phases.entries()) {
  if (phase.files.length === 0) continue;
  const tap = join(tmp, `phase${i}.tap`);
  const args = [
    '--import',
    'tsx',
    '--test',
    `--test-concurrency=${phase.concurrency}`,
    '--test-reporter=spec',
    '--test-reporter-destination=stdout',
    '--test-reporter=tap',
    `--test-reporter-destination=${tap}`,
    ...phase.files,
  ];
  const r = spawnSync(process.execPath, args, { stdio: 'inherit' });
  if (r.status !== 0) status = r.status ?? 1;
  let text = '';
  try {
    text = readFileSync(tap, 'utf8');
  } catch {
    status = status || 1;
  }
  for (const k of Object.keys(totals)) {
    const m = new RegExp(`^# ${k} (\\d+)$`, 'm').exec(text);
    if (m) totals[k] += Number(m[1]);
  }
}
rmSync(tmp, { recursive: true, force: true });
if (totals.fail + totals.cancelled > 0 && status === 0) status = 1;
console.log(`\n# pass ${totals.pass}\n# fail ${totals.fail + totals.cancelled}`);
console.log(`${totals.pass} passed, ${totals.fail + totals.cancelled} failed, ${totals.skipped} skipped`);
process.exit(status);
