import { randomBytes } from 'node:crypto';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { Readable } from 'node:stream';
import WebSocket from 'ws';
import { ApiError, openedSocket } from './http-client.js';

/** Where the boxes API is: a Unix socket path or an http://host:port URL. */
export type BoxesEndpoint = { socketPath: string } | { url: string };

export interface SseEvent {
  event: string;
  data: { stream: 'stdout' | 'stderr' | null; data: string; seq: number; encoding?: 'base64' };
}

/**
 * A thin client of the boxes API over a Unix socket or TCP (the tests and the CLI use it).
 * Adds no behaviour: each method is one request.
 */
export class BoxesClient {
  /** `headers` go with every request (e.g. an `authorization` bearer token). */
  constructor(
    readonly endpoint: BoxesEndpoint,
    private readonly headers: Record<string, string> = {},
  ) {}

  /** One request; resolves with the response once its headers have arrived. */
  raw(
    method: string,
    path: string,
    opts: { headers?: Record<string, string>; body?: Buffer | string | Readable } = {},
  ): Promise<IncomingMessage> {
    const target =
      'socketPath' in this.endpoint
        ? { socketPath: this.endpoint.socketPath, path, host: 'boxrun' }
        : (() => {
            const u = new URL(path, (this.endpoint as { url: string }).url);
            return { host: u.hostname, port: u.port, path: `${u.pathname}${u.search}` };
          })();
    return new Promise((resolve, reject) => {
      const req = httpRequest({ ...target, method, headers: { ...this.headers, ...opts.headers } }, resolve);
      req.on('error', (e) =>
        reject(new ApiError(0, 'UNREACHABLE', `cannot reach the boxes API (${(e as Error).message})`)),
      );
      const b = opts.body;
      if (b === undefined) req.end();
      else if (typeof b === 'string' || Buffer.isBuffer(b)) req.end(b);
      else b.pipe(req);
    });
  }

