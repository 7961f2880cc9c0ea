// The simulated world: nodes (power, network, agents), the store, resources' processes,
// fence devices and watchdogs, all on one virtual clock. The agent and manager are the
// production code (src/agent, src/manager) talking to simulated I/O. Invariants are
// checked as the world changes (every process start, every store commit) and at the end.
import { Agent } from '../agent/agent.js';
import type {
  Driver,
  DriverEvent,
  Env,
  FenceOutcome,
  Fencer,
  LocalResource,
  Watchdog,
} from '../env/types.js';
import { makeRng, type Rng } from '../core/rng.js';
import { keys as keysOf } from '../core/keys.js';
import type { ResourceSpec, ResourceSpecInput } from '../core/spec.js';
import type {
  AgentStatus,
  ClusterEvent,
  ClusterFlags,
  FenceRecord,
  NodeStatus,
  ResourceRecord,
} from '../core/types.js';
import { defaultFlags } from '../core/types.js';
import { StoreError, type WatchEvent } from '../store/types.js';
import { EventQueue, Owner, drainMicrotasks, type DrainMode } from './queue.js';
import { SimStoreClient, SimStoreCore, type Link } from './store.js';
import type { Command, Expect, NodeDef, ResourceDef, Scenario } from './scenario.js';
import { formatEntry, type LogEntry } from './log.js';
import { SimDisk, SimDiskMonitor, fenceSbdSim, vouchMsOf } from './disk.js';

export const simCluster = 'sim';

export const worldLimits = {
  /** trace lines kept for a violation report */
  traceLinesMax: 400,
  /** trace lines printed with a violation */
  traceLinesShown: 60,
  /** a node's agent starts this long after power on */
  bootMs: 1000,
  /** an agent whose start() failed is restarted (systemd Restart=) after this long */
  agentRestartMs: 1000,
  /** one-way latency of every store call */
  storeLatencyMs: 1,
  /** store calls from a cut-off node fail after this long */
  storeOpTimeoutMs: 2000,
  /** killing processes at once (self-fence, power off) */
  killMs: 1,
};

export interface Violation {
  atMs: number;
  message: string;
  /** last lines of the trace (log entries and agent log lines) */
  trace: string[];
  /** the world's state when it happened */
  state: string;
}

export interface ExpectResult {
  line: number;
  text: string;
  atMs: number;
  ok: boolean;
  detail: string;
}

type ProcEnd = 'stop' | 'crash' | 'killed' | 'node-death' | 'start-failed';

interface Proc {
  id: string;
  node: string;
  epoch: number;
  state: LocalResource['state'];
  reason: string;
  spawnedAtMs: number;
  endedAtMs?: number;
  endedBy?: ProcEnd;
  startWaiters: { owner: Owner; resolve: (l: LocalResource) => void }[];
  stopWaiters: { owner: Owner; resolve: (l: LocalResource) => void }[];
}

const alive = (p: Proc | undefined): boolean =>
  !!p && (p.state === 'starting' || p.state === 'started' || p.state === 'stopping');

interface AgentRun {
  owner: Owner;
  agent: Agent;
  store: SimStoreClient;
  driver: SimDriverView;
}

export class SimNode {
  powered: boolean;
  network: 'on' | 'off' | 'oneway' = 'on';
  delayMs = 0;
  readonly procs = new Map<string, Proc>();
  agent: AgentRun | undefined;
  agentCount = 0;
  frozen = false;
  watchdogCancel: (() => void) | undefined;
  readonly def: NodeDef;
  constructor(def: NodeDef) {
    // a copy: fence commands change it during the run, the scenario must stay as written
    this.def = { ...def, labels: { ...def.labels }, fence: def.fence.map((d) => ({ ...d })) };
    this.powered = !def.off;
  }
  get name(): string {
    return this.def.name;
  }
}

interface Faults {
  startFails: number;
  startFailsOn?: string;
  /** next start on a node other than the current one fails once */
  migrateFails: boolean;
  stopHang: boolean;
}

export class World {
  readonly q = new EventQueue();
  readonly core = new SimStoreCore(this.q);
  readonly k = keysOf(simCluster);
  readonly nodes = new Map<string, SimNode>();
  readonly defs = new Map<string, ResourceDef>();
  readonly faults = new Map<string, Faults>();
  readonly log: LogEntry[] = [];
  readonly violations: Violation[] = [];
  readonly expectations: ExpectResult[] = [];
  private readonly trace: string[] = [];
  private readonly rng: Rng;
  private readonly operator: SimStoreClient;
  storeSlowMs = 0;
  /** the last process of each resource that ran on some node (for the fence-before-recovery check) */
  private readonly lastProc = new Map<string, Proc>();
  /** store-derived facts for the checks */
  private readonly nstate = new Map<string, NodeStatus>();
  private readonly assign = new Map<string, ResourceRecord>();
  private readonly fenceOk = new Map<string, number[]>();
  private readonly stoppedReports = new Map<string, { epoch: number; atMs: number }>();
  private lastTerm = 0;
  leader: string | undefined;
  /** after `heal`: a repair crew powers nodes back on and keeps agents running */
  healing = false;
  drain: DrainMode = 'micro';
  /** the shared heartbeat disk, when the scenario has one */
  readonly disk: SimDisk | undefined;

  constructor(readonly scn: Scenario) {
    this.rng = makeRng(scn.seed);
    for (const d of scn.nodes) this.nodes.set(d.name, new SimNode(d));
    this.disk = scn.disk
      ? new SimDisk(
          scn.disk,
          this.q,
          scn.nodes.map((d) => d.name),
        )
      : undefined;
    this.operator = new SimStoreClient(this.core, {
      opTimeoutMs: worldLimits.storeOpTimeoutMs,
      url: 'sim:operator',
    });
    this.core.onCommit = (rev, evs) => this.onCommit(rev, evs);
  }

