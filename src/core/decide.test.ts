// Unit tests of the pure manager decision: each case builds one view and checks the actions.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { decide, storeReturnGraceMs } from './decide.js';
import { ResourceSpec, type ResourceSpecInput } from './spec.js';
import {
  defaultFlags,
  defaultTimings,
  type Action,
  type AgentStatus,
  type ClusterView,
  type NodeState,
  type NodeView,
  type ResourceRecord,
  type ResourceView,
} from './types.js';

const t0 = 1_000_000;

function node(
  name: string,
  state: NodeState,
  o: Partial<Omit<NodeView, 'alive'>> & { alive?: boolean } = {},
): NodeView {
  const { alive, ...rest } = o;
  return {
    name,
    reg: {
      name,
      address: '127.0.0.1',
      capacity: { cpus: 4, memory: 1024 },
      labels: {},
      incarnation: 1,
      left: false,
      sinceMs: 0,
    },
    alive: alive === false ? undefined : { incarnation: 1, ready: true },
    admin: { maintenance: state === 'maintenance' },
    status: { state, reason: '', sinceMs: t0 - 1000, incarnation: 1, fenceAttempts: 0, lostAtMs: t0 - 1000 },
    fenceDevices: 1,
    ...rest,
  };
}

function spec(id: string, o: Partial<ResourceSpecInput> = {}): ResourceSpec {
  return ResourceSpec.parse({ id, process: { command: ['/bin/true'] }, memory: 256, ...o });
}

function rec(id: string, nodeName: string | null, o: Partial<ResourceRecord> = {}): ResourceRecord {
  return {
    id,
    state: 'started',
    reason: '',
    node: nodeName,
    run: true,
    epoch: 3,
    sinceMs: 0,
    failures: [],
    relocations: 0,
    ...o,
  };
}

function status(epoch: number, state: AgentStatus['state'], reason = ''): AgentStatus {
  return { epoch, state, reason, sinceMs: t0 };
}

function view(nodes: NodeView[], resources: ResourceView[], o: Partial<ClusterView> = {}): ClusterView {
  return {
    nowMs: t0,
    term: 1,
    timings: defaultTimings,
    flags: defaultFlags,
    self: nodes[0]?.name ?? 'n1',
    nodes: new Map(nodes.map((n) => [n.name, n])),
    resources: new Map(resources.map((r) => [r.id, r])),
    fencing: new Set(),
    ...o,
  };
}

const setRes = (acts: Action[], id: string) =>
  acts.find((a): a is Extract<Action, { type: 'setResource' }> => a.type === 'setResource' && a.id === id)
    ?.next;
const setNode = (acts: Action[], n: string) =>
  acts.find((a): a is Extract<Action, { type: 'setNode' }> => a.type === 'setNode' && a.node === n)?.next;

