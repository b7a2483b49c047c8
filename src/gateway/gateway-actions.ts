import { join } from 'node:path';
import type { Log } from '../background.js';
import type { Config } from '../config.js';
import type { Principal } from '../core/principal.js';
import { HutchError, toHutchError } from '../errors.js';
import type {
  AnthropicMessagesRequest,
  AnthropicMessagesResponse,
  AnthropicStreamEvent,
} from './anthropic-types.js';
import { openAiError } from './gateway-errors.js';
import { ModelCatalog, type UpstreamConfig, upstreamOf } from './model-catalog.js';
import type { ChatCompletionRequest, ModelList } from './openai-types.js';
import { toAnthropicRequest } from './translate-request.js';
import { AnthropicStreamTranslator, chatUsage, toChatCompletion } from './translate-response.js';
import { UpstreamCall, type UpstreamName } from './upstream.js';
import { type UsageRow, UsageStore, type UsageTotal } from './usage-store.js';

/**
 * A chat completion's answer: one JSON body, or the `data:` payloads of an SSE stream (each a
 * JSON chunk, the last `[DONE]`). A stream is returned only once the provider has accepted the
 * request, so refusals are ordinary HTTP errors; what fails later is an error chunk.
 */
export type ChatCompletionResult =
  | { stream: false; body: unknown }
  | { stream: true; events: AsyncGenerator<string> };

export interface UsageReport {
  object: 'usage';
  user: string;
  since: number;
  data: UsageTotal[];
}

/** A status for the usage row of a request whose client went away first (nginx's convention). */
const clientClosed = 499;

/** What a stream's body tells its guard: the status to record. */
interface StreamState {
  status: number;
}

/**
 * The model gateway's actions (core/dispatch.ts `on: 'gateway'`): OpenAI chat completions served
 * by Anthropic (translated) or OpenRouter (passed through), the usable models, each user's usage,
 * and the Anthropic Messages call hutch's own agents make. Every request is recorded in
 * gateway.db for its principal's user.
 */
export class GatewayActions {
  private readonly usageStore: UsageStore;
  private readonly upstreams: Record<UpstreamName, UpstreamConfig>;
  private readonly catalog: ModelCatalog;
  private readonly timeoutMs: number;

  constructor(
    config: Pick<
      Config,
      | 'stateDir'
      | 'anthropicKey'
      | 'anthropicBaseUrl'
      | 'anthropicModels'
      | 'openrouterKey'
      | 'openrouterBaseUrl'
      | 'gatewayTimeoutMs'
    >,
    private readonly log: Log,
  ) {
    this.usageStore = new UsageStore(join(config.stateDir, 'gateway.db'));
    this.upstreams = {
      anthropic: { name: 'anthropic', baseUrl: config.anthropicBaseUrl, key: config.anthropicKey },
      openrouter: { name: 'openrouter', baseUrl: config.openrouterBaseUrl, key: config.openrouterKey },
    };
    this.timeoutMs = config.gatewayTimeoutMs;
    this.catalog = new ModelCatalog(this.upstreams, this.timeoutMs, config.anthropicModels, log);
  }

  close(): void {
    this.usageStore.close();
  }

  /** The provider for a model, refused when it has no key here (its models are not served). */
  private upstreamFor(model: string, name = upstreamOf(model)): UpstreamConfig & { key: string } {
    const u = this.upstreams[name];
    if (!u.key) {
      const env = u.name === 'anthropic' ? 'HUTCH_ANTHROPIC_KEY' : 'HUTCH_OPENROUTER_KEY';
      throw new HutchError(
        'MODEL_NOT_FOUND',
        `model ${JSON.stringify(model)} would be served by ${u.name}, which has no key on this server (${env}); GET /v1/models lists the usable models`,
        { param: 'model' },
      );
    }
    return u as UpstreamConfig & { key: string };
  }

