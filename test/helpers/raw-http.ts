/**
 * HTTP/1.1 spoken byte by byte, for requests no well-behaved client would send: malformed
 * request lines and headers, bodies that lie about their length, stall or trickle. Works over
 * TCP and Unix sockets. Every exchange is bounded by a timeout and reports what came back:
 * a parsed response, a connection closed without one, or nothing at all.
 */
import { connect, type Socket } from 'node:net';

export interface Endpoint {
  name: string;
  connect(): Socket;
}

export function tcpEndpoint(name: string, url: string): Endpoint {
  const u = new URL(url);
  return { name, connect: () => connect(Number(u.port), u.hostname) };
}

export function unixEndpoint(name: string, path: string): Endpoint {
  return { name, connect: () => connect({ path }) };
}

export interface RawResponse {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
  /** Bytes after the end the framing (content-length or chunked) announced. */
  extra: number;
  /** The body is shorter than its framing said (the connection closed early). */
  truncated: boolean;
  /** The framing (content-length, chunked) says the body is all there. */
  complete: boolean;
}

export type Outcome =
  | { kind: 'response'; res: RawResponse; ms: number }
  | { kind: 'closed'; bytes: number; ms: number }
  | { kind: 'timeout'; bytes: number; ms: number };

/** A step of a request written over time: bytes, then a pause. */
export interface Write {
  data: Buffer | string;
  thenWaitMs?: number;
}

/**
 * Sends a request (all at once, or as timed writes) and reads until the server closes the
 * connection (requests should say `connection: close`), the response is complete by its framing
 * (then bytes arriving in the next moment still count as extra), or `timeoutMs` passes. A 101
 * answer is returned as soon as its head is in, and the socket closed.
 */
export function exchange(
  ep: Endpoint,
  request: Buffer | string | Write[],
  timeoutMs: number,
): Promise<Outcome> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    const socket = ep.connect();
    const chunks: Buffer[] = [];
    let size = 0;
    let settled = false;
    const finish = (o: Outcome): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(o);
    };
    const timer = setTimeout(() => finish({ kind: 'timeout', bytes: size, ms: Date.now() - t0 }), timeoutMs);
    socket.on('error', () => {
      // a reset while we still write: what was read so far is judged on close
    });
    let grace: NodeJS.Timeout | undefined;
    const done = (): void => {
      clearTimeout(grace);
      const ms = Date.now() - t0;
      const res = parseResponse(Buffer.concat(chunks));
      finish(res ? { kind: 'response', res, ms } : { kind: 'closed', bytes: size, ms });
    };
    socket.on('data', (b: Buffer) => {
      chunks.push(b);
      size += b.length;
      if (grace) return;
      const res = parseResponse(Buffer.concat(chunks));
      if (res?.status === 101) done();
      // A server may keep the connection open after a complete answer (keep-alive despite
      // `connection: close`): judge it once what the framing announced is in.
      else if (res?.complete) grace = setTimeout(done, 100);
    });
    socket.on('close', done);
    const writes: Write[] =
      typeof request === 'string' || Buffer.isBuffer(request) ? [{ data: request }] : request;
    void (async () => {
      for (const w of writes) {
        if (settled || socket.destroyed) return;
        socket.write(w.data);
        if (w.thenWaitMs) await new Promise((r) => setTimeout(r, w.thenWaitMs));
      }
    })();
  });
}

/** Parses one response (skipping 1xx interim answers other than 101); undefined without a head. */
export function parseResponse(buf: Buffer): RawResponse | undefined {
  let at = 0;
  for (;;) {
    const end = buf.indexOf('\r\n\r\n', at);
    if (end < 0) return undefined;
    const head = buf.subarray(at, end).toString('latin1').split('\r\n');
    const m = /^HTTP\/1\.[01] (\d{3})/.exec(head[0] ?? '');
    if (!m) return undefined;
    const status = Number(m[1]);
    const headers: Record<string, string> = {};
    for (const line of head.slice(1)) {
      const i = line.indexOf(':');
      if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
    }
    const rest = buf.subarray(end + 4);
    if (status >= 100 && status < 200 && status !== 101) {
      at = end + 4;
      continue;
    }
    if (status === 101)
      return { status, headers, body: Buffer.alloc(0), extra: 0, truncated: false, complete: true };
    if ((headers['transfer-encoding'] ?? '').toLowerCase() === 'chunked')
      return dechunk(status, headers, rest);
    const len = headers['content-length'];
    if (len !== undefined) {
      const n = Number(len);
      return {
        status,
        headers,
        body: rest.subarray(0, n),
        extra: Math.max(0, rest.length - n),
        truncated: rest.length < n,
        complete: rest.length >= n,
      };
    }
    return { status, headers, body: rest, extra: 0, truncated: false, complete: false };
  }
}

function dechunk(status: number, headers: Record<string, string>, rest: Buffer): RawResponse {
  const parts: Buffer[] = [];
  let at = 0;
  for (;;) {
    const eol = rest.indexOf('\r\n', at);
    if (eol < 0) break;
    const n = Number.parseInt(rest.subarray(at, eol).toString('latin1'), 16);
    if (!Number.isFinite(n)) break;
    if (n === 0) {
      const end = rest.indexOf('\r\n\r\n', eol);
      const after = end < 0 ? rest.length : end + 4;
      return {
        status,
        headers,
        body: Buffer.concat(parts),
        extra: rest.length - after,
        truncated: end < 0,
        complete: end >= 0,
      };
    }
    if (eol + 2 + n + 2 > rest.length) break;
    parts.push(rest.subarray(eol + 2, eol + 2 + n));
    at = eol + 2 + n + 2;
  }
  return { status, headers, body: Buffer.concat(parts), extra: 0, truncated: true, complete: false };
}

/** A request as bytes; `target` may hold anything, even bytes no client would put there. */
export function rawRequest(
  method: string,
  target: string | Buffer,
  headers: [string, string | Buffer][] = [],
  body?: Buffer | string,
  opts: { contentLength?: number | null } = {},
): Buffer {
  const lines: Buffer[] = [
    Buffer.from(`${method} `, 'latin1'),
    Buffer.isBuffer(target) ? target : Buffer.from(target, 'utf8'),
    Buffer.from(' HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n', 'latin1'),
  ];
  for (const [k, v] of headers)
    lines.push(Buffer.from(`${k}: `, 'latin1'), Buffer.from(v), Buffer.from('\r\n'));
  const b = body === undefined ? undefined : Buffer.from(body);
  const len = opts.contentLength === undefined ? b?.length : opts.contentLength;
  if (len !== undefined && len !== null) lines.push(Buffer.from(`content-length: ${len}\r\n`));
  lines.push(Buffer.from('\r\n'));
  if (b) lines.push(b);
  return Buffer.concat(lines);
}
