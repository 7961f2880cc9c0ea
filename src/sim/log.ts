// The transition log: every node and resource state change, fence outcome, leader change,
// process start/stop (the simulated ground truth), command and expectation, with simulated
// time. Stable JSON form (documented in README "Transition log") and a text form, one line
// an entry, written beside each scenario as <name>.log.
export type LogType =
  | 'command' // an operator or fault command of the scenario
  | 'node' // manager's node state (nstate/<node>)
  | 'resource' // manager's resource record (assign/<id>)
  | 'fence' // fence record written (ok or failed)
  | 'leader' // a manager won the election
  | 'agent' // agent event (joined, self-fenced, left)
  | 'process' // ground truth: a resource's process on a node started, stopped, failed, killed
  | 'hw' // simulated hardware: power, watchdog, fence device action, network, store
  | 'expect' // an expectation checked
  | 'violation'; // an invariant broken

export interface LogEntry {
  /** simulated ms since the start */
  t: number;
  type: LogType;
  /** node the entry is about (or where the resource is) */
  node?: string;
  /** resource id */
  resource?: string;
  /** new state (node/resource/process state, fence ok|failed, expect pass|fail) */
  state?: string;
  /** previous state, when known */
  from?: string;
  epoch?: number;
  term?: number;
  /** why (the manager's reason, the command text, the failure) */
  reason?: string;
}

export function formatTime(ms: number): string {
  return (ms / 1000).toFixed(3).padStart(9);
}

export function formatEntry(e: LogEntry): string {
  const subject = [e.resource, e.node && e.resource ? `@${e.node}` : e.node].filter(Boolean).join('');
  const parts = [formatTime(e.t), e.type.padEnd(9), subject.padEnd(14)];
  if (e.state !== undefined)
    parts.push(e.from !== undefined && e.from !== e.state ? `${e.from}->${e.state}` : e.state);
  if (e.epoch !== undefined) parts.push(`epoch=${e.epoch}`);
  if (e.term !== undefined) parts.push(`term=${e.term}`);
  if (e.reason) parts.push(`| ${e.reason}`);
  return parts.join(' ').trimEnd();
}

export function formatLog(entries: readonly LogEntry[]): string {
  return entries.map(formatEntry).join('\n') + '\n';
}
