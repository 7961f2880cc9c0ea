// `corral config ...` (filled in by the config work).
import type { Command } from 'commander';

export function registerConfig(program: Command): void {
  program.command('config').description('validate and show cluster.yaml');
}
