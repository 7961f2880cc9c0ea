// The manager's decision: one consistent view of the store in, the actions to take out.
// Pure and idempotent: the same view gives the same actions, so a new leader resumes
// from the store by simply deciding again. Time comes in as view.nowMs.
//
// Safety rules enforced here (DESIGN.md, "Safety protocol"):
//  - a resource is placed on a new node only when its previous copy is known down:
//    the agent reported it stopped/failed at the current epoch, or its node is fenced
//    or left cleanly. A node that went silent is fenced first, always.
//  - every new placement or restart takes a higher epoch (fencing token).
import { invariant, assertNever } from './errors.js';
import { charge, place, release, usageOf, type Usage } from './placement.js';
import type {
  AgentStatus,
  Action,
  ClusterEvent,
  ClusterView,
  FailureMark,
  NodeState,
  NodeStatus,
  NodeView,
  ResourceRecord,
  ResourceView,
  Timings,
} from './types.js';

export function decide(view: ClusterView): Action[] {
  const out: Action[] = [];
  const by = `manager@${view.self}`;
  const work = { ...view, nodes: new Map(view.nodes), resources: new Map(view.resources) };
  for (const n of [...view.nodes.values()].sort(byName)) {
    const a = decideNode(work, n, by);
    for (const act of a) {
      out.push(act);
      if (act.type === 'setNode') work.nodes.set(n.name, { ...n, status: act.next });
    }
  }
  const used = usageOf(work);
  const byPriority = [...work.resources.values()].sort(
    (a, b) => (b.spec?.priority ?? 0) - (a.spec?.priority ?? 0) || (a.id < b.id ? -1 : 1),
  );
  for (const r of affinityFirst(byPriority, work)) {
    const acts = decideResource(work, r, used, by);
    for (const act of acts) {
      out.push(act);
      if (act.type === 'setResource') work.resources.set(r.id, { ...r, rec: act.next });
    }
  }
  return out;
}

/** Priority order, except that a resource comes after its affinity partners (they pin its node). */
function affinityFirst(order: ResourceView[], view: ClusterView): ResourceView[] {
  const out: ResourceView[] = [];
  const seen = new Set<string>();
  const visit = (r: ResourceView): void => {
    if (seen.has(r.id)) return;
    seen.add(r.id);
    for (const p of r.spec?.affinity ?? []) {
      const partner = view.resources.get(p);
      if (partner) visit(partner);
    }
    out.push(r);
  };
  for (const r of order) visit(r);
  return out;
}

// ---------------------------------------------------------------- nodes

