// CPU priority of the agent and of what it starts. The agent renews its lease and feeds the
// watchdog: starved of CPU by the workloads it starts (50 services failing over onto a 2-core
// node), it misses its own deadline and self-fences a healthy node. So the agent raises its
// own priority (corosync and sbd run at real-time priority for the same reason), and every
// resource it spawns is set back to the priority the agent had before (children inherit it).
import { getPriority, setPriority } from 'node:os';

/** the agent's default nice value (`corral agent --nice`) */
export const AGENT_NICE_DEFAULT = -10;

export interface PriorityOutcome {
  /** the nice value resources should run at (the agent's own before it was raised) */
  childNice: number | undefined;
  /** why the priority stayed as it was, when it did */
  warning?: string;
}

/** Set this process's nice value; without the right (not root, no CAP_SYS_NICE) keep it and say why. */
export function raiseOwnPriority(nice: number): PriorityOutcome {
  const before = getPriority();
  if (nice === before) return { childNice: undefined };
  try {
    setPriority(nice);
    return { childNice: before };
  } catch (e) {
    return {
      childNice: undefined,
      warning: `cannot set the agent's nice value to ${nice} (${(e as NodeJS.ErrnoException).code ?? String(e)}): it needs root or CAP_SYS_NICE; the agent runs at nice ${before}, and a busy node may starve its lease renewals`,
    };
  }
}

/**
 * Give a just-spawned child the resources' nice value. Called right after spawn() returns
 * (the child has just exec'd, before it starts threads of its own). Lowering a priority is
 * always allowed; failure (the child already gone) is harmless.
 */
export function resetChildNice(pid: number, nice: number | undefined): void {
  if (nice === undefined) return;
  try {
    setPriority(pid, nice);
  } catch {
    // the child exited already: nothing to lower
  }
}
