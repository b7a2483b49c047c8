import { createServer, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * A local stand-in for the model providers, speaking their real wire formats: Anthropic's
 * Messages API (POST /v1/messages, GET /v1/models) and OpenAI's / OpenRouter's chat completions
 * (POST /chat/completions, GET /models), JSON and, for a request with `stream: true`, SSE in many
 * events (text in pieces, tool arguments as input_json_delta / argument fragments). Tests queue
 * the answers; an empty queue answers 500 naming the request, so a test that sent one request
 * too many fails loudly.
 */

export type MockApi = 'anthropic' | 'openai';

export type MockTurn = (
  | { response: object }
  | { status: number; body: object; headers?: Record<string, string> }
  | { hang: true }
  /** Anything else (garbage, endless streams): the test writes the answer itself. */
  | { raw: (res: ServerResponse, req: IncomingMessage) => void }
) & { delayMs?: number };

export interface RecordedRequest {
  api: MockApi;
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  /** The parsed JSON body (undefined for a GET). */
  body: unknown;
  /** Set once the client closed the connection before the answer was complete. */
  aborted: boolean;
}

export interface MockLlm {
  /** http://127.0.0.1:PORT */
  url: string;
  /** What HUTCH_ANTHROPIC_BASE_URL should be. */
  anthropicBaseUrl: string;
  /** What HUTCH_OPENROUTER_BASE_URL should be. */
  openaiBaseUrl: string;
  queue(api: MockApi, ...turns: MockTurn[]): void;
  requests: RecordedRequest[];
  close(): Promise<void>;
}

export interface MockLlmOptions {
  /** The x-api-key Anthropic requests must carry (default "sk-ant-test"). */
  anthropicKey?: string;
  /** The bearer key OpenAI/OpenRouter requests must carry (default "sk-or-test"). */
  openaiKey?: string;
  anthropicModels?: string[];
  openaiModels?: string[];
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

/** A string in `n` pieces (at least one character each), as providers send text. */
export function pieces(s: string, n = 3): string[] {
  if (s.length <= 1) return [s];
  const size = Math.max(1, Math.ceil(s.length / n));
  const out: string[] = [];
  for (let i = 0; i < s.length; i += size) out.push(s.slice(i, i + size));
  return out;
}

type Block = { type: string; text?: string; id?: string; name?: string; input?: unknown };
interface AnthropicMsg {
  id: string;
  model: string;
  content: Block[];
  stop_reason: string | null;
  usage: { input_tokens: number; output_tokens: number };
}

/** A full Anthropic Message as the events its streaming API sends for it. */
export function anthropicEvents(m: AnthropicMsg): { event: string; data: object }[] {
  const ev: { event: string; data: object }[] = [];
  ev.push({
    event: 'message_start',
    data: {
      type: 'message_start',
      message: {
        ...m,
        content: [],
        stop_reason: null,
        stop_sequence: null,
        usage: { ...m.usage, output_tokens: 1 },
      },
    },
  });
  ev.push({ event: 'ping', data: { type: 'ping' } });
  m.content.forEach((b, index) => {
    if (b.type === 'text') {
      ev.push({
        event: 'content_block_start',
        data: { type: 'content_block_start', index, content_block: { type: 'text', text: '' } },
      });
      for (const text of pieces(b.text ?? ''))
        ev.push({
          event: 'content_block_delta',
          data: { type: 'content_block_delta', index, delta: { type: 'text_delta', text } },
        });
    } else if (b.type === 'tool_use') {
      ev.push({
        event: 'content_block_start',
        data: {
          type: 'content_block_start',
          index,
          content_block: { type: 'tool_use', id: b.id, name: b.name, input: {} },
        },
      });
      for (const partial_json of ['', ...pieces(JSON.stringify(b.input ?? {}), 4)])
        ev.push({
          event: 'content_block_delta',
          data: { type: 'content_block_delta', index, delta: { type: 'input_json_delta', partial_json } },
        });
    }
    ev.push({ event: 'content_block_stop', data: { type: 'content_block_stop', index } });
  });
  ev.push({
    event: 'message_delta',
    data: {
      type: 'message_delta',
      delta: { stop_reason: m.stop_reason, stop_sequence: null },
      usage: { output_tokens: m.usage.output_tokens },
    },
  });
  ev.push({ event: 'message_stop', data: { type: 'message_stop' } });
  return ev;
}

interface OpenAiCompletion {
  id: string;
  created: number;
  model: string;
  choices: {
    message: {
      content: string | null;
      tool_calls?: { id: string; type: string; function: { name: string; arguments: string } }[];
    };
    finish_reason: string;
  }[];
  usage?: object;
}

/** A full chat.completion as the chunks OpenAI's (and OpenRouter's) streaming API sends. */
export function openaiChunks(c: OpenAiCompletion, includeUsage: boolean): object[] {
  const base = { id: c.id, object: 'chat.completion.chunk', created: c.created, model: c.model };
  const choice = c.choices[0];
  const out: object[] = [];
  const chunk = (delta: object, finish_reason: string | null = null): object => ({
    ...base,
    choices: [{ index: 0, delta, finish_reason }],
  });
  out.push(chunk({ role: 'assistant', content: '' }));
  for (const text of pieces(choice?.message.content ?? '')) if (text) out.push(chunk({ content: text }));
  (choice?.message.tool_calls ?? []).forEach((t, index) => {
    out.push(
      chunk({
        tool_calls: [
          { index, id: t.id, type: 'function', function: { name: t.function.name, arguments: '' } },
        ],
      }),
    );
    for (const a of pieces(t.function.arguments, 3))
      out.push(chunk({ tool_calls: [{ index, function: { arguments: a } }] }));
  });
  out.push(chunk({}, choice?.finish_reason ?? 'stop'));
  if (includeUsage) out.push({ ...base, choices: [], usage: c.usage });
  return out;
}

export async function startMockLlm(opts: MockLlmOptions = {}): Promise<MockLlm> {
  const anthropicKey = opts.anthropicKey ?? 'sk-ant-test';
  const openaiKey = opts.openaiKey ?? 'sk-or-test';
  const queues: Record<MockApi, MockTurn[]> = { anthropic: [], openai: [] };
  const requests: RecordedRequest[] = [];

  const json = (
    res: ServerResponse,
    status: number,
    body: unknown,
    headers: Record<string, string> = {},
  ): void => {
    const text = JSON.stringify(body);
    res.writeHead(status, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(text),
      ...headers,
    });
    res.end(text);
  };
  const refuse = (res: ServerResponse, api: MockApi, status: number, type: string, message: string): void =>
    json(
      res,
      status,
      api === 'anthropic'
        ? { type: 'error', error: { type, message } }
        : { error: { message, type, code: null } },
    );

  async function sse(res: ServerResponse, events: { event?: string; data: string }[]): Promise<void> {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    for (const e of events) {
      if (res.destroyed) return;
      res.write(`${e.event ? `event: ${e.event}\n` : ''}data: ${e.data}\n\n`);
      // One event per write, each in its own turn of the loop: the client sees them arrive apart.
      await tick();
    }
    res.end();
  }

  async function serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req as AsyncIterable<Buffer>) chunks.push(c);
    const text = Buffer.concat(chunks).toString('utf8');
    const path = (req.url ?? '/').split('?')[0] ?? '/';
    const method = req.method ?? 'GET';
    const api: MockApi | undefined =
      path === '/v1/messages' || path === '/v1/models'
        ? 'anthropic'
        : path === '/chat/completions' || path === '/models'
          ? 'openai'
          : undefined;
    if (!api) return json(res, 404, { error: { message: `mock: no endpoint ${method} ${path}` } });
    let body: unknown;
    if (text !== '')
      try {
        body = JSON.parse(text);
      } catch {
        return refuse(res, api, 400, 'invalid_request_error', 'mock: body is not JSON');
      }
    const rec: RecordedRequest = { api, method, path, headers: req.headers, body, aborted: false };
    requests.push(rec);
    res.on('close', () => {
      if (!res.writableFinished) rec.aborted = true;
    });
    const keyOk =
      api === 'anthropic'
        ? req.headers['x-api-key'] === anthropicKey
        : req.headers.authorization === `Bearer ${openaiKey}`;
    if (!keyOk) return refuse(res, api, 401, 'authentication_error', 'mock: invalid API key');
    if (method === 'GET') {
      if (api === 'anthropic')
        return json(res, 200, {
          data: (opts.anthropicModels ?? ['claude-sonnet-4-5', 'claude-haiku-4-5']).map((id) => ({
            type: 'model',
            id,
            display_name: id,
            created_at: '2025-09-29T00:00:00Z',
          })),
          has_more: false,
        });
      return json(res, 200, {
        data: (opts.openaiModels ?? ['openai/gpt-4o-mini', 'meta-llama/llama-3.1-8b-instruct']).map((id) => ({
          id,
          name: id,
          created: 1721260800,
        })),
      });
    }
    const turn = queues[api].shift();
    if (!turn)
      return json(res, 500, {
        error: {
          type: 'api_error',
          message: `mock-llm: nothing queued for ${api} ${method} ${path} (model ${JSON.stringify((body as { model?: unknown })?.model)})`,
        },
      });
    if (turn.delayMs) await sleep(turn.delayMs);
    if ('hang' in turn) return; // answered by nobody: the client's timeout or abort ends it
    if ('raw' in turn) return turn.raw(res, req);
    if ('status' in turn) return json(res, turn.status, turn.body, turn.headers);
    const stream = (body as { stream?: unknown })?.stream === true;
    if (!stream) return json(res, 200, turn.response);
    if (api === 'anthropic')
      return sse(
        res,
        anthropicEvents(turn.response as AnthropicMsg).map((e) => ({
          event: e.event,
          data: JSON.stringify(e.data),
        })),
      );
    const include =
      (body as { stream_options?: { include_usage?: boolean } }).stream_options?.include_usage === true;
    return sse(res, [
      ...openaiChunks(turn.response as OpenAiCompletion, include).map((c) => ({ data: JSON.stringify(c) })),
      { data: '[DONE]' },
    ]);
  }

  const server = createServer((req, res) => {
    serve(req, res).catch((e: unknown) => {
      if (!res.headersSent)
        json(res, 500, { error: { message: `mock-llm failed: ${(e as Error).message}` } });
      else res.destroy();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    url,
    anthropicBaseUrl: url,
    openaiBaseUrl: url,
    queue: (api, ...turns) => queues[api].push(...turns),
    requests,
    close: () =>
      new Promise<void>((r) => {
        server.close(() => r());
        server.closeAllConnections();
      }),
  };
}

/** Fixtures: a full Anthropic Message and a chat.completion, as the real APIs answer. */
export function anthropicText(
  text: string,
  o: { id?: string; model?: string; input?: number; output?: number } = {},
): object {
  return {
    id: o.id ?? 'msg_01XFDUDYJgAACzvnptvVoYEL',
    type: 'message',
    role: 'assistant',
    model: o.model ?? 'claude-sonnet-4-5',
    content: [{ type: 'text', text }],
    stop_reason: 'end_turn',
    stop_sequence: null,
    usage: { input_tokens: o.input ?? 12, output_tokens: o.output ?? 7 },
  };
}

export function anthropicToolUse(
  name: string,
  input: object,
  o: { id?: string; text?: string } = {},
): object {
  return {
    id: 'msg_01Aq9w938a90dw8q',
    type: 'message',
    role: 'assistant',
    model: 'claude-sonnet-4-5',
    content: [
      ...(o.text ? [{ type: 'text', text: o.text }] : []),
      { type: 'tool_use', id: o.id ?? 'toolu_01A09q90qw90lq917835lq9', name, input },
    ],
    stop_reason: 'tool_use',
    stop_sequence: null,
    usage: { input_tokens: 30, output_tokens: 20 },
  };
}

export function openaiText(
  text: string,
  o: { model?: string; prompt?: number; completion?: number } = {},
): object {
  const prompt = o.prompt ?? 9;
  const completion = o.completion ?? 5;
  return {
    id: 'gen-1733000000-abcdef',
    object: 'chat.completion',
    created: 1733000000,
    model: o.model ?? 'openai/gpt-4o-mini',
    choices: [
      { index: 0, message: { role: 'assistant', content: text }, finish_reason: 'stop', logprobs: null },
    ],
    usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion },
  };
}

/** A daemon whose gateway talks to `mock` (keys left out are explicitly unset). */
export function gatewayEnv(
  mock: MockLlm,
  keys: { anthropic?: boolean; openrouter?: boolean } = {},
): Record<string, string> {
  return {
    HUTCH_ANTHROPIC_KEY: keys.anthropic === false ? '' : 'sk-ant-test',
    HUTCH_ANTHROPIC_BASE_URL: mock.anthropicBaseUrl,
    HUTCH_OPENROUTER_KEY: keys.openrouter === false ? '' : 'sk-or-test',
    BORING_OPENROUTER_KEY: '',
    HUTCH_OPENROUTER_BASE_URL: mock.openaiBaseUrl,
    HUTCH_GATEWAY_TIMEOUT_MS: '1500',
    HUTCH_TOKEN_EXCHANGES_PER_MINUTE: '1000',
    HUTCH_NET: 'off',
  };
}
