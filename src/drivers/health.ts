// Health checks of the process driver: exec (argv, exit 0), TCP connect, HTTP GET with an
// expected status. Each probe is bounded by the check's timeoutMs and never throws: it
// resolves with ok, or with an error that says what failed and where.
import { spawn } from 'node:child_process';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { connect } from 'node:net';
import type { HealthCheck } from '../core/spec.js';
import { signalGroup } from './proc.js';

export type ProbeResult = { ok: true } | { ok: false; error: string };

/** stderr/stdout kept from an exec probe for the error message */
const EXEC_OUTPUT_KEEP_BYTES = 2048;

export function describeCheck(check: HealthCheck): string {
  switch (check.type) {
    case 'exec':
      return `exec check ${JSON.stringify(check.command)}`;
    case 'tcp':
      return `tcp check ${check.host}:${check.port}`;
    case 'http':
      return `http check GET ${check.url}`;
  }
}

export function probe(check: HealthCheck, env: NodeJS.ProcessEnv): Promise<ProbeResult> {
  switch (check.type) {
    case 'exec':
      return probeExec(check.command, check.timeoutMs, env);
    case 'tcp':
      return probeTcp(check.host, check.port, check.timeoutMs);
    case 'http':
      return probeHttp(check.url, check.expectStatus, check.timeoutMs);
  }
}

function lastLine(text: string): string {
  const lines = text.split('\n').filter((l) => l.trim() !== '');
  return lines[lines.length - 1]?.trim() ?? '';
}

function probeExec(argv: string[], timeoutMs: number, env: NodeJS.ProcessEnv): Promise<ProbeResult> {
  return new Promise((resolve) => {
    const [cmd, ...args] = argv as [string, ...string[]];
    let output = '';
    let timedOut = false;
    const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const keep = (b: Buffer) => {
      output = (output + b.toString('utf8')).slice(-EXEC_OUTPUT_KEEP_BYTES);
    };
    child.stdout?.on('data', keep);
    child.stderr?.on('data', keep);
    const timer = setTimeout(() => {
      timedOut = true;
      if (child.pid) signalGroup(child.pid, 'SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      resolve({ ok: false, error: `cannot run ${cmd}: ${(e as NodeJS.ErrnoException).code ?? e.message}` });
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (timedOut) return resolve({ ok: false, error: `timed out after ${timeoutMs} ms` });
      if (code === 0) return resolve({ ok: true });
      const why = code !== null ? `exited with code ${code}` : `killed by ${signal}`;
      const line = lastLine(output);
      resolve({ ok: false, error: line ? `${why}: ${line}` : why });
    });
  });
}

function probeTcp(host: string, port: number, timeoutMs: number): Promise<ProbeResult> {
  return new Promise((resolve) => {
    const sock = connect({ host, port });
    const timer = setTimeout(() => {
      sock.destroy();
      resolve({ ok: false, error: `connect timed out after ${timeoutMs} ms` });
    }, timeoutMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.destroy();
      resolve({ ok: true });
    });
    sock.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve({ ok: false, error: e.code ?? e.message });
    });
  });
}

function probeHttp(url: string, expectStatus: number, timeoutMs: number): Promise<ProbeResult> {
  return new Promise((resolve) => {
    let done = false;
    const finish = (r: ProbeResult) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      req.destroy();
      resolve(r);
    };
    const request = url.startsWith('https:') ? httpsRequest : httpRequest;
    // agent: false: a fresh connection per probe, nothing pooled between probes
    const req = request(url, { method: 'GET', agent: false }, (res) => {
      res.resume();
      const status = res.statusCode ?? 0;
      finish(
        status === expectStatus
          ? { ok: true }
          : { ok: false, error: `status ${status}, expected ${expectStatus}` },
      );
    });
    const timer = setTimeout(
      () => finish({ ok: false, error: `timed out after ${timeoutMs} ms` }),
      timeoutMs,
    );
    req.on('error', (e: NodeJS.ErrnoException) => finish({ ok: false, error: e.code ?? e.message }));
    req.end();
  });
}