  // ------------------------------------------------------------------ running

  /** Run the scenario to its end (or the first violation when stopOnViolation). */
  async run(opts: { stopOnViolation?: boolean; untilMs?: number } = {}): Promise<void> {
    const stop = opts.stopOnViolation ?? true;
    const untilMs = opts.untilMs ?? this.scn.endMs;
    installRejectionHandler();
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    current = this;
    try {
      while (this.q.step(untilMs)) {
        await drainMicrotasks(this.drain);
        if (stop && this.violations.length > 0) break;
      }
      if (this.violations.length === 0) this.q.advanceTo(untilMs);
    } catch (e) {
      this.violation(`engine error (thrown from an event): ${errText(e)}`);
    }
    // a macrotask boundary: Node reports unhandled rejections while this world is still current
    await new Promise((resolve) => setImmediate(resolve));
  }

  /** an unhandled rejection in agent or manager code is an engine bug (it kills a real agent) */
  onRejection(e: unknown): void {
    this.violation(`engine error (unhandled rejection, would crash the agent): ${errText(e)}`);
  }

  /** Set up the cluster and schedule every scenario step. */
  setup(): void {
    for (const r of this.scn.resources) this.defineResource(r);
    let i = 0;
    for (const n of this.nodes.values()) {
      if (n.powered) this.q.at(i++ * 10, () => this.startAgent(n));
    }
    for (const s of this.scn.steps) {
      if (s.kind === 'command') this.q.at(s.atMs, () => this.command(s.cmd, s.text));
      else this.q.at(s.atMs, () => this.checkExpect(s.exp, s.text, s.line));
    }
  }

  private defineResource(def: ResourceDef): void {
    this.defs.set(def.id, def);
    this.core.txn({
      compare: [],
      success: [{ type: 'put', key: this.k.resource(def.id), value: JSON.stringify(specOf(def)) }],
    });
  }

  // ------------------------------------------------------------------ logging

  entry(e: Omit<LogEntry, 't'>): void {
    const full: LogEntry = { t: this.q.nowMs(), ...e };
    this.log.push(full);
    this.traceLine(formatEntry(full));
  }

  traceLine(line: string): void {
    if (traceAll) process.stderr.write(`${line}\n`);
    this.trace.push(line);
    if (this.trace.length > worldLimits.traceLinesMax)
      this.trace.splice(0, this.trace.length - worldLimits.traceLinesMax);
  }

  violation(message: string): void {
    this.entry({ type: 'violation', reason: message });
    this.violations.push({
      atMs: this.q.nowMs(),
      message,
      trace: this.trace.slice(-worldLimits.traceLinesShown),
      state: this.describe(),
    });
  }

  /** a readable dump of the world: nodes, processes, records */
  describe(): string {
    const lines: string[] = [
      `t=${this.q.nowMs()}ms leader=${this.leader ?? '-'} store=${this.core.down ? 'down' : 'up'}`,
    ];
    for (const n of this.nodes.values()) {
      const ns = this.nstate.get(n.name);
      const procs = [...n.procs.values()].filter(alive).map((p) => `${p.id}@${p.epoch}:${p.state}`);
      lines.push(
        `node ${n.name}: power=${n.powered ? 'on' : 'off'} net=${n.network} agent=${n.agent ? (n.frozen ? 'frozen' : n.agent.agent.phase) : 'none'} state=${ns?.state ?? '-'} procs=[${procs.join(' ')}]`,
      );
    }
    for (const [id, r] of [...this.assign].sort()) {
      lines.push(
        `resource ${id}: ${r.state} node=${r.node ?? '-'} run=${r.run} epoch=${r.epoch} | ${r.reason}`,
      );
    }
    return lines.join('\n');
  }

  // ------------------------------------------------------------------ store observation (log + checks)

  private onCommit(_rev: number, evs: WatchEvent[]): void {
    const p = this.k.prefix;
    for (const e of evs) {
      const key = e.kv.key;
      if (!key.startsWith(p)) continue;
      const rest = key.slice(p.length);
      if (rest.startsWith('nstate/')) this.onNodeState(rest.slice(7), e);
      else if (rest.startsWith('assign/')) this.onAssign(rest.slice(7), e);
      else if (rest.startsWith('fence/') && e.type === 'put') this.onFence(rest.slice(6), e.kv.value);
      else if (rest === 'leader') this.onLeader(e);
      else if (rest === 'term' && e.type === 'put') {
        const term = Number(e.kv.value);
        if (!(term > this.lastTerm))
          this.violation(`leader term did not grow: ${this.lastTerm} -> ${e.kv.value}`);
        this.lastTerm = term;
      } else if (rest.startsWith('status/') && e.type === 'put') {
        const s = parse<AgentStatus>(e.kv.value);
        if (s && (s.state === 'stopped' || s.state === 'failed'))
          this.stoppedReports.set(rest.slice(7), { epoch: s.epoch, atMs: this.q.nowMs() });
      } else if (rest.startsWith('events/') && e.type === 'put') {
        const ev = parse<ClusterEvent>(e.kv.value);
        if (ev && ev.kind === 'agent' && ev.action !== 'self-fenced')
          this.entry({ type: 'agent', node: ev.object, state: ev.action });
      }
    }
  }

  private onNodeState(node: string, e: WatchEvent): void {
    if (e.type === 'delete') return;
    const s = parse<NodeStatus>(e.kv.value);
    if (!s) return;
    const prev = this.nstate.get(node);
    this.nstate.set(node, s);
    if (prev?.state !== s.state || prev.reason !== s.reason)
      this.entry({ type: 'node', node, from: prev?.state, state: s.state, reason: s.reason });
  }