function decideNode(view: ClusterView, n: NodeView, by: string): Action[] {
  const now = view.nowMs;
  const st = n.status;
  const incarnation = n.alive?.incarnation ?? n.reg?.incarnation ?? 0;
  const set = (state: NodeState, reason: string, extra: Partial<NodeStatus> = {}): Action => {
    const next: NodeStatus = {
      state,
      reason,
      sinceMs: now,
      incarnation,
      fenceAttempts: 0,
      ...extra,
    };
    return {
      type: 'setNode',
      node: n.name,
      next,
      event: ev(
        view,
        by,
        'node',
        n.name,
        'state',
        `${n.name}: ${st?.state ?? 'new'} -> ${state}: ${reason}`,
        {
          from: st?.state,
          to: state,
        },
      ),
    };
  };
  const upState = (): NodeState => (n.admin.maintenance ? 'maintenance' : 'online');
  if (!st) {
    if (n.alive) return [set(upState(), 'joined')];
    if (n.reg) return [set('offline', n.reg.left ? 'left the cluster cleanly' : 'not running')];
    return [];
  }
  switch (st.state) {
    case 'online':
    case 'maintenance': {
      if (!n.alive) {
        if (n.reg?.left && n.reg.incarnation === st.incarnation)
          return [set('offline', 'left the cluster cleanly')];
        return [
          set('unknown', `lease expired: no renewal for ${view.timings.leaseTtlMs} ms`, {
            lostAtMs: now,
            incarnation: st.incarnation,
            ...(lostWhileDisarmed(view) ? { lostDisarmed: true } : {}),
          }),
        ];
      }
      if (n.alive.incarnation !== st.incarnation)
        return [set(upState(), 'agent restarted (new incarnation)')];
      if (upState() !== st.state)
        return [set(upState(), n.admin.maintenance ? 'maintenance on' : 'maintenance off')];
      return [];
    }
    case 'unknown': {
      if (n.alive)
        return [
          set(
            upState(),
            n.alive.incarnation === st.incarnation
              ? 'lease taken again by the same agent before fencing'
              : 'lease renewed by a new incarnation before fencing',
          ),
        ];
      if (!view.flags.armed) {
        const reason = 'cluster disarmed: not fencing';
        return st.reason === reason
          ? []
          : [
              set('unknown', reason, {
                lostAtMs: st.lostAtMs,
                incarnation: st.incarnation,
                lostDisarmed: st.lostDisarmed,
              }),
            ];
      }
      const delayMs = twoNodeFenceDelayMs(view, n.name);
      const lostAtMs = st.lostAtMs ?? st.sinceMs;
      if (now < lostAtMs + delayMs) return [];
      if (view.storeBackAtMs !== undefined && now < view.storeBackAtMs + storeReturnGraceMs(view.timings))
        return [];
      return [
        set(
          'fencing',
          n.fenceDevices > 0
            ? 'running fence devices'
            : 'no fence device: waiting for the self-fence deadline',
          {
            lostAtMs,
            incarnation: st.incarnation,
            lostDisarmed: st.lostDisarmed,
            nextFenceAtMs: now,
          },
        ),
      ];
    }
    case 'fencing':
      return decideFencing(view, n, st, by, set);
    case 'fenced':
    case 'offline':
      return n.alive ? [set(upState(), st.state === 'fenced' ? 'rejoined after fencing' : 'joined')] : [];
    default:
      return assertNever(st.state, 'node state');
  }
}

function decideFencing(
  view: ClusterView,
  n: NodeView,
  st: NodeStatus,
  by: string,
  set: (state: NodeState, reason: string, extra?: Partial<NodeStatus>) => Action,
): Action[] {
  const now = view.nowMs;
  const t = view.timings;
  const lostAtMs = st.lostAtMs ?? st.sinceMs;
  const inFlight = view.fencing.has(n.name);
  const keep = { lostAtMs, incarnation: st.incarnation, lostDisarmed: st.lostDisarmed };
  const f = n.fence;
  if (f && f.ok && f.incarnation === st.incarnation && f.atMs >= lostAtMs) {
    return [set('fenced', `fenced by ${f.device}`, keep)];
  }
  if (inFlight) return [];
  if (n.alive)
    return [set(n.admin.maintenance ? 'maintenance' : 'online', 'lease renewed by a new incarnation')];
  if (!view.flags.armed) return [set('unknown', 'cluster disarmed: not fencing', keep)];
  if (n.fenceDevices === 0 && st.lostDisarmed) {
    // Lost while disarmed: its agent did not self-fence and, if cut off, never saw the re-arm.
    // No deadline proves it down; wait for the node to come back (or a device to be configured).
    const reason = 'no fence device and the lease was lost while disarmed: waiting for the node to return';
    return st.reason === reason ? [] : [set('fencing', reason, { ...keep, fenceAttempts: st.fenceAttempts })];
  }
  if (n.fenceDevices === 0) {
    // The agent self-fences before its lease can expire; we saw the lease gone at lostAtMs,
    // so its resources are down by then plus the time a kill takes (the margin).
    const deadlineMs = lostAtMs + t.noDeviceFenceMarginMs;
    if (now < deadlineMs) return [];
    const record = {
      node: n.name,
      incarnation: st.incarnation,
      ok: true,
      device: 'self-fence deadline',
      atMs: now,
      term: view.term,
    };
    return [
      {
        type: 'fenceRecord',
        record,
        event: ev(
          view,
          by,
          'fence',
          n.name,
          'fence-ok',
          `${n.name}: fenced by self-fence deadline (no device)`,
        ),
      },
      set('fenced', 'fenced by self-fence deadline (no device)', keep),
    ];
  }
  if (now < (st.nextFenceAtMs ?? 0)) return [];
  const attempt = st.fenceAttempts + 1;
  const backoffMs = Math.min(t.fenceRetryBackoffMaxMs, t.fenceRetryBackoffMs * 2 ** (attempt - 1));
  const next = set(
    'fencing',
    attempt === 1 ? 'running fence devices' : `retrying fence devices (attempt ${attempt})`,
    {
      ...keep,
      fenceAttempts: attempt,
      nextFenceAtMs: now + t.fenceTimeoutMs + backoffMs,
    },
  );
  // the attempt count and back-off are recorded; the event is the 'fence-start' below (a
  // "fencing -> fencing" state event before every attempt was noise in the event log)
  return [
    next.type === 'setNode' && st.state === 'fencing'
      ? { type: 'setNode', node: next.node, next: next.next }
      : next,
    {
      type: 'fence',
      node: n.name,
      incarnation: st.incarnation,
      deadlineMs: now + t.fenceTimeoutMs,
      event: ev(view, by, 'fence', n.name, 'fence-start', `${n.name}: fencing (attempt ${attempt})`),
    },
  ];
}

