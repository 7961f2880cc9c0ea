// The corral command. Each area registers its own sub-commands (src/cli/commands/*.ts).
import { Command, CommanderError } from 'commander';
import { exitCodes } from './program.js';
import { registerConfig } from './commands/config.js';
import { registerAgent } from './commands/agent.js';
import { registerStatus } from './commands/status.js';
import { registerNode } from './commands/node.js';
import { registerResource } from './commands/resource.js';
import { registerCluster } from './commands/cluster.js';
import { registerDemo } from './commands/demo.js';
import { registerClone } from './commands/clone.js';
import { registerPxe } from './commands/pxe.js';
import { registerSim } from './commands/sim.js';
import { registerApi } from './commands/api.js';
import { registerToken } from './commands/token.js';
import { registerDisk } from './commands/disk.js';
import { registerVm } from './commands/vm.js';
import { registerCheck } from './commands/check.js';

const program = new Command('corral')
  .description('Corral: high-availability cluster manager for VMs and services')
  .version('0.1.0')
  .showHelpAfterError('(run with --help for usage)')
  .exitOverride();

registerConfig(program);
registerDemo(program);
registerStatus(program);
registerNode(program);
registerResource(program);
registerCluster(program);
registerAgent(program);
registerClone(program);
registerPxe(program);
registerSim(program);
registerApi(program);
registerToken(program);
registerDisk(program);
registerVm(program);
registerCheck(program);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    if (
      err.code === 'commander.helpDisplayed' ||
      err.code === 'commander.version' ||
      err.code === 'commander.help'
    ) {
      process.exitCode = exitCodes.ok;
    } else {
      process.exitCode = exitCodes.usage;
    }
  } else {
    throw err;
  }
}