  private onAssign(id: string, e: WatchEvent): void {
    const prev = this.assign.get(id);
    if (e.type === 'delete') {
      this.assign.delete(id);
      this.entry({ type: 'resource', resource: id, from: prev?.state, state: 'deleted' });
      return;
    }
    const r = parse<ResourceRecord>(e.kv.value);
    if (!r) return;
    this.assign.set(id, r);
    if (prev && r.epoch < prev.epoch) this.violation(`${id}: epoch went down ${prev.epoch} -> ${r.epoch}`);
    if ((r.state === 'stopped' || r.state === 'failed') && !r.reason)
      this.violation(`${id}: ${r.state} without a reason`);
    if (
      !prev ||
      prev.state !== r.state ||
      prev.node !== r.node ||
      prev.epoch !== r.epoch ||
      prev.run !== r.run ||
      prev.reason !== r.reason
    )
      this.entry({
        type: 'resource',
        resource: id,
        node: r.node ?? undefined,
        from: prev?.state,
        state: r.run || r.state === 'stopped' || r.state === 'failed' ? r.state : `${r.state}(run=false)`,
        epoch: r.epoch,
        reason: r.reason,
      });
  }

  private onFence(node: string, value: string): void {
    const f = parse<FenceRecord>(value);
    if (!f) return;
    if (f.ok) {
      const list = this.fenceOk.get(node) ?? [];
      list.push(this.q.nowMs());
      this.fenceOk.set(node, list);
    }
    this.entry({
      type: 'fence',
      node,
      state: f.ok ? 'ok' : 'failed',
      term: f.term,
      reason: f.ok ? f.device : f.error,
    });
  }

  private onLeader(e: WatchEvent): void {
    if (e.type === 'delete') {
      this.entry({ type: 'leader', node: this.leader, state: 'vacant' });
      this.leader = undefined;
      return;
    }
    const l = parse<{ node: string; term: number }>(e.kv.value);
    if (!l) return;
    this.leader = l.node;
    this.entry({ type: 'leader', node: l.node, state: 'elected', term: l.term });
  }

  // ------------------------------------------------------------------ agents

  startAgent(n: SimNode): void {
    if (!n.powered || n.agent) return;
    const owner = new Owner(`${n.name}#${++n.agentCount}`);
    const link: Link = {
      reachable: () => n.powered && n.network !== 'off',
      latencyMs: () => worldLimits.storeLatencyMs + n.delayMs + this.storeSlowMs,
      dropReplies: () => n.network === 'oneway',
    };
    const store = new SimStoreClient(this.core, {
      opTimeoutMs: worldLimits.storeOpTimeoutMs,
      owner,
      link,
      url: `sim:${n.name}`,
    });
    const env: Env = {
      nowMs: () => this.q.nowMs(),
      sleep: (ms) => new Promise((resolve) => this.q.after(ms, resolve, owner)),
      setTimer: (ms, fn) => this.q.after(ms, fn, owner),
      rng: makeRng(this.rng.int(1, 2 ** 31 - 1)),
      log: (level, msg, fields) => {
        if (owner.state === 'dead') return;
        this.traceLine(
          `${' '.repeat(10)}${level} ${owner.name}: ${msg}${fields ? ' ' + JSON.stringify(fields) : ''}`,
        );
        if (msg.startsWith('self-fencing'))
          this.entry({ type: 'agent', node: n.name, state: 'self-fenced', reason: msg.slice(14) });
      },
    };
    const driver = new SimDriverView(this, n, owner);
    const fencer: Fencer = {
      deviceCount: (node) => (this.nodes.get(node)?.def.fence.length ?? 0) + (this.disk ? 1 : 0),
      fence: (node, deadlineMs) => this.fence(owner, node, deadlineMs, n.name),
    };
    const disk = this.disk;
    const monitors = disk
      ? [
          new SimDiskMonitor({
            disk,
            node: n.name,
            owner,
            nowMs: env.nowMs,
            setTimer: env.setTimer,
            log: (level, msg) => env.log(level, msg),
            note: (state, reason) => {
              if (owner.state !== 'dead') this.entry({ type: 'hw', node: n.name, state, reason });
            },
            vouchMs: vouchMsOf(disk.def),
          }),
        ]
      : undefined;
    const watchdog: Watchdog | undefined = n.def.watchdog
      ? {
          feed: (allowMs) => owner.state === 'live' && this.feedWatchdog(n, allowMs),
          disarm: () => {
            if (owner.state !== 'live') return;
            n.watchdogCancel?.();
            n.watchdogCancel = undefined;
          },
          close: async () => undefined,
        }
      : undefined;
    const agent = new Agent({
      env,
      store,
      driver,
      fencer,
      watchdog,
      ...(monitors ? { monitors } : {}),
      cluster: simCluster,
      node: n.name,
      address: n.name,
      capacity: { cpus: n.def.cpus, memory: n.def.memory },
      labels: n.def.labels,
      timings: this.scn.timings,
    });
    n.agent = { owner, agent, store, driver };
    agent.start().catch((e: unknown) => {
      if (owner.state === 'dead') return;
      this.entry({ type: 'agent', node: n.name, state: 'exited', reason: `start failed: ${errText(e)}` });
      this.killAgent(n);
      this.q.after(worldLimits.agentRestartMs, () => this.startAgent(n));
    });
  }

  /** kill -9 the agent: its code stops at once, its processes keep running */
  killAgent(n: SimNode): void {
    const a = n.agent;
    if (!a) return;
    a.owner.state = 'dead';
    a.owner.held = [];
    a.store.abandon();
    n.agent = undefined;
    n.frozen = false;
  }