/**
 * Could the node whose lease we just saw gone have believed the cluster disarmed (so it did not
 * self-fence)? Yes while disarmed, and for two lease TTLs after the re-arm: a node cut off just
 * before the re-arm never saw it, and its lease lasts up to one TTL after its last contact.
 */
function lostWhileDisarmed(view: ClusterView): boolean {
  const f = view.flags;
  return !f.armed || (f.armedAtMs !== undefined && view.nowMs < f.armedAtMs + 2 * view.timings.leaseTtlMs);
}

/**
 * After a store outage the store itself may drop the leases that ran out meanwhile (an etcd
 * leader that lost quorum revokes them when it resumes), though their nodes, vouched for by
 * the heartbeat disk, kept running and take a new lease at their next renewal try. Fencing
 * waits this long after the store came back, so that a lease the store dropped is not taken
 * for a node gone (waiting only delays a recovery; it never makes one unsafe).
 */
export function storeReturnGraceMs(t: Timings): number {
  return 2 * t.renewIntervalMs;
}

/** Two-node clusters: delay fencing a node that runs higher-priority work than ours. */
function twoNodeFenceDelayMs(view: ClusterView, node: string): number {
  if (view.nodes.size !== 2 || node === view.self) return 0;
  const top = (n: string): number => {
    let p = -Infinity;
    for (const r of view.resources.values())
      if (r.rec?.node === n && r.spec) p = Math.max(p, r.spec.priority);
    return p;
  };
  return top(node) > top(view.self) ? view.timings.twoNodeFenceDelayMs : 0;
}

// ---------------------------------------------------------------- resources

/** Where a resource's current copy stands, as far as safety is concerned. */
export type CopyState =
  | 'none' // no node holds it
  | 'down' // its node is fenced or left cleanly: certainly not running
  | 'unknown' // its node went silent: maybe running, must be fenced first
  | 'pending' // the agent has not yet reported on the current epoch
  | 'starting'
  | 'running'
  | 'stopping'
  | 'stopped'
  | 'failed';

