// Scenario files: a description, the cluster (nodes, resources), timed commands and
// expectations. Text form (`.scn`, one statement a line) and JSON form (same fields,
// commands and expectations as the same one-line strings), so other tools can generate them.
//
//   description A node dies; its fence device answers; web comes back on node2.
//   timings leaseTtlMs=4000 noDeviceFenceMarginMs=2000
//   node node1 cpus=4 memory=4096 labels=zone:a fence=ok watchdog
//   node node2 fence=none off
//   resource web cpus=1 memory=256 priority=10 selector=zone:a affinity=db anti=web2 restarts=3 window=60s relocations=1 prefer=node1 start=1s stop=500ms stopped
//   at 10s power node2 off
//   expect web on node1 by 25s
//   end 60s
//   disk interval=1s msgwait=4s timeout=10s     (a shared heartbeat disk, an sbd device per node)
import { z } from 'zod';
import { CorralError } from '../core/errors.js';
import { defaultTimings, nodeStates, type NodeState, type Timings } from '../core/types.js';
import { resourceIdPattern } from '../core/spec.js';
import { defaultDisk, type DiskDef } from './disk.js';

export class ScenarioError extends CorralError {
  constructor(
    readonly where: string,
    message: string,
    hint?: string,
  ) {
    super('CORRAL_SIM_SCENARIO', `${where}: ${message}`, hint);
  }
}

export type FenceMode = 'ok' | 'fail' | 'timeout';
export interface FenceDevice {
  mode: FenceMode;
  delayMs: number;
}

export interface NodeDef {
  name: string;
  cpus: number;
  memory: number;
  labels: Record<string, string>;
  /** fence devices in order; empty = none (the self-fence deadline counts) */
  fence: FenceDevice[];
  watchdog: boolean;
  /** powered off at the start */
  off: boolean;
}

export interface ResourceDef {
  id: string;
  cpus: number;
  memory: number;
  priority: number;
  selector: Record<string, string>;
  affinity: string[];
  anti: string[];
  maxRestarts: number;
  windowMs: number;
  maxRelocations: number;
  prefer?: string;
  desired: 'started' | 'stopped';
  /** simulated start and stop durations */
  startMs: number;
  stopMs: number;
}

/** node may be 'leader': the node whose agent leads when the command runs */
export type Command =
  | { type: 'power'; node: string; on: boolean }
  | { type: 'network'; node: string; mode: 'on' | 'off' | 'oneway' }
  | { type: 'delay'; node: string; ms: number }
  | { type: 'reboot'; node: string }
  | { type: 'shutdown'; node: string; leave: boolean }
  | { type: 'crash-agent'; node: string }
  | { type: 'start-agent'; node: string }
  | { type: 'freeze'; node: string }
  | { type: 'thaw'; node: string }
  | { type: 'maintenance'; node: string; on: boolean }
  /** up with revoke: the store comes back revoking every lease that expired meanwhile (etcd's paused leader resuming) */
  | { type: 'store'; mode: 'down' | 'up'; revoke?: boolean }
  /** the node loses (or gets back) its path to the heartbeat disk */
  | { type: 'disk'; node: string; lost: boolean }
  | { type: 'store-slow'; ms: number }
  | { type: 'fence'; node: string; mode: FenceMode; delayMs?: number }
  | { type: 'resource-add'; def: ResourceDef }
  | { type: 'resource'; id: string; op: 'delete' | 'start' | 'stop' | 'cleanup' }
  | { type: 'resource-move'; id: string; op: 'migrate' | 'relocate'; node: string }
  | { type: 'fault'; id: string; fault: 'start-fails'; count: number; node?: string }
  | { type: 'fault'; id: string; fault: 'crash' | 'health-fails' | 'migrate-fails' }
  | { type: 'fault'; id: string; fault: 'stop-hang'; on: boolean }
  | { type: 'cluster'; op: 'disarm' | 'arm' | 'halt' | 'halt-force' | 'form' | 'form-no-apps' }
  /** undo every fault and keep nodes powered and agents running from now on (fuzz runs end with it) */
  | { type: 'heal' };

export type Expect =
  | { type: 'on'; id: string; node: string | 'any'; negate: boolean }
  | { type: 'state'; id: string; state: 'stopped' | 'failed'; reason?: string }
  | { type: 'deleted'; id: string }
  /** started at this epoch, the record at the same epoch (nothing restarted or moved it since) */
  | { type: 'epoch'; id: string; epoch: number }
  | { type: 'converged' }
  | { type: 'node'; node: string; state: NodeState }
  | { type: 'event'; what: 'fence-ok' | 'fence-failed' | 'self-fence'; node: string; negate: boolean }
  | { type: 'leader'; node: string; negate: boolean };

