import { HutchError } from '../errors.js';

/** Which provider a call goes to: names it in messages and in the usage rows. */
export type UpstreamName = 'anthropic' | 'openrouter';

/** The most of a JSON answer (or an error body) the gateway holds: a hostile upstream cannot make it hold more. */
export const maxUpstreamJsonBytes = 16 * 1024 * 1024;
/** The most one SSE event may hold before it is complete. */
export const maxUpstreamEventBytes = 4 * 1024 * 1024;
const maxErrorBodyBytes = 64 * 1024;

export interface SseEvent {
  event: string;
  data: string;
}

/**
 * One request to a model provider. Its own AbortController is cut by three things: the client
 * going away (`signal`), the watchdog (no response headers, or no body bytes, for `timeoutMs`)
 * and `close()`; once cut, the provider sees its connection closed, so an abandoned generation
 * stops costing tokens.
 */
export class UpstreamCall {
  private readonly ac = new AbortController();
  private timer: NodeJS.Timeout | undefined;
  private timedOut = false;
  private readonly onClientAbort = (): void => this.ac.abort(new Error('the client went away'));

  constructor(
    readonly upstream: UpstreamName,
    private readonly timeoutMs: number,
    private readonly clientSignal?: AbortSignal,
  ) {
    if (clientSignal?.aborted) this.ac.abort(new Error('the client went away'));
    clientSignal?.addEventListener('abort', this.onClientAbort, { once: true });
  }

  /** The client is gone: nothing is answered to anyone, and the row says so. */
  get clientGone(): boolean {
    return this.clientSignal?.aborted === true;
  }

  private touch(): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timedOut = true;
      this.ac.abort(new Error('timeout'));
    }, this.timeoutMs);
  }

  close(): void {
    clearTimeout(this.timer);
    this.clientSignal?.removeEventListener('abort', this.onClientAbort);
    if (!this.ac.signal.aborted) this.ac.abort(new Error('done'));
  }

  /** What a failed read or fetch means to the caller. */
  private failure(e: unknown): HutchError {
    if (e instanceof HutchError) return e;
    if (this.timedOut)
      return new HutchError(
        'UPSTREAM_TIMEOUT',
        `${this.upstream} sent nothing for ${this.timeoutMs} ms (HUTCH_GATEWAY_TIMEOUT_MS)`,
      );
    if (this.clientGone) return new HutchError('INVALID_ARGUMENT', 'the client went away');
    const cause = (e as { cause?: { code?: string; message?: string } }).cause;
    return new HutchError(
      'UPSTREAM_FAILED',
      `${this.upstream} could not be reached or broke the connection (${cause?.code ?? cause?.message ?? (e as Error).message})`,
    );
  }

  /** Sends the request; a non-2xx answer is thrown as the HutchError it maps to. */
  async send(
    url: string,
    init: { method: 'GET' | 'POST'; headers: Record<string, string>; body?: string },
  ): Promise<Response> {
    this.touch();
    let res: Response;
    try {
      res = await fetch(url, { ...init, signal: this.ac.signal });
    } catch (e) {
      this.close();
      throw this.failure(e);
    }
    if (res.ok) return res;
    let text = '';
    try {
      text = new TextDecoder().decode(await this.readAll(res, maxErrorBodyBytes, true));
    } catch (e) {
      if (this.timedOut || this.clientGone) {
        this.close();
        throw this.failure(e);
      }
    }
    this.close();
    throw upstreamError(this.upstream, res.status, text, res.headers.get('retry-after'));
  }

  /** The body, at most `max` bytes (more: cut, or refused when `truncate` is false). */
  private async readAll(res: Response, max: number, truncate = false): Promise<Uint8Array> {
    const parts: Uint8Array[] = [];
    let size = 0;
    if (!res.body) return new Uint8Array();
    for await (const chunk of res.body as AsyncIterable<Uint8Array>) {
      this.touch();
      size += chunk.length;
      if (size > max) {
        if (truncate) break;
        throw new HutchError('UPSTREAM_FAILED', `${this.upstream} sent an answer over ${max} bytes`);
      }
      parts.push(chunk);
    }
    return Buffer.concat(parts);
  }

  /** A JSON answer, bounded; anything that is not a JSON object is the provider's failure. */
  async json<T>(res: Response): Promise<T> {
    try {
      const bytes = await this.readAll(res, maxUpstreamJsonBytes);
      let v: unknown;
      try {
        v = JSON.parse(new TextDecoder().decode(bytes));
      } catch {
        throw new HutchError(
          'UPSTREAM_FAILED',
          `${this.upstream} answered ${res.status} with something that is not JSON`,
        );
      }
      if (v === null || typeof v !== 'object' || Array.isArray(v))
        throw new HutchError('UPSTREAM_FAILED', `${this.upstream} answered with JSON that is not an object`);
      return v as T;
    } catch (e) {
      throw this.failure(e);
    } finally {
      this.close();
    }
  }

  /**
   * The answer's Server-Sent Events, parsed as they arrive (no event may exceed
   * maxUpstreamEventBytes). Ending the iteration early cancels the upstream request.
   */
  async *events(res: Response): AsyncGenerator<SseEvent> {
    const decoder = new TextDecoder();
    let buf = '';
    let event = '';
    let data: string[] = [];
    let dataBytes = 0;
    try {
      if (!res.body) return;
      for await (const chunk of res.body as AsyncIterable<Uint8Array>) {
        this.touch();
        buf += decoder.decode(chunk, { stream: true });
        // Lines are taken by position and the rest kept once per chunk: slicing the buffer per
        // line would copy a chunk of many small events over and over.
        let at = 0;
        let nl = buf.indexOf('\n', at);
        while (nl >= 0) {
          const line = buf.slice(at, buf[nl - 1] === '\r' && nl > at ? nl - 1 : nl);
          at = nl + 1;
          nl = buf.indexOf('\n', at);
          if (line === '') {
            if (data.length) yield { event: event || 'message', data: data.join('\n') };
            event = '';
            data = [];
            dataBytes = 0;
          } else if (line.startsWith(':')) {
            // a comment (OpenRouter's keep-alive "processing" lines)
          } else {
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
            if (field === 'data') {
              data.push(value);
              dataBytes += value.length;
            } else if (field === 'event') event = value;
          }
        }
        buf = buf.slice(at);
        if (buf.length + dataBytes > maxUpstreamEventBytes)
          throw new HutchError(
            'UPSTREAM_FAILED',
            `${this.upstream} sent a stream event over ${maxUpstreamEventBytes} bytes`,
          );
      }
      if (data.length) yield { event: event || 'message', data: data.join('\n') };
    } catch (e) {
      throw this.failure(e);
    } finally {
      this.close();
    }
  }
}