export function copyState(view: ClusterView, r: ResourceView): CopyState {
  const rec = r.rec;
  if (!rec || !rec.node) return 'none';
  const n = view.nodes.get(rec.node);
  const ns = n?.status?.state;
  if (!n || ns === undefined) return 'unknown';
  switch (ns) {
    case 'fenced':
    case 'offline':
      return 'down';
    case 'unknown':
    case 'fencing':
      return 'unknown';
    case 'online':
    case 'maintenance': {
      const s = r.statuses.get(rec.node);
      if (!s || s.epoch !== rec.epoch) return 'pending';
      switch (s.state) {
        case 'started':
        case 'migrating': // the source copy runs while it is sent
          return 'running';
        case 'migrated': // the source copy was handed over and is paused for good
          return 'stopped';
        case 'incoming':
          return 'starting';
        case 'starting':
        case 'stopping':
        case 'stopped':
        case 'failed':
          return s.state;
        default:
          return assertNever(s.state, 'agent status');
      }
    }
    default:
      return assertNever(ns, 'node state');
  }
}

function decideResource(view: ClusterView, r: ResourceView, used: Usage, by: string): Action[] {
  const now = view.nowMs;
  const spec = r.spec;
  const rec: ResourceRecord = r.rec ?? {
    id: r.id,
    state: 'stopped',
    reason: 'defined',
    node: null,
    run: false,
    epoch: 0,
    sinceMs: now,
    failures: [],
    relocations: 0,
  };
  const copy = copyState(view, r);
  const out: Action[] = [];
  const write = (patch: Partial<ResourceRecord>, message?: string): Action[] => {
    const next: ResourceRecord = { ...rec, ...patch };
    if (next.state !== rec.state || next.reason !== rec.reason) next.sinceMs = now;
    assertSafeTransition(rec, next, copy);
    if (sameRecord(next, rec) && r.rec) return out;
    if (next.node !== rec.node && spec) {
      if (rec.node && rec.state !== 'stopped' && rec.state !== 'failed') release(used, rec.node, spec);
      if (next.node && next.state !== 'stopped' && next.state !== 'failed') charge(used, next.node, spec);
    }
    const event = message
      ? ev(view, by, 'resource', r.id, 'state', `${r.id}: ${message}`, {
          from: rec.state,
          to: next.state,
          epoch: next.epoch,
        })
      : undefined;
    out.push({ type: 'setResource', id: r.id, prev: r.rec, next, event });
    return out;
  };

  // ---- not wanted: stop it, wherever it is
  const stopWhy = !spec
    ? 'deleted'
    : spec.desired === 'stopped'
      ? 'stopped by operator'
      : view.flags.halted
        ? 'cluster halted'
        : !view.flags.appsEnabled
          ? 'applications disabled (cluster formed with --no-apps)'
          : undefined;
  if (stopWhy) {
    if (rec.migration) {
      // finish (abort) the migration first: the target's copy must be gone
      if (rec.migration.phase === 'abort') return decideMigration(view, r, rec, copy, write);
      return write(
        { migration: { ...rec.migration, phase: 'abort', reason: stopWhy } },
        `migration aborted: ${stopWhy}`,
      );
    }
    switch (copy) {
      case 'none':
      case 'down':
      case 'stopped':
      case 'failed':
        if (!spec) {
          out.push({
            type: 'deleteResource',
            id: r.id,
            event: ev(view, by, 'resource', r.id, 'deleted', `${r.id}: undefined and stopped`),
          });
          return out;
        }
        return write({ state: 'stopped', reason: stopWhy, node: null, run: false }, `stopped (${stopWhy})`);
      case 'unknown':
        return write({
          state: 'stopping',
          reason: `${stopWhy}; waiting for ${rec.node} to be fenced`,
          run: false,
        });
      case 'pending':
      case 'starting':
      case 'running':
      case 'stopping':
        return write(
          { state: 'stopping', reason: stopWhy, run: false },
          `stopping on ${rec.node} (${stopWhy})`,
        );
      default:
        return assertNever(copy, 'copy state');
    }
  }
  invariant(spec, 'spec present when wanted');

  // ---- failure bookkeeping: quiet periods heal, cleanup clears at once
  let failures = rec.failures.filter((f) => now - f.atMs < view.timings.failureExpiryMs);
  if (r.cleanup) {
    out.push({ type: 'consumeCleanup', id: r.id });
    failures = [];
  }
  const healed = failures.length !== rec.failures.length || r.cleanup !== undefined;
  if (rec.state === 'failed') {
    if (failures.length > 0 && !r.cleanup) {
      if (copy === 'running' || copy === 'starting' || copy === 'pending')
        return write({ run: false, state: 'failed' }, `stopping failed copy on ${rec.node}`);
      return failures.length !== rec.failures.length ? write({ failures }) : out;
    }
    // failures expired or were cleaned up: try again from scratch
    return placeNew(
      view,
      r,
      { ...rec, failures, relocations: 0 },
      used,
      write,
      healed ? 'failures cleared' : '',
    );
  }
  const base: ResourceRecord = { ...rec, failures };
  if (rec.migration) return decideMigration(view, r, base, copy, write);

  switch (copy) {
    case 'running': {
      const node = rec.node as string;
      if (rec.state !== 'started' && !rec.migration)
        return write({ failures, state: 'started', reason: `running on ${node}` }, `started on ${node}`);
      const nodeView = view.nodes.get(node);
      const leaving =
        nodeView?.status?.state === 'maintenance'
          ? 'maintenance'
          : nodeView?.alive?.isolated
            ? 'node isolated: reaches none of its known addresses'
            : undefined;
      if (leaving) return moveAway(view, r, base, used, write, null, `moving off ${node} (${leaving})`);
      if (spec.preferredNode && spec.preferredNode !== node) {
        // never back onto a node where the restart limit was just reached (it would fail again)
        const p = place(view, spec, used, {
          avoid: new Set([node, ...exhaustedNodes(failures, spec.restart, now)]),
        });
        if (p.ok && p.node === spec.preferredNode)
          return moveAway(view, r, base, used, write, p.node, `moving to ${p.node} (preferred node)`);
      }
      return failures.length !== rec.failures.length ? write({ failures }) : out;
    }
    case 'pending':
    case 'starting':
      if (!rec.run) return write({ state: 'stopping' });
      return rec.state === 'starting' ? out : write({ failures, state: 'starting' });
    case 'stopping':
      return rec.state === 'stopping' ? out : write({ failures, state: 'stopping' });
    case 'failed': {
      const node = rec.node as string;
      const s = r.statuses.get(node);
      return onFailure(view, r, base, node, s?.reason ?? 'failed', used, write);
    }
    case 'stopped': {
      const node = rec.node as string;
      if (rec.run) {
        // the agent stopped it without being asked (it rejoined after a self-fence): run it again
        return placeNew(view, r, base, used, write, `not running on ${node} (agent rejoined)`, node);
      }
      const moving = rec.reason.startsWith('moving');
      return placeNew(
        view,
        r,
        base,
        used,
        write,
        rec.reason,
        moving ? null : node,
        moving ? new Set([node]) : undefined,
      );
    }
    case 'unknown': {
      const why = view.flags.armed
        ? `${rec.node} lost; waiting for fence before recovery`
        : `${rec.node} lost; cluster disarmed: not recovering`;
      return rec.state === 'recovering' && rec.reason === why
        ? out
        : write({ failures, state: 'recovering', reason: why }, why);
    }
    case 'down': {
      const node = rec.node as string;
      if (!view.flags.armed)
        return write({
          failures,
          state: 'recovering',
          reason: `${node} down; cluster disarmed: not recovering`,
        });
      const how = view.nodes.get(node)?.status?.reason ?? 'down';
      return placeNew(view, r, base, used, write, `recovered from ${node} (${how})`, null, new Set([node]));
    }
    case 'none':
      return placeNew(view, r, base, used, write, rec.reason === 'defined' ? 'defined' : '', rec.node);
    default:
      return assertNever(copy, 'copy state');
  }
}

