// Live progress on stderr. On a TTY: one line rewritten in place (at most every redrawMinMs).
// Not a TTY (logs, CI): a plain line at most every quietEveryMs, so logs are not spammed.
export const progressLimits = { redrawMinMs: 200, quietEveryMs: 10_000 } as const;

export function fmtBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function fmtRate(bps: number): string {
  return `${fmtBytes(bps)}/s`;
}

export function fmtEta(remainingBytes: number, bps: number): string {
  if (remainingBytes <= 0) return '0s';
  if (bps <= 0) return '?';
  const s = Math.ceil(remainingBytes / bps);
  return s >= 3600
    ? `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`
    : s >= 60
      ? `${Math.floor(s / 60)}m${s % 60}s`
      : `${s}s`;
}

/** Moving rate over a window of samples. */
export class RateMeter {
  private samples: { atMs: number; bytes: number }[] = [];
  constructor(private readonly windowMs = 3000) {}
  add(atMs: number, bytes: number): number {
    this.samples.push({ atMs, bytes });
    while (this.samples.length > 2 && atMs - this.samples[0]!.atMs > this.windowMs) this.samples.shift();
    const first = this.samples[0]!;
    const dt = atMs - first.atMs;
    return dt > 0 ? ((bytes - first.bytes) * 1000) / dt : 0;
  }
}

export class ProgressLine {
  private lastDrawMs = 0;
  private shown = false;
  constructor(
    private readonly out: NodeJS.WriteStream = process.stderr,
    private readonly quiet = false,
  ) {}

  private get tty(): boolean {
    return Boolean(this.out.isTTY);
  }

  update(text: string, force = false): void {
    if (this.quiet) return;
    const now = Date.now();
    const every = this.tty ? progressLimits.redrawMinMs : progressLimits.quietEveryMs;
    if (!force && now - this.lastDrawMs < every) return;
    this.lastDrawMs = now;
    if (this.tty) {
      this.out.write(`\r\x1b[K${text}`);
      this.shown = true;
    } else this.out.write(`${text}\n`);
  }

  /** A one-off event line (clears the live line first on a TTY). */
  log(text: string): void {
    if (this.tty && this.shown) {
      this.out.write('\r\x1b[K');
      this.shown = false;
    }
    this.out.write(`${text}\n`);
  }

  done(): void {
    if (this.tty && this.shown) this.out.write('\n');
    this.shown = false;
  }
}
