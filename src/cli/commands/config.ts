// `corral config validate|show|migrate FILE`: check cluster.yaml and print it normalised.
import { writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import type { Command } from 'commander';
import { Document, isMap, isScalar, stringify } from 'yaml';
import { configVersionCurrent, migrateDoc } from '../../config/migrate.js';
import { parseClusterConfig, readConfigText, type ClusterConfig } from '../../config/schema.js';
import { ConfigError, formatIssue, parseYaml, type LoadResult } from '../../config/yaml.js';
import { action, exitCodes } from '../program.js';

function parseFile(file: string): LoadResult<ClusterConfig> {
  return parseClusterConfig(readConfigText(file), file, dirname(resolve(file)));
}

function printIssues(result: { errors: Parameters<typeof formatIssue>[0][] }): number {
  for (const i of result.errors) process.stderr.write(`${formatIssue(i)}\n`);
  return exitCodes.problem;
}

/** The normalised config as YAML; the auth key is shown as a reference only, its value redacted. */
export function renderConfigYaml(config: ClusterConfig): string {
  const doc = new Document(config);
  doc.commentBefore = ' normalised by `corral config show`: defaults filled in, paths absolute';
  const network = doc.get('network', true);
  if (isMap(network)) {
    const pair = network.items.find((p) => isScalar(p.key) && p.key.value === 'authKey');
    if (pair && isScalar(pair.key)) pair.key.comment = ' value: <redacted>';
  }
  return doc.toString({ lineWidth: 0 });
}

export function registerConfig(program: Command): void {
  const config = program
    .command('config')
    .description('validate, show and migrate a cluster configuration file (cluster.yaml)');

  config
    .command('validate')
    .description('check FILE; print every problem as file:line:col path: message (exit 1 if any)')
    .argument('<file>', 'cluster.yaml to check')
    .action(
      action((file: string) => {
        const r = parseFile(file);
        if (!r.ok) return printIssues(r);
        const n = r.value.nodes.length;
        process.stdout.write(
          `${file}: valid (cluster ${r.value.cluster.name}, ${n} node${n === 1 ? '' : 's'})\n`,
        );
        return exitCodes.ok;
      }),
    );

  config
    .command('show')
    .description('print FILE normalised: defaults filled in, paths absolute, secrets redacted')
    .argument('<file>', 'cluster.yaml to show')
    .option('--json', 'print JSON instead of YAML')
    .action(
      action((file: string, opts: { json?: boolean }) => {
        const r = parseFile(file);
        if (!r.ok) return printIssues(r);
        process.stdout.write(opts.json ? `${JSON.stringify(r.value, null, 2)}\n` : renderConfigYaml(r.value));
        return exitCodes.ok;
      }),
    );

  config
    .command('migrate')
    .description(`upgrade FILE to config version ${configVersionCurrent}; prints the result (or --write it)`)
    .argument('<file>', 'cluster.yaml to migrate')
    .option('--write', 'replace FILE with the migrated version (the old one is kept as FILE.v<N>.bak)')
    .action(
      action((file: string, opts: { write?: boolean }) => {
        const text = readConfigText(file);
        const parsed = parseYaml(text, file);
        if (parsed.errors.length) return printIssues(parsed);
        const m = migrateDoc(parsed.data);
        if (!m.ok) {
          process.stderr.write(`${file}: ${m.message}\n`);
          return exitCodes.problem;
        }
        if (m.applied.length === 0) {
          process.stdout.write(`${file}: already at version ${m.to}\n`);
          return exitCodes.ok;
        }
        const migrated = stringify(m.doc, { lineWidth: 0 });
        const check = parseClusterConfig(
          migrated,
          `${file} (migrated to version ${m.to})`,
          dirname(resolve(file)),
        );
        if (!check.ok)
          throw new ConfigError(check.errors, 'the migrated file is not valid; fix FILE and retry');
        if (!opts.write) {
          process.stdout.write(migrated);
          return exitCodes.ok;
        }
        const backup = `${file}.v${m.from}.bak`;
        writeFileSync(backup, text);
        writeFileSync(file, migrated);
        process.stdout.write(
          `${file}: migrated from version ${m.from} to ${m.to} (old file kept as ${backup})\n` +
            m.applied.map((a) => `  ${a}\n`).join(''),
        );
        return exitCodes.ok;
      }),
    );
}