export type Step =
  | { kind: 'command'; atMs: number; text: string; line: number; cmd: Command }
  | {
      kind: 'expect';
      atMs: number;
      text: string;
      line: number;
      exp: Expect;
      /** no `by`: checked at the end */ atEnd: boolean;
    };

export interface Scenario {
  name: string;
  description: string;
  timings: Timings;
  nodes: NodeDef[];
  resources: ResourceDef[];
  steps: Step[];
  endMs: number;
  seed: number;
  /** a shared heartbeat disk: every node writes a slot, an sbd device comes first in every node's fencing */
  disk?: DiskDef;
}

export const scenarioLimits = {
  nodesMax: 5000,
  resourcesMax: 20000,
  stepsMax: 10000,
  /** longest simulated run a scenario may ask for */
  endMsMax: 24 * 3600 * 1000,
};

export const defaultNode: Omit<NodeDef, 'name'> = {
  cpus: 4,
  memory: 4096,
  labels: {},
  fence: [{ mode: 'ok', delayMs: 1000 }],
  watchdog: false,
  off: false,
};

export const defaultResource: Omit<ResourceDef, 'id'> = {
  cpus: 1,
  memory: 256,
  priority: 0,
  selector: {},
  affinity: [],
  anti: [],
  maxRestarts: 3,
  windowMs: 60000,
  maxRelocations: 1,
  desired: 'started',
  startMs: 1000,
  stopMs: 500,
};

const defaultEndAfterLastMs = 60000;

// ------------------------------------------------------------------ durations

export function parseDuration(s: string, where: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)$/.exec(s);
  if (!m) throw new ScenarioError(where, `bad duration "${s}"`, 'write e.g. 500ms, 10s, 1.5s or 2m');
  const n = Number(m[1]);
  return Math.round(m[2] === 'ms' ? n : m[2] === 's' ? n * 1000 : n * 60000);
}

