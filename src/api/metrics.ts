// Prometheus metrics: cluster state gauges read from the (cached) status at scrape time,
// counters fed by the event stream (failovers, fence attempts and durations), API and store latency.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { nodeStates, resourceStates } from '../core/types.js';
import type { StatusData } from '../cli/status.js';
import type { KeyedEvent } from './hub.js';

/** fence attempts remembered while waiting for their outcome (bounded) */
export const fenceStartsMax = 1000;

export class ApiMetrics {
  readonly registry = new Registry();
  readonly apiLatency = new Histogram({
    name: 'corral_api_request_duration_seconds',
    help: 'API request latency',
    labelNames: ['method', 'route', 'status'],
    buckets: [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [this.registry],
  });
  readonly storeLatency = new Histogram({
    name: 'corral_store_read_duration_seconds',
    help: 'latency of one consistent read of the whole status from the store (at start and after a watch restart)',
    buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    registers: [this.registry],
  });
  readonly statusBuild = new Histogram({
    name: 'corral_status_build_duration_seconds',
    help: 'time to rebuild and serialise the status from the in-memory view after a store change',
    buckets: [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05],
    registers: [this.registry],
  });
  private nodes = new Gauge({
    name: 'corral_nodes',
    help: 'nodes by state',
    labelNames: ['state'],
    registers: [this.registry],
  });
  private resources = new Gauge({
    name: 'corral_resources',
    help: 'resources by state',
    labelNames: ['state'],
    registers: [this.registry],
  });
  private leader = new Gauge({
    name: 'corral_leader_term',
    help: 'current manager term (0: no leader)',
    registers: [this.registry],
  });
  readonly failovers = new Counter({
    name: 'corral_failovers_total',
    help: 'resources that went into recovery (seen by this API server since it started)',
    registers: [this.registry],
  });
  readonly fenceAttempts = new Counter({
    name: 'corral_fence_attempts_total',
    help: 'fence attempts by outcome (seen by this API server since it started)',
    labelNames: ['outcome'],
    registers: [this.registry],
  });
  readonly fenceDuration = new Histogram({
    name: 'corral_fence_duration_seconds',
    help: 'time from fence start to its outcome',
    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
    registers: [this.registry],
  });
  readonly events = new Counter({
    name: 'corral_events_total',
    help: 'cluster events by kind',
    labelNames: ['kind'],
    registers: [this.registry],
  });
  readonly consoleSessions = new Counter({
    name: 'corral_console_sessions_total',
    help: 'console WebSockets opened: local (this host bridged the VNC socket), forwarded (to the API of the node running the VM), refused',
    labelNames: ['path'],
    registers: [this.registry],
  });
  private fenceStarts = new Map<string, number>();

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'corral_api_process_' });
  }

  onEvent(e: KeyedEvent): void {
    this.events.inc({ kind: e.kind });
    if (e.kind === 'resource' && e.action === 'state' && e.to === 'recovering') this.failovers.inc();
    if (e.kind === 'fence' && e.action === 'fence-start') {
      if (this.fenceStarts.size >= fenceStartsMax) this.fenceStarts.clear();
      this.fenceStarts.set(e.object, e.atMs);
    }
    if (e.kind === 'fence' && (e.action === 'fence-ok' || e.action === 'fence-failed')) {
      this.fenceAttempts.inc({ outcome: e.action === 'fence-ok' ? 'ok' : 'failed' });
      const t0 = this.fenceStarts.get(e.object);
      if (t0 !== undefined) {
        this.fenceDuration.observe(Math.max(0, e.atMs - t0) / 1000);
        this.fenceStarts.delete(e.object);
      }
    }
  }

  setState(s: StatusData): void {
    for (const st of [...nodeStates, 'never joined'])
      this.nodes.set({ state: st }, s.nodes.filter((n) => n.state === st).length);
    for (const st of resourceStates)
      this.resources.set({ state: st }, s.resources.filter((r) => r.state === st).length);
    this.leader.set(s.leader?.term ?? 0);
  }
}