type Write = (patch: Partial<ResourceRecord>, message?: string) => Action[];

/** A fresh epoch: above the current one and above every epoch handed out before (aborted migrations). */
function nextEpoch(rec: ResourceRecord): number {
  return Math.max(rec.epoch, rec.epochIssued ?? 0, rec.migration?.targetEpoch ?? 0) + 1;
}

/** Resources that move live (two-phase hand-over) instead of stop-then-start. */
export function liveMigratable(spec: ResourceView['spec']): boolean {
  return spec?.kind === 'vm';
}

/**
 * Move a running resource off its node: a live migration for VMs, a clean stop (then a
 * start elsewhere) for everything else. `target` null: wherever placement says.
 */
function moveAway(
  view: ClusterView,
  r: ResourceView,
  rec: ResourceRecord,
  used: Usage,
  write: Write,
  target: string | null,
  why: string,
): Action[] {
  const spec = r.spec;
  const node = rec.node as string;
  if (spec && liveMigratable(spec)) {
    // a drain sends a bounded number of guests at once; the rest wait for a slot
    let leaving = 0;
    for (const o of view.resources.values())
      if (o.id !== r.id && o.rec?.migration && o.rec.migration.source === node) leaving++;
    if (leaving >= liveMigrationsPerNodeMax) {
      const reason = `${why}: waiting for a migration slot (at most ${liveMigrationsPerNodeMax} leave ${node} at once)`;
      return rec.reason === reason ? [] : write({ reason });
    }
    const p = target
      ? { ok: true as const, node: target, why }
      : place(view, spec, used, { avoid: new Set([node]) });
    if (!p.ok) {
      const reason = `${why}: no target: ${p.why}`;
      return rec.reason === reason ? [] : write({ reason });
    }
    const targetEpoch = nextEpoch(rec);
    charge(used, p.node, spec);
    const now = view.nowMs;
    return write(
      {
        state: 'migrating',
        epochIssued: targetEpoch,
        reason: why,
        migration: {
          source: node,
          target: p.node,
          targetEpoch,
          phase: 'prepare',
          startedAtMs: now,
          deadlineMs: now + (view.timings.migrationTimeoutMs ?? migrationTimeoutMsDefault),
          reason: why,
        },
      },
      `live-migrating ${node} -> ${p.node} (${why})`,
    );
  }
  return write({ state: 'stopping', run: false, reason: why }, why);
}