  private record(p: Principal, row: Omit<UsageRow, 'user' | 'at' | 'ms'>, t0: number): void {
    try {
      this.usageStore.record({
        ...row,
        user: p.user,
        at: Date.now(),
        ms: Math.round(performance.now() - t0),
      });
    } catch (e) {
      // Losing a usage row must not fail the answer the client already has.
      this.log('error', 'gateway: usage not recorded', { user: p.user, error: (e as Error).message });
    }
  }

  async listModels(_p: Principal): Promise<ModelList> {
    return this.catalog.list();
  }

  /** One model of the list (OpenAI's `models.retrieve`); MODEL_NOT_FOUND when it is not served. */
  async getModel(_p: Principal, id: string): Promise<ModelList['data'][number]> {
    const m = (await this.catalog.list()).data.find((x) => x.id === id);
    if (m) return m;
    throw new HutchError(
      'MODEL_NOT_FOUND',
      `no model ${JSON.stringify(id.slice(0, 200))} is served here; GET /v1/models lists the usable models`,
      { param: 'model' },
    );
  }

  usage(p: Principal, opts: { since?: number } = {}): UsageReport {
    const since = opts.since ?? 0;
    return { object: 'usage', user: p.user, since, data: this.usageStore.totals(p.user, since) };
  }

  async chatCompletions(
    p: Principal,
    req: ChatCompletionRequest,
    opts: { signal?: AbortSignal } = {},
  ): Promise<ChatCompletionResult> {
    const u = this.upstreamFor(req.model);
    return u.name === 'anthropic'
      ? this.viaAnthropic(p, u, req, opts.signal)
      : this.viaOpenRouter(p, u, req, opts.signal);
  }