describe('decide: fencing before recovery', () => {
  it('a node whose lease is gone becomes unknown, and its resources wait', () => {
    const r: ResourceView = {
      id: 'web',
      spec: spec('web'),
      rec: rec('web', 'n2'),
      statuses: new Map([['n2', status(3, 'started')]]),
    };
    const acts = decide(view([node('n1', 'online'), node('n2', 'online', { alive: false })], [r]));
    assert.equal(setNode(acts, 'n2')?.state, 'unknown');
    const next = setRes(acts, 'web');
    assert.equal(next?.state, 'recovering');
    assert.equal(next?.node, 'n2', 'not moved before the fence');
  });

  it('fencing runs the devices; recovery waits while they fail', () => {
    const n2 = node('n2', 'fencing', { alive: false });
    const acts = decide(view([node('n1', 'online'), n2], []));
    assert.ok(acts.some((a) => a.type === 'fence' && a.node === 'n2'));
    assert.equal(setNode(acts, 'n2')?.fenceAttempts, 1);
    const attempt = acts.find((a) => a.type === 'setNode' && a.node === 'n2');
    assert.equal(
      attempt?.type === 'setNode' ? attempt.event : 'none',
      undefined,
      'no fencing -> fencing event',
    );
    assert.ok(acts.some((a) => a.type === 'fence' && a.event.action === 'fence-start'));
    // a failed fence record does not make the node fenced
    const failed = {
      ...n2,
      fence: { node: 'n2', incarnation: 1, ok: false, device: 'ipmi', error: 'timeout', atMs: t0, term: 1 },
    };
    failed.status = { ...failed.status!, fenceAttempts: 1, nextFenceAtMs: t0 + 5000 };
    const acts2 = decide(view([node('n1', 'online'), failed], []));
    assert.equal(acts2.length, 0, 'nothing until the back-off ends');
  });

  it('a successful fence record makes the node fenced, then its resources move with a new epoch', () => {
    const n2 = node('n2', 'fencing', {
      alive: false,
      fence: { node: 'n2', incarnation: 1, ok: true, device: 'ipmi', atMs: t0, term: 1 },
    });
    const r: ResourceView = {
      id: 'web',
      spec: spec('web'),
      rec: rec('web', 'n2', { state: 'recovering' }),
      statuses: new Map(),
    };
    const acts = decide(view([node('n1', 'online'), n2], [r]));
    assert.equal(setNode(acts, 'n2')?.state, 'fenced');
    const next = setRes(acts, 'web');
    assert.equal(next?.node, 'n1');
    assert.equal(next?.epoch, 4);
    assert.equal(next?.run, true);
  });

  it('a fence record older than the loss does not count', () => {
    const n2 = node('n2', 'fencing', {
      alive: false,
      fence: { node: 'n2', incarnation: 1, ok: true, device: 'ipmi', atMs: t0 - 5000, term: 1 },
    });
    const acts = decide(view([node('n1', 'online'), n2], []));
    assert.notEqual(setNode(acts, 'n2')?.state, 'fenced');
  });

  it('without a device, the node is fenced only after the self-fence deadline plus margin', () => {
    const n2 = node('n2', 'fencing', { alive: false, fenceDevices: 0 });
    n2.status = { ...n2.status!, lostAtMs: t0 - defaultTimings.noDeviceFenceMarginMs + 1 };
    assert.equal(decide(view([node('n1', 'online'), n2], [])).length, 0);
    n2.status = { ...n2.status, lostAtMs: t0 - defaultTimings.noDeviceFenceMarginMs };
    const acts = decide(view([node('n1', 'online'), n2], []));
    assert.equal(setNode(acts, 'n2')?.state, 'fenced');
    assert.ok(acts.some((a) => a.type === 'fenceRecord' && a.record.device === 'self-fence deadline'));
  });

  it('after a store outage, a vanished lease gets a grace to be taken again before fencing', () => {
    const n2 = node('n2', 'unknown', { alive: false });
    n2.status = { ...n2.status!, lostAtMs: t0 - 100 };
    const grace = storeReturnGraceMs(defaultTimings);
    const back = { storeBackAtMs: t0 - grace + 1 };
    assert.deepEqual(decide(view([node('n1', 'online'), n2], [], back)), [], 'no fencing within the grace');
    const later = decide(view([node('n1', 'online'), n2], [], { storeBackAtMs: t0 - grace }));
    assert.equal(setNode(later, 'n2')?.state, 'fencing', 'fenced once the grace is over');
    // the same agent puts its alive key back (same incarnation): online, nothing fenced
    const again = decide(view([node('n1', 'online'), node('n2', 'unknown')], [], back));
    assert.equal(setNode(again, 'n2')?.state, 'online');
    assert.match(setNode(again, 'n2')?.reason ?? '', /same agent/);
    // no outage seen: fencing starts at once
    assert.equal(setNode(decide(view([node('n1', 'online'), n2], [])), 'n2')?.state, 'fencing');
  });

  it('a disarmed cluster neither fences nor recovers', () => {
    const n2 = node('n2', 'unknown', { alive: false });
    const r: ResourceView = { id: 'web', spec: spec('web'), rec: rec('web', 'n2'), statuses: new Map() };
    const acts = decide(view([node('n1', 'online'), n2], [r], { flags: { ...defaultFlags, armed: false } }));
    assert.ok(!acts.some((a) => a.type === 'fence'));
    assert.notEqual(setNode(acts, 'n2')?.state, 'fencing');
    assert.equal(setRes(acts, 'web')?.node ?? 'n2', 'n2');
  });
});