interface ProviderError {
  error?: { message?: unknown; type?: unknown } | string;
  message?: unknown;
}

/** The provider's own message from an error body (Anthropic's and OpenAI's shapes), else a bit of it. */
function messageOf(text: string): string {
  try {
    const v = JSON.parse(text) as ProviderError;
    const m = typeof v.error === 'string' ? v.error : (v.error?.message ?? v.message);
    if (typeof m === 'string' && m !== '') return m.slice(0, 2000);
  } catch {
    // not JSON
  }
  const t = text.trim().slice(0, 200);
  return t === '' ? '(no message)' : JSON.stringify(t);
}

/**
 * An upstream error status as hutch's code: the client's mistake stays a 400 with the
 * provider's words, a refused key is the gateway's problem (502, never the key itself), rate
 * limits keep their Retry-After, everything else is a 502.
 */
export function upstreamError(
  upstream: UpstreamName,
  status: number,
  text: string,
  retryAfter: string | null,
): HutchError {
  const msg = messageOf(text);
  if (status === 429) {
    const secs = retryAfterSeconds(retryAfter);
    return new HutchError('UPSTREAM_RATE_LIMITED', `${upstream} is rate limiting the gateway: ${msg}`, {
      ...(secs !== undefined ? { retry_after_ms: Math.round(secs * 1000) } : {}),
    });
  }
  if (status === 401 || status === 403)
    return new HutchError(
      'UPSTREAM_FAILED',
      `${upstream} refused the gateway's key (${status}); ask the operator`,
    );
  if (status === 404) return new HutchError('MODEL_NOT_FOUND', `${upstream}: ${msg}`);
  if (status === 413) return new HutchError('BODY_TOO_LARGE', `${upstream}: ${msg}`);
  if (status >= 400 && status < 500) return new HutchError('INVALID_ARGUMENT', `${upstream}: ${msg}`);
  return new HutchError('UPSTREAM_FAILED', `${upstream} answered ${status}: ${msg}`);
}

/**
 * A Retry-After in seconds: delta-seconds, or an HTTP date (RFC 9110) counted from now, at
 * least 0; undefined when absent or neither. Capped at a day: a provider's header is not a
 * reason to tell clients to wait forever.
 */
export function retryAfterSeconds(value: string | null, nowMs = Date.now()): number | undefined {
  if (value === null) return undefined;
  const v = value.trim();
  let secs: number | undefined;
  if (/^\d+(\.\d+)?$/.test(v)) secs = Number(v);
  else if (/[a-z]/i.test(v)) {
    const at = Date.parse(v);
    if (!Number.isNaN(at)) secs = Math.max(0, (at - nowMs) / 1000);
  }
  return secs === undefined ? undefined : Math.min(secs, 86_400);
}
