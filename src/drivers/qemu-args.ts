// The QEMU command line of a VM, built only from its validated spec (no shell, no free-form
// arguments). Pure apart from the /dev/kvm probe, so tests and `corral check` can inspect it.
import { accessSync, constants } from 'node:fs';
import type { ResourceSpec } from '../core/spec.js';
import type { VmSpec } from '../core/vm-spec.js';
import { vmGuestAgentSocket, vmPaths } from './qemu-paths.js';

export const QEMU_BINARY_DEFAULT = 'qemu-system-x86_64';

export function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

export function accelOf(vm: VmSpec): 'kvm' | 'tcg' {
  if (vm.accel === 'auto') return kvmUsable() ? 'kvm' : 'tcg';
  return vm.accel;
}

export interface QemuArgsOptions {
  stateDir: string;
  /** live-migration target: listen for the stream here */
  incoming?: { host: string; port: number };
}

/** argv (without the binary) for one VM */
export function qemuArgs(spec: ResourceSpec, o: QemuArgsOptions): string[] {
  const vm = spec.vm;
  if (!vm) throw new Error(`${spec.id}: not a vm resource`);
  const p = vmPaths(o.stateDir, spec.id);
  const args = [
    '-name',
    `guest=${spec.id},debug-threads=on`,
    '-no-user-config',
    '-nodefaults',
    '-display',
    'none',
    '-accel',
    accelOf(vm),
    '-machine',
    vm.machine,
    '-cpu',
    vm.cpuModel,
    '-m',
    `${vm.memory}M`,
    '-smp',
    String(vm.cpus),
    '-qmp',
    `unix:${p.qmpSocket},server=on,wait=off`,
    '-qmp',
    `unix:${p.adminQmpSocket},server=on,wait=off`,
    '-serial',
    'none',
    '-boot',
    'order=c,menu=off',
  ];
  if (vm.vnc) args.push('-vga', 'std', '-vnc', `unix:${p.vncSocket}`);
  vm.disks.forEach((d, i) => {
    const drive = [
      `file=${d.path}`,
      `format=${d.format}`,
      `if=${d.bus}`,
      `index=${i}`,
      `media=disk`,
      `cache=writeback`,
    ];
    if (d.readOnly) drive.push('readonly=on');
    args.push('-drive', drive.join(','));
  });
  vm.nics.forEach((n, i) => {
    const netdev = n.type === 'user' ? `user,id=net${i}` : `bridge,id=net${i},br=${n.bridge}`;
    args.push('-netdev', netdev, '-device', `virtio-net-pci,netdev=net${i},mac=${n.mac}`);
  });
  if (vm.guestAgent) {
    args.push(
      '-chardev',
      `socket,id=qga0,path=${vmGuestAgentSocket(o.stateDir, spec.id)},server=on,wait=off`,
      '-device',
      'virtio-serial',
      '-device',
      'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
    );
  }
  if (o.incoming) args.push('-incoming', `tcp:${o.incoming.host}:${o.incoming.port}`);
  return args;
}
