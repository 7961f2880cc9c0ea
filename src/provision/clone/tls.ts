// TLS for `corral clone` (--tls):
//   control  receiver -> server: the server's certificate (given, or self-signed with the openssl CLI
//            at start); a receiver checks it by its SHA-256 fingerprint (printed by serve) or a CA.
//   data     every chain link (server -> first receiver, receiver -> receiver): TLS with a pre-shared
//            key derived from the session secret (HKDF), so receivers need no certificate of their own
//            and only holders of the secret can even complete the handshake. The link HELLO MAC still
//            authenticates who is who, as without TLS.
import { execFile } from 'node:child_process';
import { X509Certificate, hkdfSync } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Duplex } from 'node:stream';
import tls from 'node:tls';
import { promisify } from 'node:util';
import { CloneError, CloneRefusedError } from './errors.js';

const run = promisify(execFile);

export const tlsLimits = {
  handshakeTimeoutMs: 5000,
  opensslTimeoutMs: 30_000,
  /** Validity of a generated certificate: one cloning session, with margin. */
  generatedCertDays: 7,
} as const;

/** TLS 1.2 PSK suites (Node has no TLS 1.3 PSK): forward secret first. */
const linkCiphers = 'ECDHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256';
const linkIdentity = 'corral-clone-link';

export interface ServerTls {
  cert: string;
  key: string;
  /** SHA-256 fingerprint, colon-separated upper-case hex (as openssl prints it). */
  fingerprint: string;
}

/** How a receiver checks the server: a fingerprint, or a CA file (standard verification). */
export type ClientTls = { fingerprint: string } | { ca: string; caFile: string };

export function normalizeFingerprint(fp: string): string {
  const hex = fp
    .replace(/^sha256:/i, '')
    .replace(/[:\s]/g, '')
    .toUpperCase();
  if (!/^[0-9A-F]{64}$/.test(hex))
    throw new CloneError(
      'CORRAL_CLONE_TLS',
      `--tls-fingerprint ${fp}: expected a SHA-256 fingerprint (64 hex digits, colons allowed)`,
      'copy the fingerprint `corral clone serve --tls` printed',
    );
  return hex.match(/../g)!.join(':');
}

export function certFingerprint(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256.toUpperCase();
}