  feedWatchdog(n: SimNode, allowMs: number): void {
    n.watchdogCancel?.();
    n.watchdogCancel = this.q.after(allowMs, () => {
      n.watchdogCancel = undefined;
      if (!n.powered) return;
      this.entry({
        type: 'hw',
        node: n.name,
        state: 'watchdog-reset',
        reason: 'watchdog not fed in time: node reset',
      });
      this.powerOff(n, 'watchdog reset');
      this.q.after(worldLimits.bootMs, () => this.powerOn(n));
    });
  }

  powerOff(n: SimNode, why: string): void {
    if (!n.powered) return;
    n.powered = false;
    this.killProcs(n, why, 'node-death');
    this.killAgent(n);
    n.watchdogCancel?.();
    n.watchdogCancel = undefined;
    if (this.healing) this.q.after(worldLimits.bootMs, () => this.powerOn(n));
  }

  powerOn(n: SimNode): void {
    if (n.powered) return;
    n.powered = true;
    this.q.after(worldLimits.bootMs, () => this.startAgent(n));
  }

  // ------------------------------------------------------------------ processes (ground truth)

  killProcs(n: SimNode, why: string, by: ProcEnd): void {
    for (const p of n.procs.values()) {
      if (!alive(p)) continue;
      this.endProc(p, 'stopped', why, by);
    }
  }

  private endProc(p: Proc, state: 'stopped' | 'failed', reason: string, by: ProcEnd): void {
    const from = p.state;
    p.state = state;
    p.reason = reason;
    p.endedAtMs = this.q.nowMs();
    p.endedBy = by;
    this.entry({ type: 'process', resource: p.id, node: p.node, from, state, epoch: p.epoch, reason });
  }

  private local(p: Proc): LocalResource {
    return { id: p.id, epoch: p.epoch, state: p.state, reason: p.reason };
  }

  startProc(n: SimNode, owner: Owner, spec: ResourceSpec, epoch: number): Promise<LocalResource> {
    return new Promise((resolve) => {
      const existing = n.procs.get(spec.id);
      if (existing && alive(existing)) {
        if (existing.epoch === epoch && existing.state === 'started')
          return void this.q.after(0, () => resolve(this.local(existing)), owner);
        if (existing.epoch === epoch && existing.state === 'starting')
          return void existing.startWaiters.push({ owner, resolve });
        this.violation(
          `${spec.id}: started at epoch ${epoch} on ${n.name} while epoch ${existing.epoch} is ${existing.state} there`,
        );
      }
      const p: Proc = {
        id: spec.id,
        node: n.name,
        epoch,
        state: 'starting',
        reason: 'starting',
        spawnedAtMs: this.q.nowMs(),
        startWaiters: [{ owner, resolve }],
        stopWaiters: [],
      };
      this.checkSpawn(p);
      n.procs.set(spec.id, p);
      this.lastProc.set(spec.id, p);
      this.entry({ type: 'process', resource: p.id, node: n.name, state: 'starting', epoch });
      const def = this.defs.get(spec.id);
      this.q.after(def?.startMs ?? 1000, () => {
        if (p.state === 'starting') {
          const f = this.faults.get(p.id);
          const prevNode = this.assign.get(p.id)?.node;
          if (f && f.startFails > 0 && (!f.startFailsOn || f.startFailsOn === n.name)) {
            f.startFails--;
            this.endProc(p, 'failed', 'start failed (injected)', 'start-failed');
          } else if (f?.migrateFails && prevNode !== undefined && this.lastHostBefore(p) !== n.name) {
            f.migrateFails = false;
            this.endProc(p, 'failed', 'migration failed (injected)', 'start-failed');
          } else {
            p.state = 'started';
            p.reason = 'running';
            this.entry({
              type: 'process',
              resource: p.id,
              node: n.name,
              from: 'starting',
              state: 'started',
              epoch,
            });
          }
        }
        const ws = p.startWaiters;
        p.startWaiters = [];
        for (const w of ws) this.q.deliver(w.owner, () => w.resolve(this.local(p)));
      });
    });
  }

  private readonly prevHost = new Map<Proc, string | undefined>();
  private lastHostBefore(p: Proc): string | undefined {
    return this.prevHost.get(p);
  }

  /** invariants at every process start: one copy at a time; recovery only after fencing or a report */
  private checkSpawn(p: Proc): void {
    for (const other of this.nodes.values()) {
      if (other.name === p.node) continue;
      const q = other.procs.get(p.id);
      if (q && alive(q))
        this.violation(
          `DOUBLE RUN: ${p.id} starting on ${p.node} (epoch ${p.epoch}) while ${q.state} on ${other.name} (epoch ${q.epoch})`,
        );
    }
    const last = this.lastProc.get(p.id);
    this.prevHost.set(p, last?.node);
    if (!last || last.node === p.node || alive(last)) return;
    const ended = last.endedAtMs ?? 0;
    const fenced = (this.fenceOk.get(last.node) ?? []).some((t) => t >= last.spawnedAtMs);
    const rep = this.stoppedReports.get(`${last.node}/${p.id}`);
    const reported = rep !== undefined && rep.epoch >= last.epoch && rep.atMs >= ended;
    if (!fenced && !reported)
      this.violation(
        `RECOVERY BEFORE FENCE: ${p.id} starting on ${p.node} but its copy on ${last.node} (epoch ${last.epoch}, ended by ${last.endedBy}) was neither fenced nor reported stopped`,
      );
  }

