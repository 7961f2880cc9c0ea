// `corral token create --role R [--name N]` (prints the token once), `token list`, `token revoke NAME`.
// Talks to the store directly: the first admin token has to come from somewhere.
import type { Command } from 'commander';
import { action, UsageError } from '../program.js';
import { addConfigOption, withCluster, type GlobalOpts } from '../context.js';
import { createToken, listTokens, revokeToken, roles, type Role } from '../../api/auth.js';
import { writeEvent } from '../../api/ops.js';
import { printJson, table } from '../table.js';

export function registerToken(program: Command): void {
  const tok = program.command('token').description('API tokens (bearer, with roles viewer, operator, admin)');
  const cmd = (name: string, desc: string) => addConfigOption(tok.command(name).description(desc));
  const by = () => `operator@${process.env.USER ?? 'cli'}`;

  cmd('create', 'create a token and print it (shown only this once; the store keeps its SHA-256)')
    .requiredOption('--role <role>', 'viewer, operator or admin')
    .option('--name <name>', 'a name for events and listings (default: <role>-<time>)')
    .option('--json', 'machine-readable output')
    .action(
      action((opts: GlobalOpts & { role: string; name?: string }) => {
        if (!(roles as readonly string[]).includes(opts.role))
          throw new UsageError(`--role ${opts.role}: expected one of ${roles.join(', ')}`);
        return withCluster(opts, async (c) => {
          const name = opts.name ?? `${opts.role}-${Date.now().toString(36)}`;
          const t = await createToken(c.store, c.config.cluster.name, name, opts.role as Role, Date.now());
          await writeEvent(
            { store: c.store, k: c.k, by: by(), nodeNames: [] },
            'operator',
            name,
            'token-created',
            `token ${name} (${opts.role}) created by ${by()}`,
          );
          if (opts.json) printJson({ name, role: opts.role, token: t.token });
          else process.stdout.write(`${t.token}\n`);
          if (!opts.json)
            process.stderr.write(`token "${name}" (${opts.role}) created; it is not shown again\n`);
          return 0;
        });
      }),
    );

  cmd('list', 'every token: name, role, created (never the secret)')
    .option('--json', 'machine-readable output')
    .action(
      action((opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          const ts = (await listTokens(c.store, c.config.cluster.name)).map((t) => t.record);
          if (opts.json) printJson(ts);
          else
            process.stdout.write(
              table(
                ['NAME', 'ROLE', 'PREFIX', 'CREATED'],
                ts.map((t) => [t.name, t.role, t.prefix + '…', new Date(t.createdAtMs).toISOString()]),
              ) + '\n',
            );
          return 0;
        }),
      ),
    );

  cmd('revoke', 'revoke a token by name (takes effect within a second)')
    .argument('<name>')
    .action(
      action((name: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          const n = await revokeToken(c.store, c.config.cluster.name, name);
          if (n === 0) throw new UsageError(`no token named "${name}"`, 'see `corral token list`');
          await writeEvent(
            { store: c.store, k: c.k, by: by(), nodeNames: [] },
            'operator',
            name,
            'token-revoked',
            `token ${name} revoked by ${by()}`,
          );
          process.stdout.write(`${name}: revoked\n`);
          return 0;
        }),
      ),
    );
}