export const migrationTimeoutMsDefault = 300_000;
/** live migrations leaving one node at once (node drain, maintenance, moves) */
export const liveMigrationsPerNodeMax = 3;

/**
 * The two-phase hand-over: the target prepares an incoming copy at targetEpoch, the source
 * sends, and only a source report of 'migrated' (its copy paused for good) moves ownership.
 * Anything else aborts; an abort completes only once the target's copy is gone, so no
 * guest ever runs on two nodes.
 */
function decideMigration(
  view: ClusterView,
  r: ResourceView,
  rec: ResourceRecord,
  copy: CopyState,
  write: Write,
): Action[] {
  const m = rec.migration as NonNullable<ResourceRecord['migration']>;
  const now = view.nowMs;
  const stateOf = (n: string) => view.nodes.get(n)?.status?.state;
  const up = (n: string) => stateOf(n) === 'online' || stateOf(n) === 'maintenance';
  const down = (n: string) => stateOf(n) === 'fenced' || stateOf(n) === 'offline';
  const sStat = r.statuses.get(m.source);
  const tStat = r.statuses.get(m.target);
  const tAt = tStat && tStat.epoch === m.targetEpoch ? tStat : undefined;
  const abort = (reason: string): Action[] =>
    write(
      {
        state: 'migrating',
        migration: { ...m, phase: 'abort', reason },
        reason: `migration aborted: ${reason}`,
      },
      `migration ${m.source} -> ${m.target} aborted: ${reason}`,
    );
  const handOver = (how: string): Action[] =>
    write(
      {
        node: m.target,
        epoch: m.targetEpoch,
        run: true,
        state: tAt?.state === 'started' ? 'started' : 'starting',
        migration: undefined,
        reason: `migrated from ${m.source} (${how})`,
      },
      `migrated ${m.source} -> ${m.target} (${how})`,
    );
  if (m.phase === 'abort') {
    const targetGone = !tAt || tAt.state === 'stopped' || tAt.state === 'failed' || down(m.target);
    if (!targetGone) return []; // wait: the target's copy must be gone before anything else happens
    const state = copy === 'running' ? 'started' : rec.state === 'migrating' ? 'starting' : rec.state;
    return write({
      state,
      migration: undefined,
      epochIssued: Math.max(rec.epochIssued ?? 0, m.targetEpoch),
      reason: `migration to ${m.target} failed: ${m.reason}`,
    });
  }
  if (!up(m.source)) {
    // the source went away mid-migration: if the stream completed, the target owns the guest
    if (tAt?.state === 'started') return handOver(`source ${m.source} lost after the stream completed`);
    return abort(`source ${m.source} lost`);
  }
  if (sStat?.epoch === rec.epoch && sStat.state === 'migrated') return handOver(progressNote(sStat.progress));
  if (!up(m.target)) return abort(`target ${m.target} lost`);
  if (sStat?.epoch === rec.epoch && sStat.migrateError?.targetEpoch === m.targetEpoch)
    return abort(sStat.migrateError.reason);
  if (tAt?.state === 'failed') return abort(`target could not prepare: ${tAt.reason}`);
  if (now > m.deadlineMs) return abort(`not finished within ${m.deadlineMs - m.startedAtMs} ms`);
  if (copy !== 'running') return abort(`source copy is ${copy}`);
  if (m.phase === 'prepare' && tAt?.state === 'incoming' && tAt.incoming)
    return write(
      { migration: { ...m, phase: 'transfer', incoming: tAt.incoming } },
      `transfer ${m.source} -> ${m.target} begins`,
    );
  return [];
}