  stopProc(n: SimNode, owner: Owner, id: string): Promise<LocalResource> {
    return new Promise((resolve) => {
      const p = n.procs.get(id);
      if (!p || !alive(p)) {
        const l: LocalResource = p
          ? this.local(p)
          : { id, epoch: 0, state: 'stopped', reason: 'not running' };
        return void this.q.after(0, () => resolve(l), owner);
      }
      p.stopWaiters.push({ owner, resolve });
      if (p.state === 'stopping') return;
      const from = p.state;
      p.state = 'stopping';
      this.entry({ type: 'process', resource: id, node: n.name, from, state: 'stopping', epoch: p.epoch });
      const f = this.faults.get(id);
      const def = this.defs.get(id);
      const hang = f?.stopHang ?? false;
      const durMs = hang ? 5000 : (def?.stopMs ?? 500);
      this.q.after(durMs, () => {
        if (p.state === 'stopping')
          this.endProc(p, 'stopped', hang ? 'stop timed out: killed' : 'stopped', 'stop');
        const ws = p.stopWaiters;
        p.stopWaiters = [];
        for (const w of ws) this.q.deliver(w.owner, () => w.resolve(this.local(p)));
      });
    });
  }

  /** a running copy fails on its own (crash or failed health check) and the driver says so */
  failProc(id: string, reason: string): void {
    for (const n of this.nodes.values()) {
      const p = n.procs.get(id);
      if (!p || p.state !== 'started') continue;
      this.endProc(p, 'failed', reason, 'crash');
      const a = n.agent;
      if (a) {
        const ev: DriverEvent = { type: 'failed', id, epoch: p.epoch, reason };
        this.q.deliver(a.owner, () => a.driver.emit(ev));
      }
    }
  }

  // ------------------------------------------------------------------ fencing

  fence(owner: Owner, target: string, deadlineMs: number, from: string): Promise<FenceOutcome> {
    return new Promise((resolve) => {
      const n = this.nodes.get(target);
      const startMs = this.q.nowMs();
      const attempts: { device: string; error: string }[] = [];
      const done = (out: FenceOutcome) => this.q.deliver(owner, () => resolve(out));
      const devices = n?.def.fence ?? [];
      const disk = this.disk;
      // with a heartbeat disk, the sbd device comes first (the poison pill), then the node's own
      const first = disk ? 1 : 0;
      const tryDevice = (i: number): void => {
        if (disk && i === 0 && n && this.q.nowMs() < deadlineMs) {
          const shareMs = Math.floor((deadlineMs - this.q.nowMs()) / (devices.length + 1));
          this.entry({
            type: 'hw',
            node: target,
            state: 'poison-pill',
            reason: `sbd: pill written by ${from}`,
          });
          void fenceSbdSim({
            disk,
            q: this.q,
            from,
            target,
            timeoutMs: Math.min(disk.def.timeoutMs, shareMs),
          }).then((r) => {
            if (r.ok) {
              this.entry({ type: 'hw', node: target, state: 'fenced', reason: `sbd: ${r.how}` });
              return done({ ok: true, device: 'sbd', durationMs: this.q.nowMs() - startMs });
            }
            this.entry({ type: 'hw', node: target, state: 'fence-device-failed', reason: `sbd: ${r.error}` });
            attempts.push({ device: 'sbd', error: r.error });
            tryDevice(1);
          });
          return;
        }
        const d = devices[i - first];
        if (!n || !d || this.q.nowMs() >= deadlineMs)
          return done({ ok: false, attempts, durationMs: this.q.nowMs() - startMs });
        const device = `dev${i - first + 1}`;
        // each device gets an equal share of what is left before the deadline
        const shareMs = Math.floor((deadlineMs - this.q.nowMs()) / (devices.length + first - i));
        const endMs = this.q.nowMs() + (d.mode === 'timeout' ? shareMs : Math.min(shareMs, d.delayMs));
        this.q.at(endMs, () => {
          if (d.mode === 'ok' && d.delayMs <= shareMs) {
            this.entry({
              type: 'hw',
              node: target,
              state: 'fenced',
              reason: `${device} powered the node off`,
            });
            this.powerOff(n, `fenced by ${device}`);
            return done({ ok: true, device, durationMs: this.q.nowMs() - startMs });
          }
          const error = d.mode === 'fail' ? 'device reported failure' : 'timed out';
          this.entry({
            type: 'hw',
            node: target,
            state: 'fence-device-failed',
            reason: `${device}: ${error}`,
          });
          attempts.push({ device, error });
          tryDevice(i + 1);
        });
      };
      tryDevice(0);
    });
  }

  // ------------------------------------------------------------------ commands

  private resolveNode(name: string): SimNode | undefined {
    const n = name === 'leader' ? (this.leader ?? '') : name;
    return this.nodes.get(n);
  }