describe('decide: placement', () => {
  it('places by priority when capacity is short; the rest stay stopped with reason capacity', () => {
    const rs = ['lo', 'hi', 'mid'].map((id, i): ResourceView => ({
      id,
      spec: spec(id, { memory: 600, priority: [0, 100, 50][i] }),
      statuses: new Map(),
    }));
    const acts = decide(view([node('n1', 'online'), node('n2', 'online')], rs));
    assert.ok(setRes(acts, 'hi')?.node);
    assert.ok(setRes(acts, 'mid')?.node);
    assert.notEqual(setRes(acts, 'hi')?.node, setRes(acts, 'mid')?.node);
    assert.equal(setRes(acts, 'lo')?.state, 'stopped');
    assert.match(setRes(acts, 'lo')?.reason ?? '', /^capacity/);
  });

  it('respects labels and anti-affinity', () => {
    const nodes = [node('n1', 'online'), node('n2', 'online')];
    nodes[1]!.reg!.labels = { disk: 'ssd' };
    const a: ResourceView = {
      id: 'a',
      spec: spec('a', { nodeSelector: { disk: 'ssd' } }),
      statuses: new Map(),
    };
    const b: ResourceView = {
      id: 'b',
      spec: spec('b', { antiAffinity: ['a'], nodeSelector: { disk: 'ssd' } }),
      statuses: new Map(),
    };
    const acts = decide(view(nodes, [a, b]));
    assert.equal(setRes(acts, 'a')?.node, 'n2');
    assert.equal(setRes(acts, 'b')?.state, 'stopped');
    assert.match(setRes(acts, 'b')?.reason ?? '', /constraints/);
  });

  it('moves resources off a node in maintenance by stopping them first', () => {
    const r: ResourceView = {
      id: 'web',
      spec: spec('web'),
      rec: rec('web', 'n2'),
      statuses: new Map([['n2', status(3, 'started')]]),
    };
    const acts = decide(view([node('n1', 'online'), node('n2', 'maintenance')], [r]));
    const next = setRes(acts, 'web');
    assert.equal(next?.state, 'stopping');
    assert.equal(next?.run, false);
    assert.equal(next?.node, 'n2');
  });
});

describe('decide: restart limits', () => {
  const failing = (failures: ResourceRecord['failures'], relocations = 0): ResourceView => ({
    id: 'app',
    spec: spec('app', { restart: { maxRestarts: 2, windowMs: 60000, maxRelocations: 1 } }),
    rec: rec('app', 'n1', { failures, relocations }),
    statuses: new Map([['n1', status(3, 'failed', 'exit code 1')]]),
  });
  const nodes = () => [node('n1', 'online'), node('n2', 'online')];

  it('restarts in place with a new epoch', () => {
    const next = setRes(decide(view(nodes(), [failing([])])), 'app');
    assert.equal(next?.node, 'n1');
    assert.equal(next?.epoch, 4);
    assert.match(next?.reason ?? '', /restart 1\/2/);
  });

  it('relocates once the in-place restarts are used up', () => {
    const f = [1, 2].map((i) => ({ node: 'n1', atMs: t0 - i * 1000, reason: 'x' }));
    const next = setRes(decide(view(nodes(), [failing(f)])), 'app');
    assert.equal(next?.node, 'n2');
    assert.equal(next?.relocations, 1);
  });

  it('fails once relocations are used up, and heals after the quiet period', () => {
    const f = [1, 2].map((i) => ({ node: 'n1', atMs: t0 - i * 1000, reason: 'x' }));
    const next = setRes(decide(view(nodes(), [failing(f, 1)])), 'app');
    assert.equal(next?.state, 'failed');
    const healed: ResourceView = {
      id: 'app',
      spec: spec('app'),
      rec: rec('app', 'n1', {
        state: 'failed',
        run: false,
        failures: [{ node: 'n1', atMs: t0 - defaultTimings.failureExpiryMs - 1, reason: 'x' }],
      }),
      statuses: new Map([['n1', status(3, 'stopped')]]),
    };
    const again = setRes(decide(view(nodes(), [healed])), 'app');
    assert.equal(again?.state, 'starting');
    assert.equal(again?.failures.length, 0);
  });
});