  async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.raw(method, path, {
      ...(body === undefined
        ? {}
        : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }),
    });
    const text = (await readAll(res)).toString('utf8');
    const value: unknown = text ? JSON.parse(text) : undefined;
    if ((res.statusCode ?? 500) >= 400) {
      const e = (value ?? {}) as { code?: string; message?: string };
      throw new ApiError(res.statusCode ?? 500, e.code ?? `HTTP_${res.statusCode}`, e.message ?? '');
    }
    return value as T;
  }

  create<T = Record<string, unknown>>(body: Record<string, unknown>): Promise<T> {
    return this.json('POST', '/v1/boxes', body);
  }
  list<T = { boxes: Record<string, unknown>[] }>(status?: 'running' | 'stopped'): Promise<T> {
    return this.json('GET', `/v1/boxes${status ? `?status=${status}` : ''}`);
  }
  get<T = Record<string, unknown>>(id: string): Promise<T> {
    return this.json('GET', `/v1/boxes/${encodeURIComponent(id)}`);
  }
  stop<T = Record<string, unknown>>(id: string): Promise<T> {
    return this.json('POST', `/v1/boxes/${encodeURIComponent(id)}:stop`);
  }
  start<T = Record<string, unknown>>(id: string): Promise<T> {
    return this.json('POST', `/v1/boxes/${encodeURIComponent(id)}:start`);
  }
  remove(id: string, force = false): Promise<void> {
    return this.json('DELETE', `/v1/boxes/${encodeURIComponent(id)}${force ? '?force=true' : ''}`);
  }
  exec<T = Record<string, unknown>>(id: string, body: Record<string, unknown>): Promise<T> {
    return this.json('POST', `/v1/boxes/${encodeURIComponent(id)}/exec`, body);
  }
  execs<T = { execs: Record<string, unknown>[] }>(id: string): Promise<T> {
    return this.json('GET', `/v1/boxes/${encodeURIComponent(id)}/execs`);
  }
  getExec<T = Record<string, unknown>>(id: string, eid: string): Promise<T> {
    return this.json('GET', `/v1/boxes/${encodeURIComponent(id)}/exec/${encodeURIComponent(eid)}`);
  }
  cancel<T = Record<string, unknown>>(id: string, eid: string): Promise<T> {
    return this.json('POST', `/v1/boxes/${encodeURIComponent(id)}/exec/${encodeURIComponent(eid)}:cancel`);
  }
  info<T = Record<string, unknown>>(): Promise<T> {
    return this.json('GET', '/v1/info');
  }
  run<T = Record<string, unknown>>(body: Record<string, unknown>): Promise<T> {
    return this.json('POST', '/v1/run', body);
  }
  gc<T = { removed: number }>(olderThan?: number): Promise<T> {
    return this.json('POST', '/v1/gc', olderThan === undefined ? {} : { older_than: olderThan });
  }

  /** The exec's events as the server sends them (SSE), replay first, until the exit event. */
  async *events(id: string, eid: string): AsyncGenerator<SseEvent> {
    const res = await this.raw(
      'GET',
      `/v1/boxes/${encodeURIComponent(id)}/exec/${encodeURIComponent(eid)}/events`,
      { headers: { accept: 'text/event-stream' } },
    );
    if ((res.statusCode ?? 500) >= 400) {
      const e = JSON.parse((await readAll(res)).toString('utf8')) as { code: string; message: string };
      throw new ApiError(res.statusCode ?? 500, e.code, e.message);
    }
    let buf = '';
    res.setEncoding('utf8');
    for await (const chunk of res as AsyncIterable<string>) {
      buf += chunk;
      for (let i = buf.indexOf('\n\n'); i >= 0; i = buf.indexOf('\n\n')) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        let event = 'message';
        let data = '';
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) event = line.slice(6).trim();
          else if (line.startsWith('data:')) data += line.slice(5).trimStart();
        }
        yield { event, data: JSON.parse(data) as SseEvent['data'] };
      }
    }
  }

  /** Uploads bytes as multipart/form-data (fields dest, then file). */
  async upload(
    id: string,
    dest: string,
    body: Buffer | Readable,
    filename = 'upload',
  ): Promise<{ ok: boolean; dest: string; size: number }> {
    const boundary = `hutch${randomBytes(12).toString('hex')}`;
    const head = Buffer.from(
      `--${boundary}\r\ncontent-disposition: form-data; name="dest"\r\n\r\n${dest}\r\n` +
        `--${boundary}\r\ncontent-disposition: form-data; name="file"; filename="${filename}"\r\n` +
        'content-type: application/octet-stream\r\n\r\n',
    );
    const tail = Buffer.from(`\r\n--${boundary}--\r\n`);
    const stream = Readable.from(
      (async function* () {
        yield head;
        if (Buffer.isBuffer(body)) yield body;
        else for await (const c of body) yield c as Buffer;
        yield tail;
      })(),
    );
    const res = await this.raw('POST', `/v1/boxes/${encodeURIComponent(id)}/files/upload`, {
      headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
      body: stream,
    });
    const text = (await readAll(res)).toString('utf8');
    const value = JSON.parse(text) as {
      ok: boolean;
      dest: string;
      size: number;
      code?: string;
      message?: string;
    };
    if ((res.statusCode ?? 500) >= 400)
      throw new ApiError(res.statusCode ?? 500, value.code ?? '', value.message ?? '');
    return value;
  }

  /** Downloads a file; the response body streams the bytes. */
  async download(id: string, path: string): Promise<IncomingMessage> {
    const res = await this.raw('POST', `/v1/boxes/${encodeURIComponent(id)}/files/download`, {
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ path }),
    });
    if ((res.statusCode ?? 500) >= 400) {
      const e = JSON.parse((await readAll(res)).toString('utf8')) as { code: string; message: string };
      throw new ApiError(res.statusCode ?? 500, e.code, e.message);
    }
    return res;
  }

  /** Opens the attach WebSocket (binary frames: terminal I/O; text frames: JSON control). */
  attach(id: string, q: { shell?: string; cols?: number; rows?: number; term?: string } = {}): WebSocket {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(q)) if (v !== undefined) params.set(k, String(v));
    const path = `/v1/boxes/${encodeURIComponent(id)}/attach${params.size ? `?${params}` : ''}`;
    return 'socketPath' in this.endpoint
      ? new WebSocket(`ws+unix://${this.endpoint.socketPath}:${path}`, { headers: this.headers })
      : new WebSocket(new URL(path, this.endpoint.url.replace(/^http/, 'ws')), { headers: this.headers });
  }

  /** attach, resolved once the terminal is open (paused); a refused upgrade rejects with ApiError. */
  openAttach(
    id: string,
    q: { shell?: string; cols?: number; rows?: number; term?: string } = {},
  ): Promise<WebSocket> {
    return openedSocket(this.attach(id, q), (cause) => `cannot reach the boxes API (${cause})`);
  }
}

export async function readAll(r: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of r) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}