  command(cmd: Command, text: string): void {
    this.entry({ type: 'command', reason: text });
    const needNode = (name: string): SimNode | undefined => {
      const n = this.resolveNode(name);
      if (!n) this.entry({ type: 'hw', state: 'skipped', reason: `no node for "${name}" (no leader?)` });
      return n;
    };
    switch (cmd.type) {
      case 'power': {
        const n = needNode(cmd.node);
        if (n && cmd.on) this.powerOn(n);
        else if (n) this.powerOff(n, 'powered off');
        return;
      }
      case 'network': {
        const n = needNode(cmd.node);
        if (!n) return;
        n.network = cmd.mode;
        if (cmd.mode !== 'off') n.agent?.store.resumeWatches();
        return;
      }
      case 'delay': {
        const n = needNode(cmd.node);
        if (n) n.delayMs = cmd.ms;
        return;
      }
      case 'reboot': {
        const n = needNode(cmd.node);
        if (!n) return;
        this.powerOff(n, 'reboot');
        this.q.after(worldLimits.bootMs, () => this.powerOn(n));
        return;
      }
      case 'shutdown': {
        const n = needNode(cmd.node);
        const a = n?.agent;
        if (!n || !a) return;
        const owner = a.owner;
        a.agent.stop({ leave: cmd.leave }).then(
          () => this.q.deliver(owner, () => this.powerOff(n, 'shut down')),
          (e: unknown) => this.violation(`agent ${n.name}: stop() failed: ${errText(e)}`),
        );
        return;
      }
      case 'crash-agent': {
        const n = needNode(cmd.node);
        if (n) this.killAgent(n);
        return;
      }
      case 'start-agent': {
        const n = needNode(cmd.node);
        if (n) this.startAgent(n);
        return;
      }
      case 'freeze':
      case 'thaw': {
        const n = needNode(cmd.node);
        const a = n?.agent;
        if (!n || !a) return;
        if (cmd.type === 'freeze') {
          a.owner.state = 'frozen';
          n.frozen = true;
        } else if (a.owner.state === 'frozen') {
          a.owner.state = 'live';
          n.frozen = false;
          const held = a.owner.held;
          a.owner.held = [];
          for (const fn of held) this.q.after(0, fn, a.owner);
        }
        return;
      }
      case 'maintenance': {
        const n = needNode(cmd.node);
        if (n)
          this.operate(text, () =>
            this.operator.put(this.k.nodeAdmin(n.name), JSON.stringify({ maintenance: cmd.on })),
          );
        return;
      }
      case 'store':
        if (cmd.mode === 'down') this.core.down = true;
        else if (this.core.down) {
          this.core.down = false;
          if (cmd.revoke) {
            const ids = this.core.revokeExpiredLeases();
            this.entry({
              type: 'hw',
              state: 'leases-revoked',
              reason: `the store revoked ${ids.length} lease(s) that expired while it was down`,
            });
          } else this.core.refreshLeases();
          for (const n of this.nodes.values()) n.agent?.store.resumeWatches();
        }
        return;
      case 'disk': {
        const n = needNode(cmd.node);
        if (!n || !this.disk) return;
        if (cmd.lost) this.disk.lost.add(n.name);
        else this.disk.lost.delete(n.name);
        return;
      }
      case 'store-slow':
        this.storeSlowMs = cmd.ms;
        return;
      case 'fence': {
        const n = needNode(cmd.node);
        if (!n) return;
        const devs = n.def.fence.length > 0 ? n.def.fence : [{ mode: cmd.mode, delayMs: 1000 }];
        n.def.fence = devs.map((d) => ({ mode: cmd.mode, delayMs: cmd.delayMs ?? d.delayMs }));
        return;
      }
      case 'resource-add':
        this.defs.set(cmd.def.id, cmd.def);
        this.operate(text, () =>
          this.operator.put(this.k.resource(cmd.def.id), JSON.stringify(specOf(cmd.def))),
        );
        return;
      case 'resource':
        if (cmd.op === 'delete') this.operate(text, () => this.operator.delete(this.k.resource(cmd.id)));
        else if (cmd.op === 'cleanup')
          this.operate(text, () =>
            this.operator.put(this.k.cleanup(cmd.id), JSON.stringify({ atMs: this.q.nowMs() })),
          );
        else
          this.editSpec(text, cmd.id, (s) => ({ ...s, desired: cmd.op === 'start' ? 'started' : 'stopped' }));
        return;
      case 'resource-move':
        this.editSpec(text, cmd.id, (s) => ({ ...s, preferredNode: cmd.node }));
        return;
      case 'fault':
        this.fault(cmd);
        return;
      case 'heal':
        this.heal();
        return;
      case 'cluster': {
        const patch: Partial<ClusterFlags> =
          cmd.op === 'disarm'
            ? { armed: false }
            : cmd.op === 'arm'
              ? { armed: true }
              : cmd.op === 'halt'
                ? { halted: true }
                : cmd.op === 'halt-force'
                  ? { halted: true, haltForce: true }
                  : cmd.op === 'form'
                    ? { halted: false, haltForce: false, appsEnabled: true }
                    : { halted: false, haltForce: false, appsEnabled: false };
        this.operate(text, async () => {
          const cur = await this.operator.get(this.k.flags);
          const flags = {
            ...defaultFlags,
            ...(cur ? (parse<Partial<ClusterFlags>>(cur.value) ?? {}) : {}),
            ...patch,
          };
          await this.operator.put(this.k.flags, JSON.stringify(flags));
        });
        return;
      }
    }
  }

  /** undo every fault and keep it undone: nodes on, network on, agents running, store up, faults off, armed */
  private heal(): void {
    this.healing = true;
    this.storeSlowMs = 0;
    this.disk?.lost.clear();
    if (this.core.down) this.command({ type: 'store', mode: 'up' }, 'store up');
    for (const f of this.faults.values()) {
      f.startFails = 0;
      f.migrateFails = false;
      f.stopHang = false;
    }
    for (const n of this.nodes.values()) {
      n.def.fence = n.def.fence.map((d) => ({ ...d, mode: 'ok' }));
      if (n.agent?.owner.state === 'frozen') this.command({ type: 'thaw', node: n.name }, `thaw ${n.name}`);
      n.network = 'on';
      n.delayMs = 0;
      n.agent?.store.resumeWatches();
      if (!n.powered) this.powerOn(n);
      else if (!n.agent) this.startAgent(n);
      this.operate('heal: maintenance off', () =>
        this.operator.put(this.k.nodeAdmin(n.name), JSON.stringify({ maintenance: false })),
      );
    }
    for (const d of this.defs.values())
      if (d.desired === 'started')
        this.editSpec('heal: resource start', d.id, (sp) => ({ ...sp, desired: 'started' }));
    this.command({ type: 'cluster', op: 'arm' }, 'cluster arm');
  }