function progressNote(p: AgentStatus['progress']): string {
  if (!p) return 'stream complete';
  const mib = (p.transferredBytes / 1048576).toFixed(1);
  return `${mib} MiB in ${p.elapsedMs} ms${p.downtimeMs !== undefined ? `, downtime ${p.downtimeMs} ms` : ''}`;
}

function placeNew(
  view: ClusterView,
  r: ResourceView,
  rec: ResourceRecord,
  used: Usage,
  write: Write,
  why: string,
  sticky: string | null = null,
  avoid?: Set<string>,
): Action[] {
  const spec = r.spec;
  invariant(spec, 'placing needs a spec');
  if (!view.flags.armed && rec.node !== null && rec.state !== 'stopped')
    return write({ state: 'recovering', reason: 'cluster disarmed: not recovering' });
  const p = place(view, spec, used, { sticky, avoid });
  if (!p.ok) {
    const reason = p.why;
    if (rec.state === 'stopped' && rec.reason === reason && rec.node === null) return [];
    return write({ ...rec, state: 'stopped', node: null, run: false, reason }, `cannot place: ${reason}`);
  }
  const detail = why ? `${why}; ` : '';
  return write(
    {
      ...rec,
      state: 'starting',
      node: p.node,
      run: true,
      epoch: nextEpoch(rec),
      reason: `placed on ${p.node} (${detail}${p.why})`,
    },
    `placed on ${p.node} (${detail}${p.why})`,
  );
}