describe('decide: live migration hand-over', () => {
  const vm = (o: Partial<ResourceRecord>, statuses: [string, AgentStatus][]): ResourceView => ({
    id: 'vm1',
    spec: ResourceSpec.parse({ id: 'vm1', kind: 'vm', vm: { memory: 64 }, memory: 64, preferredNode: 'n2' }),
    rec: rec('vm1', 'n1', o),
    statuses: new Map(statuses),
  });
  const m = {
    source: 'n1',
    target: 'n2',
    targetEpoch: 4,
    startedAtMs: t0,
    deadlineMs: t0 + 60000,
    reason: 'preferred',
  };
  const nodes = () => [node('n1', 'online'), node('n2', 'online')];

  it('a move of a VM starts a migration instead of a stop', () => {
    const next = setRes(decide(view(nodes(), [vm({}, [['n1', status(3, 'started')]])])), 'vm1');
    assert.equal(next?.state, 'migrating');
    assert.equal(next?.migration?.target, 'n2');
    assert.equal(next?.migration?.targetEpoch, 4);
    assert.equal(next?.run, true, 'the source keeps running');
  });

  it('prepare -> transfer once the target listens', () => {
    const inc = { ...status(4, 'incoming'), incoming: { host: '127.0.0.2', port: 4444 } };
    const r = vm({ state: 'migrating', migration: { ...m, phase: 'prepare' } }, [
      ['n1', status(3, 'started')],
      ['n2', inc],
    ]);
    const next = setRes(decide(view(nodes(), [r])), 'vm1');
    assert.equal(next?.migration?.phase, 'transfer');
    assert.deepEqual(next?.migration?.incoming, { host: '127.0.0.2', port: 4444 });
  });

  it('ownership moves only on the source report "migrated"', () => {
    const r = vm({ state: 'migrating', migration: { ...m, phase: 'transfer' } }, [
      ['n1', status(3, 'migrating')],
      ['n2', status(4, 'incoming')],
    ]);
    assert.equal(setRes(decide(view(nodes(), [r])), 'vm1'), undefined);
    r.statuses.set('n1', status(3, 'migrated'));
    const next = setRes(decide(view(nodes(), [r])), 'vm1');
    assert.equal(next?.node, 'n2');
    assert.equal(next?.epoch, 4);
    assert.equal(next?.migration, undefined);
  });

  it('an abort waits for the target copy to be gone before the record is clean', () => {
    const err = { ...status(3, 'started'), migrateError: { targetEpoch: 4, reason: 'connection reset' } };
    const r = vm({ state: 'migrating', migration: { ...m, phase: 'transfer' } }, [
      ['n1', err],
      ['n2', status(4, 'incoming')],
    ]);
    const a1 = setRes(decide(view(nodes(), [r])), 'vm1');
    assert.equal(a1?.migration?.phase, 'abort');
    r.rec = a1;
    assert.equal(setRes(decide(view(nodes(), [r])), 'vm1'), undefined, 'target copy still there');
    r.statuses.set('n2', status(4, 'stopped'));
    const a2 = setRes(decide(view(nodes(), [r])), 'vm1');
    assert.equal(a2?.migration, undefined);
    assert.equal(a2?.node, 'n1');
    assert.equal(a2?.epoch, 3);
    // a retry never reuses the aborted target epoch
    r.rec = a2;
    r.statuses.set('n1', status(3, 'started'));
    const a3 = setRes(decide(view(nodes(), [r])), 'vm1');
    assert.equal(a3?.migration?.targetEpoch, 5);
  });

  it('a source lost mid-transfer: the target owns the guest only if it already runs it', () => {
    const r = vm({ state: 'migrating', migration: { ...m, phase: 'transfer' } }, [
      ['n1', status(3, 'migrating')],
      ['n2', status(4, 'incoming')],
    ]);
    const lost = [node('n1', 'unknown', { alive: false }), node('n2', 'online')];
    assert.equal(setRes(decide(view(lost, [r], { self: 'n2' })), 'vm1')?.migration?.phase, 'abort');
    r.statuses.set('n2', status(4, 'started'));
    const next = setRes(decide(view(lost, [r], { self: 'n2' })), 'vm1');
    assert.equal(next?.node, 'n2');
  });
});