export function formatDuration(ms: number): string {
  if (ms % 60000 === 0 && ms >= 60000) return `${ms / 60000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  if (ms % 100 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}

// ------------------------------------------------------------------ text form

interface Ctx {
  file: string;
  line: number;
}

const w = (c: Ctx): string => `${c.file}:${c.line}`;

function kvArgs(tokens: string[], c: Ctx): { flags: Set<string>; kv: Map<string, string> } {
  const flags = new Set<string>();
  const kv = new Map<string, string>();
  for (const t of tokens) {
    const i = t.indexOf('=');
    if (i < 0) flags.add(t);
    else kv.set(t.slice(0, i), t.slice(i + 1));
  }
  for (const k of kv.keys())
    if (k === '') throw new ScenarioError(w(c), `bad argument "=${kv.get(k)}"`, 'write key=value');
  return { flags, kv };
}

function num(v: string, what: string, c: Ctx): number {
  const n = Number(v);
  if (!Number.isFinite(n) || v.trim() === '')
    throw new ScenarioError(w(c), `${what}: "${v}" is not a number`, 'write a number');
  return n;
}

function labelsOf(v: string, c: Ctx): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of v.split(',').filter(Boolean)) {
    const [k, val] = part.split(':');
    if (!k || val === undefined)
      throw new ScenarioError(w(c), `bad label "${part}"`, 'write labels=key:value,key2:value2');
    out[k] = val;
  }
  return out;
}

function fenceOf(v: string, c: Ctx): FenceDevice[] {
  if (v === 'none') return [];
  return v.split(',').map((d) => {
    const [mode, delay] = d.split('/');
    if (mode !== 'ok' && mode !== 'fail' && mode !== 'timeout')
      throw new ScenarioError(
        w(c),
        `bad fence device "${d}"`,
        'write fence=none or a list of ok|fail|timeout[/delay], e.g. fence=fail,ok/2s',
      );
    return { mode, delayMs: delay ? parseDuration(delay, w(c)) : 1000 };
  });
}

export function parseNode(tokens: string[], c: Ctx): NodeDef {
  const [name, ...rest] = tokens;
  if (!name || !/^[a-z0-9][a-z0-9._-]*$/.test(name) || name === 'leader' || name === 'any')
    throw new ScenarioError(
      w(c),
      `bad node name "${name ?? ''}"`,
      'write: node NAME [cpus=N] [memory=MiB] [labels=k:v] [fence=ok|fail|timeout|none] [watchdog] [off]',
    );
  const { flags, kv } = kvArgs(rest, c);
  const n: NodeDef = { name, ...defaultNode, labels: {}, fence: [...defaultNode.fence] };
  for (const [k, v] of kv) {
    if (k === 'cpus') n.cpus = num(v, k, c);
    else if (k === 'memory') n.memory = num(v, k, c);
    else if (k === 'labels') n.labels = labelsOf(v, c);
    else if (k === 'fence') n.fence = fenceOf(v, c);
    else
      throw new ScenarioError(
        w(c),
        `unknown node option "${k}"`,
        'options: cpus, memory, labels, fence, watchdog, off',
      );
  }
  for (const f of flags) {
    if (f === 'watchdog') n.watchdog = true;
    else if (f === 'off') n.off = true;
    else throw new ScenarioError(w(c), `unknown node flag "${f}"`, 'flags: watchdog, off');
  }
  return n;
}

export function parseResource(tokens: string[], c: Ctx): ResourceDef {
  const [id, ...rest] = tokens;
  if (!id || !resourceIdPattern.test(id))
    throw new ScenarioError(
      w(c),
      `bad resource id "${id ?? ''}"`,
      'lowercase letters, digits, ".", "_" or "-"',
    );
  const { flags, kv } = kvArgs(rest, c);
  const r: ResourceDef = { id, ...defaultResource, selector: {}, affinity: [], anti: [] };
  const list = (v: string) => v.split(',').filter(Boolean);
  for (const [k, v] of kv) {
    if (k === 'cpus') r.cpus = num(v, k, c);
    else if (k === 'memory') r.memory = num(v, k, c);
    else if (k === 'priority') r.priority = num(v, k, c);
    else if (k === 'selector') r.selector = labelsOf(v, c);
    else if (k === 'affinity') r.affinity = list(v);
    else if (k === 'anti') r.anti = list(v);
    else if (k === 'restarts') r.maxRestarts = num(v, k, c);
    else if (k === 'window') r.windowMs = parseDuration(v, w(c));
    else if (k === 'relocations') r.maxRelocations = num(v, k, c);
    else if (k === 'prefer') r.prefer = v;
    else if (k === 'start') r.startMs = parseDuration(v, w(c));
    else if (k === 'stop') r.stopMs = parseDuration(v, w(c));
    else
      throw new ScenarioError(
        w(c),
        `unknown resource option "${k}"`,
        'options: cpus, memory, priority, selector, affinity, anti, restarts, window, relocations, prefer, start, stop; flag: stopped',
      );
  }
  for (const f of flags) {
    if (f === 'stopped') r.desired = 'stopped';
    else throw new ScenarioError(w(c), `unknown resource flag "${f}"`, 'flag: stopped');
  }
  return r;
}

export function formatNode(n: NodeDef): string {
  const parts = [`node ${n.name}`, `cpus=${n.cpus}`, `memory=${n.memory}`];
  const labels = Object.entries(n.labels);
  if (labels.length) parts.push(`labels=${labels.map(([k, v]) => `${k}:${v}`).join(',')}`);
  parts.push(
    `fence=${n.fence.length === 0 ? 'none' : n.fence.map((d) => (d.delayMs === 1000 ? d.mode : `${d.mode}/${formatDuration(d.delayMs)}`)).join(',')}`,
  );
  if (n.watchdog) parts.push('watchdog');
  if (n.off) parts.push('off');
  return parts.join(' ');
}

export function formatResource(r: ResourceDef, head = 'resource'): string {
  const d = defaultResource;
  const parts = [`${head} ${r.id}`];
  if (r.cpus !== d.cpus) parts.push(`cpus=${r.cpus}`);
  if (r.memory !== d.memory) parts.push(`memory=${r.memory}`);
  if (r.priority !== d.priority) parts.push(`priority=${r.priority}`);
  const sel = Object.entries(r.selector);
  if (sel.length) parts.push(`selector=${sel.map(([k, v]) => `${k}:${v}`).join(',')}`);
  if (r.affinity.length) parts.push(`affinity=${r.affinity.join(',')}`);
  if (r.anti.length) parts.push(`anti=${r.anti.join(',')}`);
  if (r.maxRestarts !== d.maxRestarts) parts.push(`restarts=${r.maxRestarts}`);
  if (r.windowMs !== d.windowMs) parts.push(`window=${formatDuration(r.windowMs)}`);
  if (r.maxRelocations !== d.maxRelocations) parts.push(`relocations=${r.maxRelocations}`);
  if (r.prefer) parts.push(`prefer=${r.prefer}`);
  if (r.startMs !== d.startMs) parts.push(`start=${formatDuration(r.startMs)}`);
  if (r.stopMs !== d.stopMs) parts.push(`stop=${formatDuration(r.stopMs)}`);
  if (r.desired === 'stopped') parts.push('stopped');
  return parts.join(' ');
}

const nodeVerbs = new Set([
  'power',
  'network',
  'delay',
  'reboot',
  'shutdown',
  'crash',
  'start',
  'freeze',
  'thaw',
  'maintenance',
  'disk',
]);

/** Parse the text after `at T`: a command. Node-first forms (`node1 maintenance on`) are accepted too. */
export function parseCommand(text: string, c: Ctx, known: { nodes: Set<string> }): Command {
  let t = text.trim().split(/\s+/);
  // node-first: "node2 power off" -> "power node2 off"; "node2 crash agent" -> "crash agent node2"
  if (
    t.length >= 2 &&
    (known.nodes.has(t[0] as string) || t[0] === 'leader') &&
    nodeVerbs.has(t[1] as string)
  ) {
    const [node, verb, ...rest] = t as [string, string, ...string[]];
    t = verb === 'crash' || verb === 'start' ? [verb, ...rest, node] : [verb, node, ...rest];
  }
  const bad = (hint: string): never => {
    throw new ScenarioError(w(c), `cannot parse command "${text}"`, hint);
  };
  const node = (n: string | undefined): string => {
    if (!n) return bad('name a node');
    if (n !== 'leader' && !known.nodes.has(n))
      throw new ScenarioError(
        w(c),
        `unknown node "${n}"`,
        `known nodes: ${[...known.nodes].join(', ')} (or "leader")`,
      );
    return n;
  };
  const onOff = (v: string | undefined): boolean =>
    v === 'on' ? true : v === 'off' ? false : bad('write on or off');
  const [verb, a, b, ...more] = t;
  switch (verb) {
    case 'power':
      return { type: 'power', node: node(a), on: onOff(b) };
    case 'network':
      if (b !== 'on' && b !== 'off' && b !== 'oneway') return bad('network NODE on|off|oneway');
      return { type: 'network', node: node(a), mode: b };
    case 'delay':
      return { type: 'delay', node: node(a), ms: parseDuration(b ?? '', w(c)) };
    case 'reboot':
      return { type: 'reboot', node: node(a) };
    case 'shutdown':
      if (b !== undefined && b !== 'leave') return bad('shutdown NODE [leave]');
      return { type: 'shutdown', node: node(a), leave: b === 'leave' };
    case 'crash':
      if (a === 'leader' && b === undefined) return { type: 'crash-agent', node: 'leader' };
      if (a !== 'agent') return bad('crash agent NODE, or crash leader');
      return { type: 'crash-agent', node: node(b) };
    case 'start':
      if (a !== 'agent') return bad('start agent NODE');
      return { type: 'start-agent', node: node(b) };
    case 'freeze':
    case 'thaw':
      return { type: verb, node: node(a) };
    case 'maintenance':
      return { type: 'maintenance', node: node(a), on: onOff(b) };
    case 'store':
      if (a === 'up' && b === 'revoke') return { type: 'store', mode: 'up', revoke: true };
      if ((a === 'down' || a === 'up') && b === undefined) return { type: 'store', mode: a };
      if (a === 'slow') return { type: 'store-slow', ms: b ? parseDuration(b, w(c)) : 200 };
      return bad('store down|up [revoke]|slow [DURATION]');
    case 'disk':
      if (b !== 'lost' && b !== 'back') return bad('disk NODE lost|back');
      return { type: 'disk', node: node(a), lost: b === 'lost' };
    case 'fence': {
      if (b !== 'ok' && b !== 'fail' && b !== 'timeout' && b !== 'delay')
        return bad('fence NODE ok|fail|timeout|delay DURATION');
      if (b === 'delay')
        return { type: 'fence', node: node(a), mode: 'ok', delayMs: parseDuration(more[0] ?? '', w(c)) };
      return { type: 'fence', node: node(a), mode: b };
    }
    case 'resource': {
      if (!a || !resourceIdPattern.test(a))
        return bad('resource ID add|delete|start|stop|cleanup|migrate NODE|relocate NODE|fault ...');
      switch (b) {
        case 'add':
          return { type: 'resource-add', def: parseResource([a, ...more], c) };
        case 'delete':
        case 'start':
        case 'stop':
        case 'cleanup':
          return { type: 'resource', id: a, op: b };
        case 'migrate':
        case 'relocate':
          return { type: 'resource-move', id: a, op: b, node: node(more[0]) };
        case 'start-fails': {
          const count = Number(more[0] ?? '1');
          if (!Number.isInteger(count) || count < 1) return bad('resource ID start-fails N [on NODE]');
          if (more[1] === 'on')
            return { type: 'fault', id: a, fault: 'start-fails', count, node: node(more[2]) };
          return { type: 'fault', id: a, fault: 'start-fails', count };
        }
        case 'crash':
        case 'health-fails':
        case 'migrate-fails':
          return { type: 'fault', id: a, fault: b };
        case 'stop-hang':
          return {
            type: 'fault',
            id: a,
            fault: 'stop-hang',
            on: more[0] === undefined ? true : onOff(more[0]),
          };
        default:
          return bad(
            'resource ID add|delete|start|stop|cleanup|migrate NODE|relocate NODE|start-fails N|crash|health-fails|migrate-fails|stop-hang [on|off]',
          );
      }
    }
    case 'heal':
      return { type: 'heal' };
    case 'cluster':
      if (a === 'disarm' || a === 'arm') return { type: 'cluster', op: a };
      if (a === 'halt') return { type: 'cluster', op: b === 'force' ? 'halt-force' : 'halt' };
      if (a === 'form') return { type: 'cluster', op: b === 'no-apps' ? 'form-no-apps' : 'form' };
      return bad('cluster disarm|arm|halt [force]|form [no-apps]');
    default:
      return bad(
        'commands: power, network, delay, reboot, shutdown, crash agent, crash leader, start agent, freeze, thaw, maintenance, store, disk, fence, resource, cluster, heal',
      );
  }
}

/** Parse the text after `expect`. Returns the expectation and its `by` time (undefined: at the end). */
export function parseExpect(
  text: string,
  c: Ctx,
  known: { nodes: Set<string> },
): { exp: Expect; byMs?: number } {
  let t = text.trim().split(/\s+/);
  let byMs: number | undefined;
  if (t.length >= 2 && t[t.length - 2] === 'by') {
    byMs = parseDuration(t[t.length - 1] as string, w(c));
    t = t.slice(0, -2);
  }
  const bad = (hint: string): never => {
    throw new ScenarioError(w(c), `cannot parse expectation "${text}"`, hint);
  };
  const node = (n: string | undefined): string => {
    if (!n || !known.nodes.has(n))
      throw new ScenarioError(
        w(c),
        `unknown node "${n ?? ''}"`,
        `known nodes: ${[...known.nodes].join(', ')}`,
      );
    return n;
  };
  const [a, b, c2, ...rest] = t;
  if (a === 'converged' && b === undefined) return { exp: { type: 'converged' }, byMs };
  if (a === 'node') {
    const state = c2 as NodeState;
    if (!nodeStates.includes(state)) return bad(`expect node NODE ${nodeStates.join('|')} [by T]`);
    return { exp: { type: 'node', node: node(b), state }, byMs };
  }
  if (a === 'leader') {
    if (b === 'not') return { exp: { type: 'leader', node: node(c2), negate: true }, byMs };
    return { exp: { type: 'leader', node: node(b), negate: false }, byMs };
  }
  if (a === 'event' || (a === 'no' && b === 'event')) {
    const negate = a === 'no';
    const [kind, n, outcome] = negate ? [c2, rest[0], rest[1]] : [b, c2, rest[0]];
    if (kind === 'fence' && (outcome === 'ok' || outcome === 'failed'))
      return {
        exp: { type: 'event', what: outcome === 'ok' ? 'fence-ok' : 'fence-failed', node: node(n), negate },
        byMs,
      };
    if (kind === 'self-fence' && outcome === undefined)
      return { exp: { type: 'event', what: 'self-fence', node: node(n), negate }, byMs };
    return bad('expect [no] event fence NODE ok|failed, or expect [no] event self-fence NODE');
  }
  if (!a || !resourceIdPattern.test(a))
    return bad(
      'expect ID on NODE|running|stopped|failed ..., expect node ..., expect event ..., expect leader ...',
    );
  if (b === 'on') return { exp: { type: 'on', id: a, node: node(c2), negate: false }, byMs };
  if (b === 'not' && c2 === 'on')
    return { exp: { type: 'on', id: a, node: node(rest[0]), negate: true }, byMs };
  if (b === 'running') return { exp: { type: 'on', id: a, node: 'any', negate: false }, byMs };
  if (b === 'deleted') return { exp: { type: 'deleted', id: a }, byMs };
  if (b === 'epoch' && c2 !== undefined && rest.length === 0) {
    const epoch = Number(c2);
    if (!Number.isInteger(epoch) || epoch < 0) return bad(`expect ${a} epoch N [by T]`);
    return { exp: { type: 'epoch', id: a, epoch }, byMs };
  }
  if (b === 'stopped' || b === 'failed') {
    let reason: string | undefined;
    if (c2 === 'reason') reason = rest.join(' ');
    else if (c2 !== undefined) return bad(`expect ${a} ${b} [reason TEXT] [by T]`);
    return { exp: { type: 'state', id: a, state: b, reason }, byMs };
  }
  return bad(
    'expect ID on NODE | not on NODE | running | epoch N | stopped [reason TEXT] | failed [reason TEXT] [by T]',
  );
}

export function parseScenarioText(src: string, name: string, file = name): Scenario {
  const nodes: NodeDef[] = [];
  const resources: ResourceDef[] = [];
  const desc: string[] = [];
  let timings: Timings = { ...defaultTimings };
  let endMs: number | undefined;
  let seed = 1;
  let disk: DiskDef | undefined;
  let diskLine = 0;
  const raw: { ctx: Ctx; kind: 'at' | 'expect'; atMs?: number; text: string }[] = [];
  src.split('\n').forEach((lineText, i) => {
    const c: Ctx = { file, line: i + 1 };
    const line = lineText.trim();
    if (line === '' || line.startsWith('#')) return;
    const [head, ...rest] = line.split(/\s+/);
    switch (head) {
      case 'description':
        desc.push(line.slice('description'.length).trim());
        return;
      case 'timings':
        timings = parseTimings(rest, c, timings);
        return;
      case 'seed':
        seed = num(rest[0] ?? '', 'seed', c);
        return;
      case 'node':
        nodes.push(parseNode(rest, c));
        return;
      case 'resource':
        resources.push(parseResource(rest, c));
        return;
      case 'at': {
        const atMs = parseDuration(rest[0] ?? '', w(c));
        raw.push({ ctx: c, kind: 'at', atMs, text: rest.slice(1).join(' ') });
        return;
      }
      case 'expect':
        raw.push({ ctx: c, kind: 'expect', text: rest.join(' ') });
        return;
      case 'end':
        endMs = parseDuration(rest[0] ?? '', w(c));
        return;
      case 'disk':
        disk = parseDisk(rest, c);
        diskLine = c.line;
        return;
      default:
        throw new ScenarioError(
          w(c),
          `unknown statement "${head}"`,
          'statements: description, timings, seed, node, resource, disk, at, expect, end',
        );
    }
  });
  const scn = finish(name, file, desc.join(' '), timings, nodes, resources, raw, endMs, seed);
  if (disk) {
    const c: Ctx = { file, line: diskLine };
    // the rules `corral agent` and the fence config enforce for a real sbd device
    if (disk.msgwaitMs < timings.noDeviceFenceMarginMs)
      throw new ScenarioError(
        w(c),
        `msgwait ${disk.msgwaitMs} ms is less than timings noDeviceFenceMarginMs (${timings.noDeviceFenceMarginMs})`,
        'a silent slot must prove at least what the self-fence deadline proves: raise msgwait',
      );
    if (!(disk.msgwaitMs < disk.timeoutMs))
      throw new ScenarioError(
        w(c),
        `msgwait ${disk.msgwaitMs} ms must be less than timeout ${disk.timeoutMs} ms`,
        'raise timeout or lower msgwait',
      );
    scn.disk = disk;
  } else {
    const s = scn.steps.find((st) => st.kind === 'command' && st.cmd.type === 'disk');
    if (s)
      throw new ScenarioError(
        `${file}:${s.line}`,
        `"${s.text}" but the scenario has no heartbeat disk`,
        'add a line: disk [interval=1s] [msgwait=4s] [timeout=10s]',
      );
  }
  return scn;
}

function parseDisk(tokens: string[], c: Ctx): DiskDef {
  const { flags, kv } = kvArgs(tokens, c);
  const d: DiskDef = { ...defaultDisk };
  for (const [k, v] of kv) {
    if (k === 'interval') d.intervalMs = parseDuration(v, w(c));
    else if (k === 'msgwait') d.msgwaitMs = parseDuration(v, w(c));
    else if (k === 'timeout') d.timeoutMs = parseDuration(v, w(c));
    else throw new ScenarioError(w(c), `unknown disk option "${k}"`, 'options: interval, msgwait, timeout');
  }
  if (flags.size > 0)
    throw new ScenarioError(
      w(c),
      `unknown disk flag "${[...flags][0]}"`,
      'write: disk [interval=1s] [msgwait=4s] [timeout=10s]',
    );
  if (!(d.intervalMs > 0))
    throw new ScenarioError(w(c), 'disk interval must be positive', 'e.g. interval=1s');
  return d;
}

export function formatDisk(d: DiskDef): string {
  return `disk interval=${formatDuration(d.intervalMs)} msgwait=${formatDuration(d.msgwaitMs)} timeout=${formatDuration(d.timeoutMs)}`;
}

function parseTimings(tokens: string[], c: Ctx, base: Timings): Timings {
  const out = { ...base };
  for (const t of tokens) {
    const [k, v] = t.split('=');
    if (!k || v === undefined || !(k in defaultTimings))
      throw new ScenarioError(
        w(c),
        `bad timing "${t}"`,
        `write NAME=MS with NAME one of ${Object.keys(defaultTimings).join(', ')}`,
      );
    out[k as keyof Timings] = /[a-z]$/.test(v) ? parseDuration(v, w(c)) : num(v, k, c);
  }
  return out;
}

function finish(
  name: string,
  file: string,
  description: string,
  timings: Timings,
  nodes: NodeDef[],
  resources: ResourceDef[],
  raw: { ctx: Ctx; kind: 'at' | 'expect'; atMs?: number; text: string }[],
  endMsIn: number | undefined,
  seed: number,
): Scenario {
  const where = `${file}`;
  if (nodes.length === 0)
    throw new ScenarioError(where, 'no node defined', 'add at least one line: node NAME');
  if (nodes.length > scenarioLimits.nodesMax)
    throw new ScenarioError(where, `more than ${scenarioLimits.nodesMax} nodes`, 'fewer nodes');
  if (resources.length > scenarioLimits.resourcesMax)
    throw new ScenarioError(where, `more than ${scenarioLimits.resourcesMax} resources`, 'fewer resources');
  const names = new Set<string>();
  for (const n of nodes) {
    if (names.has(n.name))
      throw new ScenarioError(where, `node ${n.name} defined twice`, 'one line per node');
    names.add(n.name);
  }
  const ids = new Set<string>();
  for (const r of resources) {
    if (ids.has(r.id))
      throw new ScenarioError(where, `resource ${r.id} defined twice`, 'one line per resource');
    ids.add(r.id);
  }
  if (raw.length > scenarioLimits.stepsMax)
    throw new ScenarioError(where, `more than ${scenarioLimits.stepsMax} steps`, 'fewer steps');
  const known = { nodes: names };
  const steps: Step[] = [];
  let lastMs = 0;
  for (const r of raw) {
    if (r.kind === 'at') {
      const cmd = parseCommand(r.text, r.ctx, known);
      steps.push({ kind: 'command', atMs: r.atMs ?? 0, text: r.text, line: r.ctx.line, cmd });
      lastMs = Math.max(lastMs, r.atMs ?? 0);
    } else {
      const { exp, byMs } = parseExpect(r.text, r.ctx, known);
      steps.push({
        kind: 'expect',
        atMs: byMs ?? -1,
        text: r.text,
        line: r.ctx.line,
        exp,
        atEnd: byMs === undefined,
      });
      if (byMs !== undefined) lastMs = Math.max(lastMs, byMs);
    }
  }
  const endMs = endMsIn ?? lastMs + defaultEndAfterLastMs;
  if (endMs > scenarioLimits.endMsMax)
    throw new ScenarioError(where, `end ${endMs} ms is too long`, `at most ${scenarioLimits.endMsMax} ms`);
  for (const s of steps) {
    if (s.kind === 'expect' && s.atEnd) s.atMs = endMs;
    if (s.atMs > endMs)
      throw new ScenarioError(
        `${file}:${s.line}`,
        `step at ${s.atMs} ms is after the end (${endMs} ms)`,
        'move `end` later',
      );
  }
  return { name, description, timings, nodes, resources, steps, endMs, seed };
}

// ------------------------------------------------------------------ JSON form

const JsonNode = z.strictObject({
  name: z.string(),
  cpus: z.number().positive().optional(),
  memory: z.number().positive().optional(),
  labels: z.record(z.string(), z.string()).optional(),
  /** e.g. ["fail", "ok/2s"]; [] = no device */
  fence: z.array(z.string()).optional(),
  watchdog: z.boolean().optional(),
  off: z.boolean().optional(),
});

const JsonScenario = z.strictObject({
  description: z.string().default(''),
  seed: z.number().int().optional(),
  timings: z.record(z.string(), z.number()).optional(),
  nodes: z.array(JsonNode).min(1),
  /** each resource as its text line without the word "resource", e.g. "web cpus=1 prefer=node1" */
  resources: z.array(z.string()).default([]),
  /** "at 10s power node2 off", "expect web on node1 by 25s" */
  steps: z.array(z.string()).default([]),
  end: z.string().optional(),
  /** a shared heartbeat disk: its options as on the text line, e.g. "interval=1s msgwait=4s" ("" = defaults) */
  disk: z.string().optional(),
});
export type JsonScenario = z.input<typeof JsonScenario>;

export function parseScenarioJson(src: string, name: string, file = name): Scenario {
  let data: unknown;
  try {
    data = JSON.parse(src);
  } catch (e) {
    throw new ScenarioError(file, `not valid JSON: ${(e as Error).message}`, 'fix the JSON syntax');
  }
  const p = JsonScenario.safeParse(data);
  if (!p.success) {
    const i = p.error.issues[0];
    throw new ScenarioError(
      `${file}: ${i?.path.join('.') ?? ''}`,
      i?.message ?? 'invalid',
      'see README "corral sim" for the JSON form',
    );
  }
  const j = p.data;
  const lines: string[] = [];
  if (j.description) lines.push(`description ${j.description}`);
  if (j.seed !== undefined) lines.push(`seed ${j.seed}`);
  if (j.timings)
    lines.push(
      `timings ${Object.entries(j.timings)
        .map(([k, v]) => `${k}=${v}`)
        .join(' ')}`,
    );
  for (const n of j.nodes) {
    const parts = [`node ${n.name}`];
    if (n.cpus !== undefined) parts.push(`cpus=${n.cpus}`);
    if (n.memory !== undefined) parts.push(`memory=${n.memory}`);
    if (n.labels)
      parts.push(
        `labels=${Object.entries(n.labels)
          .map(([k, v]) => `${k}:${v}`)
          .join(',')}`,
      );
    if (n.fence) parts.push(`fence=${n.fence.length === 0 ? 'none' : n.fence.join(',')}`);
    if (n.watchdog) parts.push('watchdog');
    if (n.off) parts.push('off');
    lines.push(parts.join(' '));
  }
  if (j.disk !== undefined) lines.push(`disk ${j.disk}`);
  for (const r of j.resources) lines.push(`resource ${r}`);
  for (const s of j.steps) lines.push(s);
  if (j.end) lines.push(`end ${j.end}`);
  return parseScenarioText(lines.join('\n'), name, file);
}

export function parseScenario(src: string, name: string, file = name): Scenario {
  return src.trimStart().startsWith('{')
    ? parseScenarioJson(src, name, file)
    : parseScenarioText(src, name, file);
}

/** Back to the text form (used for fuzz reproductions). */
export function formatScenario(s: Scenario): string {
  const lines: string[] = [];
  if (s.description) lines.push(`description ${s.description}`);
  lines.push(`seed ${s.seed}`);
  const t = Object.entries(s.timings).filter(([k, v]) => defaultTimings[k as keyof Timings] !== v);
  if (t.length) lines.push(`timings ${t.map(([k, v]) => `${k}=${v}`).join(' ')}`);
  for (const n of s.nodes) lines.push(formatNode(n));
  if (s.disk) lines.push(formatDisk(s.disk));
  for (const r of s.resources) lines.push(formatResource(r));
  for (const st of s.steps) {
    if (st.kind === 'command') lines.push(`at ${formatDuration(st.atMs)} ${st.text}`);
    else lines.push(`expect ${st.text}`);
  }
  lines.push(`end ${formatDuration(s.endMs)}`);
  return lines.join('\n') + '\n';
}