function onFailure(
  view: ClusterView,
  r: ResourceView,
  rec: ResourceRecord,
  node: string,
  reason: string,
  used: Usage,
  write: Write,
): Action[] {
  const spec = r.spec;
  invariant(spec, 'failure handling needs a spec');
  const now = view.nowMs;
  const policy = spec.restart;
  const mark: FailureMark = { node, atMs: now, reason };
  const failures = [...rec.failures, mark].slice(-50);
  const inWindow = failures.filter((f) => now - f.atMs < policy.windowMs);
  const onNode = inWindow.filter((f) => f.node === node).length;
  if (!view.flags.armed) {
    return write({
      failures,
      state: 'failed',
      run: false,
      reason: `failed on ${node}: ${reason} (cluster disarmed: not restarting)`,
    });
  }
  if (onNode <= policy.maxRestarts) {
    return write(
      {
        failures,
        state: 'starting',
        run: true,
        epoch: nextEpoch(rec),
        reason: `restart ${onNode}/${policy.maxRestarts} on ${node} after: ${reason}`,
      },
      `restarting on ${node} (${onNode}/${policy.maxRestarts}) after: ${reason}`,
    );
  }
  if (rec.relocations < policy.maxRelocations) {
    const exhausted = new Set(
      inWindow
        .filter((f) => inWindow.filter((g) => g.node === f.node).length > policy.maxRestarts)
        .map((f) => f.node),
    );
    exhausted.add(node);
    const p = place(view, spec, used, { avoid: exhausted });
    if (p.ok) {
      return write(
        {
          failures,
          state: 'starting',
          node: p.node,
          run: true,
          epoch: nextEpoch(rec),
          relocations: rec.relocations + 1,
          reason: `relocated from ${node} after ${onNode} failures: ${reason}`,
        },
        `relocating ${node} -> ${p.node} after ${onNode} failures: ${reason}`,
      );
    }
  }
  return write(
    {
      failures,
      state: 'failed',
      run: false,
      reason: `failed: restart limit reached (${onNode} failures on ${node} within ${policy.windowMs} ms): ${reason}`,
    },
    `failed: restart limit reached on ${node}: ${reason}`,
  );
}

/** Nodes where the resource used up its in-place restarts within the window. */
function exhaustedNodes(
  failures: FailureMark[],
  policy: { maxRestarts: number; windowMs: number },
  nowMs: number,
): string[] {
  const count = new Map<string, number>();
  for (const f of failures)
    if (nowMs - f.atMs < policy.windowMs) count.set(f.node, (count.get(f.node) ?? 0) + 1);
  return [...count].filter(([, n]) => n > policy.maxRestarts).map(([node]) => node);
}

/** The safety invariant, asserted before every write: never a second copy. */
function assertSafeTransition(prev: ResourceRecord, next: ResourceRecord, copy: CopyState): void {
  invariant(
    next.epoch >= prev.epoch,
    () => `${next.id}: epoch must not shrink (${prev.epoch} -> ${next.epoch})`,
  );
  // a live-migration hand-over moves ownership to the target that already runs the guest
  const handOver = prev.migration !== undefined && next.node === prev.migration.target && !next.migration;
  if (next.run && next.node !== null && next.node !== prev.node && prev.node !== null) {
    invariant(
      copy === 'down' || copy === 'stopped' || copy === 'failed' || copy === 'none' || handOver,
      () => `${next.id}: placed on ${next.node} while its copy on ${prev.node} is ${copy}`,
    );
    invariant(next.epoch > prev.epoch, () => `${next.id}: a new placement needs a new epoch`);
  }
  if (next.run && next.epoch !== prev.epoch && !handOver) {
    invariant(
      copy !== 'running' && copy !== 'unknown' && copy !== 'starting',
      () => `${next.id}: new epoch while copy ${copy}`,
    );
  }
}

function sameRecord(a: ResourceRecord, b: ResourceRecord): boolean {
  return (
    a.state === b.state &&
    a.reason === b.reason &&
    a.node === b.node &&
    a.run === b.run &&
    a.epoch === b.epoch &&
    a.relocations === b.relocations &&
    a.failures.length === b.failures.length &&
    a.epochIssued === b.epochIssued &&
    a.migration?.phase === b.migration?.phase &&
    a.migration?.targetEpoch === b.migration?.targetEpoch
  );
}

function ev(
  view: ClusterView,
  by: string,
  kind: ClusterEvent['kind'],
  object: string,
  action: string,
  message: string,
  extra: Partial<ClusterEvent> = {},
): ClusterEvent {
  return { atMs: view.nowMs, kind, object, action, message, by, term: view.term, ...extra };
}

function byName(a: { name: string }, b: { name: string }): number {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}
