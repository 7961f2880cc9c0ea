// `corral clone ...` alone (bench and CI helpers): the same commands as the corral CLI, without
// loading the other areas' modules.
import { Command, CommanderError } from 'commander';
import { registerClone } from '../../cli/commands/clone.js';
import { exitCodes } from '../../cli/program.js';

const program = new Command('corral').exitOverride();
registerClone(program);
try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (!(err instanceof CommanderError)) throw err;
  process.exitCode =
    err.code.startsWith('commander.help') || err.code === 'commander.version'
      ? exitCodes.ok
      : exitCodes.usage;
}