  /** Sends, and records the request as failed when the provider refuses it. */
  private async send(
    p: Principal,
    call: UpstreamCall,
    model: string,
    source: UsageRow['source'],
    t0: number,
    url: string,
    headers: Record<string, string>,
    body: unknown,
  ): Promise<Response> {
    try {
      return await call.send(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', ...headers },
        body: JSON.stringify(body),
      });
    } catch (e) {
      this.recordFailure(p, call, model, source, t0, e);
      throw e;
    }
  }

  /**
   * A stream as the client gets it: an upstream failure becomes an error chunk (unless the
   * client has gone), and however it ends the upstream call is closed and the request recorded
   * with the tokens counted so far.
   */
  private async *guarded(
    p: Principal,
    call: UpstreamCall,
    what: { model: string; upstream: 'anthropic' | 'openrouter' },
    t0: number,
    body: (state: StreamState) => AsyncGenerator<string>,
    used: () => { prompt_tokens?: number; completion_tokens?: number } | undefined,
  ): AsyncGenerator<string> {
    const state: StreamState = { status: 200 };
    try {
      yield* body(state);
    } catch (e) {
      if (call.clientGone) return;
      const err = toHutchError(e);
      state.status = err.httpStatus;
      yield errorChunk(err);
    } finally {
      call.close();
      this.record(
        p,
        { ...what, ...tokens(used()), status: call.clientGone ? clientClosed : state.status, source: 'api' },
        t0,
      );
    }
  }

  private recordFailure(
    p: Principal,
    call: UpstreamCall,
    model: string,
    source: UsageRow['source'],
    t0: number,
    e: unknown,
  ): void {
    const status = call.clientGone ? clientClosed : toHutchError(e).httpStatus;
    this.record(
      p,
      { model, upstream: call.upstream, prompt_tokens: 0, completion_tokens: 0, status, source },
      t0,
    );
  }

  private anthropicHeaders(key: string, beta?: string[]): Record<string, string> {
    return {
      'x-api-key': key,
      'anthropic-version': '2023-06-01',
      ...(beta?.length ? { 'anthropic-beta': beta.join(',') } : {}),
    };
  }

  private async viaAnthropic(
    p: Principal,
    u: UpstreamConfig & { key: string },
    req: ChatCompletionRequest,
    signal: AbortSignal | undefined,
  ): Promise<ChatCompletionResult> {
    const body = toAnthropicRequest(req);
    const t0 = performance.now();
    const call = new UpstreamCall('anthropic', this.timeoutMs, signal);
    const res = await this.send(
      p,
      call,
      req.model,
      'api',
      t0,
      `${u.baseUrl}/v1/messages`,
      this.anthropicHeaders(u.key),
      body,
    );
    if (!req.stream) {
      let msg: AnthropicMessagesResponse;
      try {
        msg = checkMessage(await call.json<AnthropicMessagesResponse>(res));
      } catch (e) {
        this.recordFailure(p, call, req.model, 'api', t0, e);
        throw e;
      }
      const out = toChatCompletion(msg);
      this.record(
        p,
        { model: req.model, upstream: 'anthropic', ...tokens(out.usage), status: 200, source: 'api' },
        t0,
      );
      return { stream: false, body: out };
    }
    const translator = new AnthropicStreamTranslator(req.model, req.stream_options?.include_usage === true);
    async function* events(state: StreamState): AsyncGenerator<string> {
      for await (const ev of call.events(res)) {
        let parsed: AnthropicStreamEvent;
        try {
          parsed = JSON.parse(ev.data) as AnthropicStreamEvent;
        } catch {
          throw new HutchError('UPSTREAM_FAILED', 'anthropic sent a stream event that is not JSON');
        }
        if (parsed === null || typeof parsed !== 'object')
          throw new HutchError('UPSTREAM_FAILED', 'anthropic sent a stream event that is not an object');
        for (const step of translator.step(parsed)) {
          if ('chunk' in step) yield JSON.stringify(step.chunk);
          else if ('error' in step) {
            const type = step.error.type;
            const e = new HutchError(
              type === 'rate_limit_error' ? 'UPSTREAM_RATE_LIMITED' : 'UPSTREAM_FAILED',
              `anthropic: ${step.error.message}`,
            );
            state.status = e.httpStatus;
            yield errorChunk(e);
            return;
          } else {
            yield '[DONE]';
            return;
          }
        }
      }
      if (!translator.finished)
        throw new HutchError('UPSTREAM_FAILED', 'anthropic ended the stream before message_stop');
    }
    return {
      stream: true,
      events: this.guarded(
        p,
        call,
        { model: req.model, upstream: 'anthropic' },
        t0,
        events,
        () => translator.tokens,
      ),
    };
  }

  private async viaOpenRouter(
    p: Principal,
    u: UpstreamConfig & { key: string },
    req: ChatCompletionRequest,
    signal: AbortSignal | undefined,
  ): Promise<ChatCompletionResult> {
    const wantsUsage = req.stream_options?.include_usage === true;
    // Usage is asked for always, so a stream's tokens are recorded; the chunk carrying it is
    // dropped again when the client did not ask.
    const body = req.stream
      ? { ...req, stream_options: { ...(req.stream_options ?? {}), include_usage: true } }
      : req;
    const t0 = performance.now();
    const call = new UpstreamCall('openrouter', this.timeoutMs, signal);
    const res = await this.send(
      p,
      call,
      req.model,
      'api',
      t0,
      `${u.baseUrl}/chat/completions`,
      { authorization: `Bearer ${u.key}` },
      body,
    );
    if (!req.stream) {
      let out: { usage?: { prompt_tokens?: number; completion_tokens?: number } };
      try {
        out = await call.json(res);
      } catch (e) {
        this.recordFailure(p, call, req.model, 'api', t0, e);
        throw e;
      }
      this.record(
        p,
        { model: req.model, upstream: 'openrouter', ...tokens(out.usage), status: 200, source: 'api' },
        t0,
      );
      return { stream: false, body: out };
    }
    let used: { prompt_tokens?: number; completion_tokens?: number } | undefined;
    async function* events(state: StreamState): AsyncGenerator<string> {
      for await (const ev of call.events(res)) {
        if (ev.data === '[DONE]') {
          yield '[DONE]';
          return;
        }
        let chunk: { usage?: typeof used; choices?: unknown[]; error?: unknown };
        try {
          chunk = JSON.parse(ev.data) as typeof chunk;
        } catch {
          throw new HutchError('UPSTREAM_FAILED', 'openrouter sent a stream chunk that is not JSON');
        }
        if (chunk === null || typeof chunk !== 'object')
          throw new HutchError('UPSTREAM_FAILED', 'openrouter sent a stream chunk that is not an object');
        if (chunk.usage) used = chunk.usage;
        if (chunk.error !== undefined) {
          // OpenRouter's mid-stream error is already in OpenAI's shape: passed on, then the end.
          state.status = 502;
          yield ev.data;
          return;
        }
        if (!wantsUsage && chunk.usage && Array.isArray(chunk.choices) && chunk.choices.length === 0)
          continue;
        yield ev.data;
      }
      throw new HutchError('UPSTREAM_FAILED', 'openrouter ended the stream without [DONE]');
    }
    return {
      stream: true,
      events: this.guarded(p, call, { model: req.model, upstream: 'openrouter' }, t0, events, () => used),
    };
  }

  /**
   * One Anthropic Messages call for hutch's own agents (src/agents/): sent as given (no
   * translation, `stream` forced off), with `anthropic-beta` from `opts.beta` (e.g.
   * computer-use-2025-01-24), recorded as `agent` usage of `p.user`. Errors are the gateway's
   * HutchError codes (MODEL_NOT_FOUND without a key, UPSTREAM_* from the provider).
   */
  async anthropicMessages(
    p: Principal,
    req: AnthropicMessagesRequest,
    opts: { signal?: AbortSignal; beta?: string[] } = {},
  ): Promise<AnthropicMessagesResponse> {
    const u = this.upstreamFor(req.model, 'anthropic');
    const t0 = performance.now();
    const call = new UpstreamCall('anthropic', this.timeoutMs, opts.signal);
    const res = await this.send(
      p,
      call,
      req.model,
      'agent',
      t0,
      `${u.baseUrl}/v1/messages`,
      this.anthropicHeaders(u.key, opts.beta),
      {
        ...req,
        stream: false,
      },
    );
    let msg: AnthropicMessagesResponse;
    try {
      msg = checkMessage(await call.json<AnthropicMessagesResponse>(res));
    } catch (e) {
      this.recordFailure(p, call, req.model, 'agent', t0, e);
      throw e;
    }
    this.record(
      p,
      {
        model: req.model,
        upstream: 'anthropic',
        ...tokens(chatUsage(msg.usage)),
        status: 200,
        source: 'agent',
      },
      t0,
    );
    return msg;
  }
}

function tokens(u: { prompt_tokens?: number; completion_tokens?: number } | undefined): {
  prompt_tokens: number;
  completion_tokens: number;
} {
  const n = (x: unknown): number =>
    typeof x === 'number' && Number.isFinite(x) && x >= 0 ? Math.floor(x) : 0;
  return { prompt_tokens: n(u?.prompt_tokens), completion_tokens: n(u?.completion_tokens) };
}

/** An Anthropic answer must at least be a message with content blocks to be translated. */
function checkMessage(m: AnthropicMessagesResponse): AnthropicMessagesResponse {
  if (!Array.isArray(m.content) || typeof m.id !== 'string')
    throw new HutchError('UPSTREAM_FAILED', 'anthropic answered with something that is not a message');
  return m;
}

/** A failure after the stream began: one chunk in the gateway's error shape (the SDKs throw it). */
function errorChunk(e: HutchError): string {
  return JSON.stringify({ code: e.code, message: e.message, error: openAiError(e) });
}