  private fault(cmd: Extract<Command, { type: 'fault' }>): void {
    const f = this.faults.get(cmd.id) ?? { startFails: 0, migrateFails: false, stopHang: false };
    this.faults.set(cmd.id, f);
    switch (cmd.fault) {
      case 'start-fails':
        f.startFails = cmd.count;
        f.startFailsOn = cmd.node;
        return;
      case 'migrate-fails':
        f.migrateFails = true;
        return;
      case 'stop-hang':
        f.stopHang = cmd.on;
        return;
      case 'crash':
        this.failProc(cmd.id, 'exited unexpectedly (injected crash)');
        return;
      case 'health-fails':
        this.failProc(cmd.id, 'health check failed (injected)');
        return;
    }
  }

  private editSpec(text: string, id: string, fn: (s: ResourceSpecInput) => ResourceSpecInput): void {
    this.operate(text, async () => {
      const cur = await this.operator.get(this.k.resource(id));
      if (!cur) throw new Error(`resource ${id} is not defined`);
      const spec = parse<ResourceSpecInput>(cur.value);
      if (!spec) throw new Error(`resource ${id}: unreadable spec`);
      await this.operator.put(this.k.resource(id), JSON.stringify(fn(spec)));
    });
  }

  private operate(text: string, fn: () => Promise<unknown>): void {
    fn().catch((e: unknown) =>
      this.entry({ type: 'hw', state: 'operator-failed', reason: `${text}: ${errText(e)}` }),
    );
  }

  // ------------------------------------------------------------------ expectations and convergence

  runningOn(id: string): Proc[] {
    const out: Proc[] = [];
    for (const n of this.nodes.values()) {
      const p = n.procs.get(id);
      if (p && alive(p)) out.push(p);
    }
    return out;
  }

  private checkExpect(exp: Expect, text: string, line: number): void {
    const [ok, detail] = this.evalExpect(exp);
    this.expectations.push({ line, text, atMs: this.q.nowMs(), ok, detail });
    this.entry({ type: 'expect', state: ok ? 'pass' : 'FAIL', reason: `${text}${ok ? '' : ` (${detail})`}` });
  }

  evalExpect(exp: Expect): [boolean, string] {
    switch (exp.type) {
      case 'on': {
        const r = this.assign.get(exp.id);
        const procs = this.runningOn(exp.id);
        const where = procs.map((p) => `${p.node}:${p.state}@${p.epoch}`).join(',') || 'nowhere';
        const desc = `record ${r ? `${r.state} on ${r.node ?? '-'} epoch ${r.epoch}` : 'missing'}; process ${where}`;
        const good = (node: string) =>
          !!r &&
          r.state === 'started' &&
          r.node === node &&
          procs.length === 1 &&
          procs[0]?.node === node &&
          procs[0]?.state === 'started' &&
          procs[0]?.epoch === r.epoch;
        if (exp.node === 'any') return [!!r?.node && good(r.node), desc];
        if (exp.negate) return [!procs.some((p) => p.node === exp.node) && r?.node !== exp.node, desc];
        return [good(exp.node), desc];
      }
      case 'state': {
        const r = this.assign.get(exp.id);
        const procs = this.runningOn(exp.id);
        const desc = `record ${r ? `${r.state}: ${r.reason}` : 'missing'}; ${procs.length} process(es) alive`;
        const reasonOk = !exp.reason || (r?.reason.toLowerCase().includes(exp.reason.toLowerCase()) ?? false);
        return [!!r && r.state === exp.state && procs.length === 0 && reasonOk, desc];
      }
      case 'converged': {
        if (!this.healthy())
          return [
            false,
            'cluster not healthy (a node is off, cut off, frozen or without agent, or the store is down)',
          ];
        const problems = this.convergenceProblems();
        return [problems.length === 0, problems.join('; ') || 'converged'];
      }
      case 'epoch': {
        const r = this.assign.get(exp.id);
        const procs = this.runningOn(exp.id);
        return [
          r?.epoch === exp.epoch &&
            r.state === 'started' &&
            procs.length === 1 &&
            procs[0]?.epoch === exp.epoch &&
            procs[0]?.state === 'started',
          `record ${r ? `${r.state} epoch ${r.epoch}` : 'missing'}; process ${procs.map((p) => `${p.node}:${p.state}@${p.epoch}`).join(',') || 'nowhere'}`,
        ];
      }
      case 'deleted': {
        const r = this.assign.get(exp.id);
        const procs = this.runningOn(exp.id);
        return [
          !r && procs.length === 0,
          `record ${r ? r.state : 'gone'}; ${procs.length} process(es) alive`,
        ];
      }
      case 'node': {
        const s = this.nstate.get(exp.node);
        return [
          s?.state === exp.state,
          `node ${exp.node} is ${s?.state ?? 'unknown to the manager'}${s ? `: ${s.reason}` : ''}`,
        ];
      }
      case 'event': {
        const hit = this.log.some(
          (e) =>
            e.node === exp.node &&
            ((exp.what === 'self-fence' && e.type === 'agent' && e.state === 'self-fenced') ||
              (exp.what === 'fence-ok' && e.type === 'fence' && e.state === 'ok') ||
              (exp.what === 'fence-failed' && e.type === 'fence' && e.state === 'failed')),
        );
        return [hit !== exp.negate, hit ? 'seen' : 'not seen'];
      }
      case 'leader':
        return [(this.leader === exp.node) !== exp.negate, `leader is ${this.leader ?? 'none'}`];
    }
  }

  /** every node powered, agent joined and reachable, store up */
  healthy(): boolean {
    return this.unhealthy() === undefined;
  }

  /** why the cluster is not healthy, undefined when it is */
  unhealthy(): string | undefined {
    if (this.core.down) return 'store down';
    for (const n of this.nodes.values()) {
      if (!n.powered) return `${n.name} powered off`;
      if (n.network !== 'on') return `${n.name} network ${n.network}`;
      if (n.frozen) return `${n.name} frozen`;
      if (n.agent?.agent.phase !== 'joined')
        return `${n.name} agent ${n.agent ? n.agent.agent.phase : 'not running'}`;
    }
    return undefined;
  }

