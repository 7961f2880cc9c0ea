// Several "hosts" on one machine: network namespaces, each with a veth link to a bridge living in
// its own hub namespace (so the host's network is never touched). Optionally shaped with tc (tbf).
// Always torn down: by destroy(), and on process exit as a last resort.
//
//   const lab = createNetnsLab({ count: 3, rate: '1gbit' });
//   spawn(...lab.exec(1), 'node', ...)   // runs inside node 1, reachable at lab.nodes[1].ip
//   lab.destroy();
import { execFileSync } from 'node:child_process';

export interface NetnsNode {
  ns: string;
  ip: string;
  dev: string;
}

export interface NetnsLab {
  hub: string;
  nodes: NetnsNode[];
  /** Command prefix to run something inside node i: ['ip', 'netns', 'exec', ns]. */
  exec: (i: number) => string[];
  destroy: () => void;
}

export const netnsLimits = { nodesMax: 32, commandTimeoutMs: 10_000 } as const;

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: 'pipe', timeout: netnsLimits.commandTimeoutMs });
}

/** Null when network namespaces can be used here, else the reason (for t.skip). */
export function netnsUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'needs root: ip netns';
  const probe = `corral-probe-${process.pid}`;
  try {
    ip('netns', 'add', probe);
    ip('netns', 'del', probe);
    return null;
  } catch (err) {
    return `ip netns unavailable: ${(err as Error).message.split('\n')[0]}`;
  }
}

let labSeq = 0;

export function createNetnsLab(opts: {
  count: number;
  subnet?: string;
  rate?: string;
  tag?: string;
}): NetnsLab {
  if (opts.count < 1 || opts.count > netnsLimits.nodesMax)
    throw new Error(`createNetnsLab: count ${opts.count} must be 1..${netnsLimits.nodesMax}`);
  const tag = opts.tag ?? `c${process.pid % 100000}x${labSeq++}`;
  const subnet = opts.subnet ?? '10.213.0';
  const hub = `${tag}-hub`;
  const nodes: NetnsNode[] = [];
  const created: string[] = [];
  const destroy = () => {
    for (const ns of created.splice(0).reverse()) {
      try {
        ip('netns', 'del', ns);
      } catch {
        // already gone
      }
    }
  };
  process.once('exit', destroy);
  try {
    ip('netns', 'add', hub);
    created.push(hub);
    ip('-n', hub, 'link', 'add', 'br0', 'type', 'bridge');
    ip('-n', hub, 'link', 'set', 'br0', 'type', 'bridge', 'mcast_snooping', '0');
    ip('-n', hub, 'link', 'set', 'br0', 'up');
    for (let i = 0; i < opts.count; i++) {
      const ns = `${tag}-n${i}`;
      ip('netns', 'add', ns);
      created.push(ns);
      const inner = `cv${i}`;
      const outer = `cb${i}`;
      // Created inside the node's namespace, then one end moved to the hub: no name clash in the host.
      ip('-n', ns, 'link', 'add', inner, 'type', 'veth', 'peer', 'name', outer);
      ip('-n', ns, 'link', 'set', outer, 'netns', hub);
      ip('-n', hub, 'link', 'set', outer, 'master', 'br0');
      ip('-n', hub, 'link', 'set', outer, 'up');
      // `brd +` sets the broadcast address (udpcast's receivers say hello by broadcast).
      ip('-n', ns, 'addr', 'add', `${subnet}.${i + 1}/24`, 'brd', '+', 'dev', inner);
      ip('-n', ns, 'link', 'set', inner, 'up');
      ip('-n', ns, 'link', 'set', 'lo', 'up');
      if (opts.rate)
        execFileSync(
          'ip',
          [
            'netns',
            'exec',
            ns,
            'tc',
            'qdisc',
            'add',
            'dev',
            inner,
            'root',
            'tbf',
            'rate',
            opts.rate,
            'burst',
            '256kb',
            'latency',
            '25ms',
          ],
          { stdio: 'pipe', timeout: netnsLimits.commandTimeoutMs },
        );
      nodes.push({ ns, ip: `${subnet}.${i + 1}`, dev: inner });
    }
  } catch (err) {
    destroy();
    throw err;
  }
  return {
    hub,
    nodes,
    exec: (i) => ['ip', 'netns', 'exec', nodes[i]!.ns],
    destroy: () => {
      process.removeListener('exit', destroy);
      destroy();
    },
  };
}