/** --tls-cert/--tls-key, or a fresh self-signed certificate made with the openssl CLI. */
export async function serverTls(
  certFile: string | undefined,
  keyFile: string | undefined,
  altNames: string[],
): Promise<ServerTls> {
  if (certFile || keyFile) {
    if (!certFile || !keyFile)
      throw new CloneError(
        'CORRAL_CLONE_TLS',
        '--tls-cert and --tls-key go together',
        'give both, or neither',
      );
    const [cert, key] = await Promise.all([readFile(certFile, 'utf8'), readFile(keyFile, 'utf8')]).catch(
      (err: Error) => {
        throw new CloneError('CORRAL_CLONE_TLS', `--tls-cert/--tls-key: ${err.message}`);
      },
    );
    try {
      tls.createSecureContext({ cert, key });
    } catch (err) {
      throw new CloneError(
        'CORRAL_CLONE_TLS',
        `--tls-cert ${certFile} / --tls-key ${keyFile}: ${(err as Error).message}`,
      );
    }
    return { cert, key, fingerprint: certFingerprint(cert) };
  }
  const dir = await mkdtemp(join(tmpdir(), 'corral-clone-tls-'));
  try {
    const san = ['DNS:localhost', 'IP:127.0.0.1', ...altNames].join(',');
    await run(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:P-256',
        '-nodes',
        '-keyout',
        join(dir, 'key.pem'),
        '-out',
        join(dir, 'cert.pem'),
        '-days',
        String(tlsLimits.generatedCertDays),
        '-subj',
        '/CN=corral-clone',
        '-addext',
        `subjectAltName=${san}`,
      ],
      { timeout: tlsLimits.opensslTimeoutMs },
    ).catch((err: NodeJS.ErrnoException & { stderr?: string }) => {
      throw new CloneError(
        'CORRAL_CLONE_TLS',
        err.code === 'ENOENT'
          ? '--tls without --tls-cert needs the openssl command to make a certificate, and it is not installed'
          : `openssl could not make a certificate: ${(err.stderr ?? err.message).trim()}`,
        'install openssl, or give --tls-cert FILE --tls-key FILE',
      );
    });
    const cert = await readFile(join(dir, 'cert.pem'), 'utf8');
    const key = await readFile(join(dir, 'key.pem'), 'utf8');
    return { cert, key, fingerprint: certFingerprint(cert) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * Server side of the control port: wraps a connection whose first bytes (already read) are a TLS
 * ClientHello. A generic Duplex carries those bytes back in front of the rest.
 */
export function acceptControlTls(raw: Socket, first: Buffer, t: ServerTls): tls.TLSSocket {
  const d = new Duplex({
    read() {
      raw.resume();
    },
    write(chunk: Buffer, _enc, cb) {
      raw.write(chunk, cb);
    },
    final(cb) {
      raw.end();
      cb();
    },
    destroy(err, cb) {
      raw.destroy();
      cb(err);
    },
  });
  d.push(first);
  raw.on('data', (c: Buffer) => {
    if (!d.push(c)) raw.pause();
  });
  raw.on('end', () => d.push(null));
  raw.on('close', () => d.destroy());
  return new tls.TLSSocket(d, {
    isServer: true,
    secureContext: tls.createSecureContext({ cert: t.cert, key: t.key }),
  });
}

/** Receiver side of the control connection: TLS, checking the server before a byte is sent. */
export function connectControlTls(
  host: string,
  port: number,
  t: ClientTls,
  timeoutMs: number,
): Promise<tls.TLSSocket> {
  const where = `--server ${host}:${port}`;
  return new Promise((resolve, reject) => {
    const byFingerprint = 'fingerprint' in t;
    const s = tls.connect({
      host,
      port,
      ...(byFingerprint
        ? { rejectUnauthorized: false, checkServerIdentity: () => undefined }
        : { ca: t.ca, rejectUnauthorized: true }),
      servername: /^[\d.]+$|:/.test(host) ? undefined : host,
    });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`TLS connect to ${host}:${port} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    s.once('secureConnect', () => {
      clearTimeout(timer);
      if (byFingerprint) {
        const got = s.getPeerCertificate().fingerprint256?.toUpperCase() ?? '(none)';
        if (got !== t.fingerprint) {
          s.destroy();
          reject(
            new CloneRefusedError(
              'tls',
              `${where} presented a certificate with fingerprint ${got}, not the expected ${t.fingerprint}; refusing to connect (nothing was sent)`,
              'check --tls-fingerprint against what `corral clone serve --tls` printed; someone may be impersonating the server',
            ),
          );
          return;
        }
      }
      resolve(s);
    });
    s.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (err.code === 'ECONNREFUSED' || err.code === 'EHOSTUNREACH' || err.code === 'ETIMEDOUT') {
        reject(err);
        return;
      }
      const plain = /disconnected before secure TLS|wrong version number|packet length too long/i.test(
        err.message,
      );
      reject(
        new CloneRefusedError(
          'tls',
          plain
            ? `${where} does not speak TLS (was serve started without --tls?): ${err.message}`
            : `${where}: TLS verification failed: ${err.message}`,
          plain
            ? 'drop --tls-fingerprint/--tls-ca, or restart serve with --tls'
            : 'byFingerprint' in t
              ? undefined
              : `check that --tls-ca ${'caFile' in t ? t.caFile : ''} signed the server's certificate and that it names ${host}`,
        ),
      );
    });
  });
}

// ---- data links: TLS-PSK from the session secret ----

export function linkPsk(secret: string, session: string): Buffer {
  return Buffer.from(hkdfSync('sha256', secret, 'corral-clone', `link-psk/${session}`, 32));
}

export function connectLinkTls(
  host: string,
  port: number,
  psk: Buffer,
  timeoutMs: number,
): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({
      host,
      port,
      ciphers: linkCiphers,
      maxVersion: 'TLSv1.2',
      pskCallback: () => ({ psk, identity: linkIdentity }),
      checkServerIdentity: () => undefined,
    });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`TLS link to ${host}:${port} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    s.once('secureConnect', () => {
      clearTimeout(timer);
      resolve(s);
    });
    s.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

export function createLinkTlsServer(psk: Buffer, onSocket: (s: tls.TLSSocket) => void): tls.Server {
  return tls.createServer(
    {
      ciphers: linkCiphers,
      maxVersion: 'TLSv1.2',
      pskCallback: (_sock, identity) => (identity === linkIdentity ? psk : null),
      handshakeTimeout: tlsLimits.handshakeTimeoutMs,
    },
    onSocket,
  );
}
