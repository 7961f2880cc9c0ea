// Where a VM's runtime files live on its node: one directory per VM under the node's
// state directory. The qemu driver creates them; the console proxy connects to vnc.sock.
import { join } from 'node:path';

export function vmPaths(stateDir: string, id: string) {
  const dir = join(stateDir, 'vm', id);
  return {
    dir,
    qmpSocket: join(dir, 'qmp.sock'),
    /** a second QMP monitor for tools (corral check, tests, benchmarks): the agent holds qmp.sock */
    adminQmpSocket: join(dir, 'qmp-admin.sock'),
    vncSocket: join(dir, 'vnc.sock'),
    pidfile: join(dir, 'qemu.pid'),
    log: join(dir, 'qemu.log'),
  };
}

/** the QEMU guest agent's channel (a virtio-serial port) when the VM has `guestAgent: true` */
export function vmGuestAgentSocket(stateDir: string, id: string): string {
  return join(vmPaths(stateDir, id).dir, 'qga.sock');
}
