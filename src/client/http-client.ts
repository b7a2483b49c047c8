import { createReadStream } from 'node:fs';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { Readable } from 'node:stream';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { WebSocket } from 'ws';

/** One event of a streamed exec, decoded: output bytes, or the end. */
export type ExecStreamEvent =
  | { type: 'stdout' | 'stderr'; data: Buffer }
  | { type: 'exit'; exit_code: number | null; signal: number | null; timed_out: boolean; duration_ms: number }
  | { type: 'error'; code: string; message: string };

/**
 * A thin client of the public machines API. The CLI (and later the SDK and MCP server) use only
 * this: adapters add no behaviour of their own.
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

export class HutchClient {
  /** `authorization()`: the header to send (a bearer token), or undefined for none. */
  constructor(
    readonly baseUrl: string,
    private readonly authorization: () => Promise<string | undefined> = async () => undefined,
  ) {}

  /** `extra` plus the credential, if any. */
  private async headers(extra: Record<string, string> = {}): Promise<Record<string, string>> {
    let a: string | undefined;
    try {
      a = await this.authorization();
    } catch (e) {
      const err = e as { status?: number; code?: string; message: string };
      throw new ApiError(
        err.status ?? 0,
        err.code ?? 'UNAUTHENTICATED',
        `cannot get a token: ${err.message}`,
      );
    }
    return a ? { ...extra, authorization: a } : extra;
  }

  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    let res: Response;
    try {
      res = await fetch(new URL(path, this.baseUrl), {
        method,
        headers: await this.headers(body === undefined ? {} : { 'content-type': 'application/json' }),
        body: body === undefined ? null : JSON.stringify(body),
      });
    } catch (e) {
      const cause = (e as { cause?: { code?: string } }).cause?.code ?? (e as Error).message;
      throw new ApiError(
        0,
        'UNREACHABLE',
        `cannot reach the hutch daemon at ${this.baseUrl} (${cause}); is \`hutch serve\` running?`,
      );
    }
    const text = await res.text();
    const json: unknown = text ? JSON.parse(text) : undefined;
    if (!res.ok) {
      const e = (json ?? {}) as { code?: string; message?: string };
      throw new ApiError(res.status, e.code ?? `HTTP_${res.status}`, e.message ?? res.statusText);
    }
    return json as T;
  }

  health<T = Record<string, unknown>>(): Promise<T> {
    return this.request('GET', '/healthz');
  }
  createMachine<T = Record<string, unknown>>(body: Record<string, unknown>): Promise<T> {
    return this.request('POST', '/v1/machines', body);
  }
  listMachines<T = { machines: Record<string, unknown>[] }>(): Promise<T> {
    return this.request('GET', '/v1/machines');
  }
  getMachine<T = Record<string, unknown>>(id: string): Promise<T> {
    return this.request('GET', `/v1/machines/${encodeURIComponent(id)}`);
  }
  destroyMachine(id: string): Promise<void> {
    return this.request('DELETE', `/v1/machines/${encodeURIComponent(id)}`);
  }
  /** `body.cmd`: an argv, or one string run with /bin/sh -c. Waits as long as the command runs. */
  exec<T = Record<string, unknown>>(id: string, body: Record<string, unknown>): Promise<T> {
    return this.requestUntimed('POST', `/v1/machines/${encodeURIComponent(id)}/exec`, body);
  }

  /**
   * request() over node:http rather than fetch: a buffered exec answers only when its command
   * ends, and fetch gives up on an answer whose headers take over 300 s (undici's
   * headersTimeout), which an agent's task outlasts. The command's own timeout bounds the wait.
   */
  private async requestUntimed<T>(method: string, path: string, body: unknown): Promise<T> {
    const res = await this.openUntimed(method, new URL(path, this.baseUrl), body);
    const chunks: Buffer[] = [];
    try {
      for await (const c of res) chunks.push(c as Buffer);
    } catch (e) {
      throw this.unreachable(e as Error);
    }
    const text = Buffer.concat(chunks).toString('utf8');
    return (text ? JSON.parse(text) : undefined) as T;
  }

  private unreachable(e: Error & { code?: string }): ApiError {
    return new ApiError(
      0,
      'UNREACHABLE',
      `cannot reach the hutch daemon at ${this.baseUrl} (${e.code ?? e.message}); is \`hutch serve\` running?`,
    );
  }

  /**
   * Sends a JSON request with node:http (no timeout: see requestUntimed) and resolves with the
   * answer once its headers are in; an error answer becomes ApiError. Aborting `signal`
   * destroys the request.
   */
  private async openUntimed(
    method: string,
    url: URL,
    body: unknown,
    signal?: AbortSignal,
  ): Promise<IncomingMessage> {
    const payload = JSON.stringify(body);
    const headers = await this.headers({
      'content-type': 'application/json',
      'content-length': String(Buffer.byteLength(payload)),
    });
    const res = await new Promise<IncomingMessage>((resolve, reject) => {
      const send = url.protocol === 'https:' ? httpsRequest : httpRequest;
      const req = send(url, { method, headers, ...(signal ? { signal } : {}) }, resolve);
      req.on('error', (e) => reject(e.name === 'AbortError' ? e : this.unreachable(e)));
      req.end(payload);
    });
    // A request destroyed by its caller (an abort, a loop left early) must not leave an
    // 'error' event nobody hears.
    res.on('error', () => {});
    const status = res.statusCode ?? 0;
    if (status >= 200 && status <= 299) return res;
    const chunks: Buffer[] = [];
    for await (const c of res) chunks.push(c as Buffer);
    let e: { code?: string; message?: string } = {};
    try {
      e = JSON.parse(Buffer.concat(chunks).toString('utf8')) as typeof e;
    } catch {
      // not JSON
    }
    throw new ApiError(
      status,
      e.code ?? `HTTP_${status}`,
      e.message ?? (res.statusMessage || `HTTP ${status}`),
    );
  }
  /** Forks a running machine into a live clone (`hutch fork`): POST /branch. */
  branch<T = Record<string, unknown>>(id: string, body: Record<string, unknown> = {}): Promise<T> {
    return this.request('POST', `/v1/machines/${encodeURIComponent(id)}/branch`, body);
  }

  private machinePath(id: string, rest: string): URL {
    return new URL(`/v1/machines/${encodeURIComponent(id)}/${rest}`, this.baseUrl);
  }

  /** fetch, with a daemon that is down or an error answer turned into ApiError. */
  private async send(url: URL, init: RequestInit & { duplex?: 'half' }): Promise<Response> {
    let res: Response;
    const headers = await this.headers((init.headers ?? {}) as Record<string, string>);
    try {
      res = await fetch(url, { ...init, headers });
    } catch (e) {
      if ((e as Error).name === 'AbortError') throw e;
      const cause = (e as { cause?: { code?: string } }).cause?.code ?? (e as Error).message;
      throw new ApiError(
        0,
        'UNREACHABLE',
        `cannot reach the hutch daemon at ${this.baseUrl} (${cause}); is \`hutch serve\` running?`,
      );
    }
    if (!res.ok) {
      const text = await res.text();
      let e: { code?: string; message?: string } = {};
      try {
        e = JSON.parse(text) as typeof e;
      } catch {
        // not JSON
      }
      throw new ApiError(res.status, e.code ?? `HTTP_${res.status}`, e.message ?? res.statusText);
    }
    return res;
  }

  /**
   * Runs a command with POST /exec/stream and yields its output as it arrives (bytes exact),
   * then its exit. Aborting `signal` (or leaving the loop early) kills the command.
   */
  async *execStream(
    id: string,
    body: Record<string, unknown>,
    signal?: AbortSignal,
  ): AsyncGenerator<ExecStreamEvent> {
    const ac = new AbortController();
    const onAbort = (): void => ac.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      // node:http, not fetch: fetch cuts an answer silent for 300 s (undici's bodyTimeout),
      // and an agent's command may print nothing for longer.
      const res = await this.openUntimed('POST', this.machinePath(id, 'exec/stream'), body, ac.signal);
      let pending = '';
      const decoder = new TextDecoder();
      const parse = (line: string): ExecStreamEvent => {
        const e = JSON.parse(line) as { type: string; data?: string; encoding?: string };
        if (e.type === 'stdout' || e.type === 'stderr')
          return {
            type: e.type,
            data: Buffer.from(e.data ?? '', e.encoding === 'base64' ? 'base64' : 'utf8'),
          };
        return e as ExecStreamEvent;
      };
      for await (const chunk of res as AsyncIterable<Buffer>) {
        pending += decoder.decode(chunk, { stream: true });
        let nl = pending.indexOf('\n');
        while (nl >= 0) {
          const line = pending.slice(0, nl);
          pending = pending.slice(nl + 1);
          if (line.trim()) yield parse(line);
          nl = pending.indexOf('\n');
        }
      }
      pending += decoder.decode();
      if (pending.trim()) yield parse(pending);
    } finally {
      signal?.removeEventListener('abort', onAbort);
      ac.abort();
    }
  }

  /** Streams a local file (or any byte stream) to /root/<name> in the machine. */
  async upload(id: string, name: string, source: string | Readable): Promise<{ path: string; size: number }> {
    const stream = typeof source === 'string' ? createReadStream(source) : source;
    const res = await this.send(this.machinePath(id, 'upload'), {
      method: 'POST',
      headers: { 'content-type': 'application/octet-stream', 'x-filename': encodeURIComponent(name) },
      body: Readable.toWeb(stream) as unknown as BodyInit,
      duplex: 'half',
    });
    return (await res.json()) as { path: string; size: number };
  }

  // ---- persistent volumes ----------------------------------------------------------------

  createVolume<T = Record<string, unknown>>(body: Record<string, unknown> = {}): Promise<T> {
    return this.request('POST', '/v1/volumes', body);
  }
  listVolumes<T = { volumes: Record<string, unknown>[] }>(): Promise<T> {
    return this.request('GET', '/v1/volumes');
  }
  getVolume<T = Record<string, unknown>>(id: string): Promise<T> {
    return this.request('GET', `/v1/volumes/${encodeURIComponent(id)}`);
  }
  deleteVolume(id: string): Promise<void> {
    return this.request('DELETE', `/v1/volumes/${encodeURIComponent(id)}`);
  }
  volumeFiles<T = { files: Record<string, unknown>[] }>(id: string): Promise<T> {
    return this.request('GET', `/v1/volumes/${encodeURIComponent(id)}/files`);
  }
  /** Saves the machine's /root into the volume; waits as long as the save runs (no timeout). */
  saveMachine<T = Record<string, unknown>>(id: string, volume: string): Promise<T> {
    return this.requestUntimed(
      'POST',
      `/v1/machines/${encodeURIComponent(id)}/save?volume=${encodeURIComponent(volume)}`,
      {},
    );
  }

  private volumeFileUrl(id: string, path: string): URL {
    const url = new URL(`/v1/volumes/${encodeURIComponent(id)}/file`, this.baseUrl);
    url.searchParams.set('path', path);
    return url;
  }

  /** Streams a local file (or any byte stream) into the volume at `path`. */
  async putVolumeFile(
    id: string,
    path: string,
    source: string | Readable,
    mode?: string,
  ): Promise<{ path: string; size: number }> {
    const url = this.volumeFileUrl(id, path);
    if (mode !== undefined) url.searchParams.set('mode', mode);
    const stream = typeof source === 'string' ? createReadStream(source) : source;
    const res = await this.send(url, {
      method: 'PUT',
      headers: { 'content-type': 'application/octet-stream' },
      body: Readable.toWeb(stream) as unknown as BodyInit,
      duplex: 'half',
    });
    return (await res.json()) as { path: string; size: number };
  }

  /** A file of a volume as a byte stream, and its size. */
  async getVolumeFile(id: string, path: string): Promise<{ stream: Readable; size: number | undefined }> {
    const res = await this.send(this.volumeFileUrl(id, path), { method: 'GET' });
    const len = res.headers.get('content-length');
    return {
      stream: Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>),
      size: len === null ? undefined : Number(len),
    };
  }

  /** A file of the machine as a byte stream (and its size when the server knows it). */
  async download(id: string, path: string): Promise<{ stream: Readable; size: number | undefined }> {
    const url = this.machinePath(id, 'download');
    url.searchParams.set('path', path);
    const res = await this.send(url, { method: 'GET' });
    const len = res.headers.get('content-length');
    return {
      stream: Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>),
      size: len === null ? undefined : Number(len),
    };
  }

  /**
   * Opens a WebSocket channel of a machine (`tty`, `attach`), resolving once it is open; an
   * error answer to the upgrade becomes ApiError. The socket comes back paused (the server may
   * send its first frames, e.g. the console replay, together with the handshake): attach the
   * 'message' listener, then call `resume()`.
   */
  async openChannel(id: string, channel: string, query: Record<string, string> = {}): Promise<WebSocket> {
    const url = this.machinePath(id, channel);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
    return openedSocket(
      new WebSocket(url, { headers: await this.headers() }),
      (cause) => `cannot reach the hutch daemon at ${this.baseUrl} (${cause}); is \`hutch serve\` running?`,
    );
  }
}

/**
 * Resolves with the WebSocket once it is open (paused, so no frame is lost before the caller
 * listens); a refused upgrade rejects with the server's {"code","message"} as an ApiError.
 */
export function openedSocket(ws: WebSocket, unreachable: (cause: string) => string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    ws.once('open', () => {
      ws.pause();
      resolve(ws);
    });
    let refused = false;
    ws.once('unexpected-response', (_req, res) => {
      // The answer's body is the error: read it all, then drop the connection (terminating
      // first would abort the response and report "unreachable" instead).
      refused = true;
      let text = '';
      res.on('data', (b: Buffer) => {
        text += b.toString('utf8');
      });
      res.on('end', () => {
        let e: { code?: string; message?: string } = {};
        try {
          e = JSON.parse(text) as typeof e;
        } catch {
          // not JSON
        }
        const status = res.statusCode ?? 0;
        reject(new ApiError(status, e.code ?? `HTTP_${status}`, e.message ?? (res.statusMessage || 'error')));
        ws.terminate();
      });
    });
    ws.on('error', (e: Error & { code?: string }) => {
      if (!refused) reject(new ApiError(0, 'UNREACHABLE', unreachable(e.code ?? e.message)));
    });
  });
}