  /**
   * What keeps the cluster from having converged: every node online (or maintenance),
   * every wanted resource running exactly once where its record says, or stopped with a
   * placement reason (capacity, constraints) or failed; nothing else running.
   */
  convergenceProblems(): string[] {
    const out: string[] = [];
    for (const n of this.nodes.values()) {
      const s = this.nstate.get(n.name)?.state;
      if (s !== 'online' && s !== 'maintenance')
        out.push(`node ${n.name} is ${s ?? 'not known to the manager'}`);
    }
    const flags = this.flags();
    const appsOn = !flags.halted && flags.appsEnabled;
    const specs = this.specs();
    for (const [id, spec] of specs) {
      const r = this.assign.get(id);
      const procs = this.runningOn(id);
      const want = appsOn && spec.desired === 'started';
      if (!r) {
        out.push(`${id}: defined but has no record (lost)`);
        continue;
      }
      if (procs.length > 1) out.push(`${id}: ${procs.length} copies alive`);
      if (want) {
        if (r.state === 'started') {
          const p = procs[0];
          if (!p || p.node !== r.node || p.state !== 'started' || p.epoch !== r.epoch)
            out.push(
              `${id}: record says started on ${r.node} epoch ${r.epoch}, process ${p ? `${p.node}:${p.state}@${p.epoch}` : 'not running'}`,
            );
        } else if (r.state === 'stopped' && /capacity|constraints|affinity|no node online/.test(r.reason)) {
          if (procs.length > 0) out.push(`${id}: stopped (${r.reason}) but a process is alive`);
        } else if (r.state !== 'failed') out.push(`${id}: wanted but ${r.state} (${r.reason})`);
      } else {
        if (r.state !== 'stopped') out.push(`${id}: not wanted but ${r.state} (${r.reason})`);
        if (procs.length > 0)
          out.push(`${id}: not wanted but alive on ${procs.map((p) => p.node).join(',')}`);
      }
    }
    for (const [id] of this.assign) if (!specs.has(id)) out.push(`${id}: deleted but its record remains`);
    for (const n of this.nodes.values())
      for (const p of n.procs.values())
        if (alive(p) && !specs.has(p.id)) out.push(`${p.id}: deleted but alive on ${n.name}`);
    return out;
  }

  private flags(): ClusterFlags {
    const kv = this.core.get(this.k.flags);
    return { ...defaultFlags, ...(kv ? (parse<Partial<ClusterFlags>>(kv.value) ?? {}) : {}) };
  }

  private specs(): Map<string, { desired: string }> {
    const out = new Map<string, { desired: string }>();
    for (const kv of this.core.range(this.k.resources).kvs) {
      const s = parse<{ id: string; desired?: string }>(kv.value);
      if (s) out.set(s.id, { desired: s.desired ?? 'started' });
    }
    return out;
  }
}

/** The driver one agent incarnation sees: a window on its node's processes. */
class SimDriverView implements Driver {
  private handler: ((ev: DriverEvent) => void) | undefined;
  constructor(
    private readonly w: World,
    private readonly n: SimNode,
    private readonly owner: Owner,
  ) {}
  recover(): Promise<LocalResource[]> {
    return new Promise((resolve) =>
      this.w.q.after(worldLimits.killMs, () => resolve(this.list()), this.owner),
    );
  }
  start(spec: ResourceSpec, epoch: number): Promise<LocalResource> {
    return this.w.startProc(this.n, this.owner, spec, epoch);
  }
  stop(id: string): Promise<LocalResource> {
    return this.w.stopProc(this.n, this.owner, id);
  }
  killAll(): Promise<void> {
    this.w.killProcs(this.n, 'killed by the agent (self-fence)', 'killed');
    return new Promise((resolve) => this.w.q.after(worldLimits.killMs, resolve, this.owner));
  }
  list(): LocalResource[] {
    return [...this.n.procs.values()].map((p) => ({
      id: p.id,
      epoch: p.epoch,
      state: p.state,
      reason: p.reason,
    }));
  }
  onEvent(handler: (ev: DriverEvent) => void): void {
    this.handler = handler;
  }
  emit(ev: DriverEvent): void {
    this.handler?.(ev);
  }
  async close(): Promise<void> {}
}

let current: World | undefined;
/** CORRAL_SIM_TRACE=1: print every trace line (agent logs included) to stderr */
const traceAll = process.env.CORRAL_SIM_TRACE === '1';
let handlerInstalled = false;
function installRejectionHandler(): void {
  if (handlerInstalled) return;
  handlerInstalled = true;
  process.on('unhandledRejection', (e: unknown) => {
    if (current) current.onRejection(e);
    else throw e;
  });
}

export function specOf(def: ResourceDef): ResourceSpecInput {
  return {
    id: def.id,
    process: { command: ['sim-process', def.id] },
    cpus: def.cpus,
    memory: def.memory,
    priority: def.priority,
    nodeSelector: def.selector,
    affinity: def.affinity,
    antiAffinity: def.anti,
    restart: { maxRestarts: def.maxRestarts, windowMs: def.windowMs, maxRelocations: def.maxRelocations },
    ...(def.prefer ? { preferredNode: def.prefer } : {}),
    desired: def.desired,
  };
}

function parse<T>(v: string): T | undefined {
  try {
    return JSON.parse(v) as T;
  } catch {
    return undefined;
  }
}

function errText(e: unknown): string {
  if (e instanceof StoreError) return `${e.code}: ${e.message}`;
  if (e instanceof Error) return e.stack ?? e.message;
  return String(e);
}
