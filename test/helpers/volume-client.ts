import { createHash } from 'node:crypto';
import { request } from 'node:http';

/** Deterministic bytes (a counter hashed in blocks): a large body without holding it in memory. */
export function* patternChunks(total: number, seed: string, chunk = 256 * 1024): Generator<Buffer> {
  let made = 0;
  let n = 0;
  while (made < total) {
    const size = Math.min(chunk, total - made);
    const out = Buffer.alloc(size);
    for (let off = 0; off < size; off += 32)
      createHash('sha256').update(`${seed}:${n++}`).digest().copy(out, off);
    made += size;
    yield out;
  }
}

export function patternSha(total: number, seed: string): string {
  const h = createHash('sha256');
  for (const c of patternChunks(total, seed)) h.update(c);
  return h.digest('hex');
}

export interface PutResult {
  status: number;
  body: Record<string, unknown>;
  /** Bytes written before the answer came (or the connection closed). */
  sent: number;
}

/**
 * PUT /v1/volumes/{id}/file over node:http, the body written chunk by chunk (waiting for
 * drain), so an answer that comes before the body ends (an error mid-upload) is seen; `onSent`
 * runs after each chunk (a test kills the store there). `delayMs` between chunks: a slow client.
 */
export function putFile(
  base: string,
  id: string,
  path: string,
  chunks: Iterable<Buffer>,
  opts: {
    headers?: Record<string, string>;
    query?: string;
    onSent?: (sent: number) => void | Promise<void>;
    delayMs?: number;
    length?: number;
  } = {},
): Promise<PutResult> {
  return new Promise((resolve, reject) => {
    const url = new URL(`/v1/volumes/${id}/file?path=${encodeURIComponent(path)}${opts.query ?? ''}`, base);
    let sent = 0;
    let answered = false;
    const req = request(
      url,
      {
        method: 'PUT',
        headers: {
          'content-type': 'application/octet-stream',
          ...(opts.length !== undefined ? { 'content-length': String(opts.length) } : {}),
          ...(opts.headers ?? {}),
        },
      },
      (res) => {
        answered = true;
        const parts: Buffer[] = [];
        res.on('data', (b: Buffer) => parts.push(b));
        res.on('error', () => {});
        res.on('end', () => {
          const text = Buffer.concat(parts).toString('utf8');
          let body: Record<string, unknown> = {};
          try {
            body = text ? (JSON.parse(text) as Record<string, unknown>) : {};
          } catch {
            body = { raw: text };
          }
          resolve({ status: res.statusCode ?? 0, body, sent });
        });
      },
    );
    // The server may answer (an error) before the body is all sent, then close: the write
    // fails (EPIPE, reset) just before the answer is read. Give the answer a moment.
    req.on('error', (e) => {
      setTimeout(() => {
        if (!answered) reject(Object.assign(e, { sent }));
      }, 1000);
    });
    (async () => {
      for (const c of chunks) {
        if (answered || req.destroyed) return;
        if (!req.write(c)) await new Promise((r) => req.once('drain', r));
        sent += c.length;
        await opts.onSent?.(sent);
        if (opts.delayMs) await new Promise((r) => setTimeout(r, opts.delayMs));
      }
      req.end();
    })().catch(() => req.destroy());
  });
}

/** GET /v1/volumes/{id}/file: status, sha256 and length of the body. */
export async function getFileSha(
  base: string,
  id: string,
  path: string,
  headers: Record<string, string> = {},
): Promise<{ status: number; sha: string; bytes: number; length: string | null; body: string }> {
  const res = await fetch(new URL(`/v1/volumes/${id}/file?path=${encodeURIComponent(path)}`, base), {
    headers,
  });
  const h = createHash('sha256');
  let bytes = 0;
  let first = '';
  for await (const c of res.body as unknown as AsyncIterable<Uint8Array>) {
    h.update(c);
    if (bytes < 4096) first += Buffer.from(c).toString('utf8');
    bytes += c.length;
  }
  return {
    status: res.status,
    sha: h.digest('hex'),
    bytes,
    length: res.headers.get('content-length'),
    body: first,
  };
}
