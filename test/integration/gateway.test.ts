import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import OpenAI from 'openai';
import { authed, userWithToken } from '../helpers/accounts.js';
import { cleanup, startDaemon, type TestDaemon, until } from '../helpers/daemon.js';
import {
  anthropicEvents,
  anthropicText,
  anthropicToolUse,
  gatewayEnv,
  type MockLlm,
  openaiText,
  startMockLlm,
} from '../helpers/mock-llm.js';

const png =
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==';

type Body = Record<string, unknown> & { messages: Record<string, unknown>[] };

describe('model gateway: the openai SDK against the daemon, upstreams mocked', () => {
  let mock: MockLlm;
  let d: TestDaemon;
  let alice: Awaited<ReturnType<typeof userWithToken>>;
  let bob: Awaited<ReturnType<typeof userWithToken>>;
  let client: OpenAI;
  const last = (): { body: Body; headers: Record<string, unknown>; aborted: boolean } =>
    mock.requests.at(-1) as never;

  before(async () => {
    mock = await startMockLlm();
    d = await startDaemon({ env: gatewayEnv(mock) });
    alice = await userWithToken(d, 'alice');
    bob = await userWithToken(d, 'bob');
    client = new OpenAI({ baseURL: `${d.url}/v1`, apiKey: alice.token, maxRetries: 0 });
  });
  after(async () => {
    await cleanup(d);
    await mock.close();
  });

  test('non-streaming text via Anthropic: translated there and back', async () => {
    mock.queue('anthropic', { response: anthropicText('Hello there.', { input: 12, output: 7 }) });
    const r = await client.chat.completions.create({
      model: 'claude-sonnet-4-5',
      messages: [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'Say hello' },
      ],
    });
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices[0]?.message.content, 'Hello there.');
    assert.equal(r.choices[0]?.finish_reason, 'stop');
    assert.deepEqual(r.usage, { prompt_tokens: 12, completion_tokens: 7, total_tokens: 19 });
    const sent = last();
    assert.equal(sent.headers['x-api-key'], 'sk-ant-test');
    assert.equal(sent.headers['anthropic-version'], '2023-06-01');
    assert.equal(sent.body.system, 'Be brief.');
    assert.equal(sent.body.max_tokens, 4096);
    assert.deepEqual(sent.body.messages, [{ role: 'user', content: 'Say hello' }]);
  });

  test('streaming text: chunks in order, finish reason, usage chunk, [DONE]', async () => {
    mock.queue('anthropic', { response: anthropicText('Streaming works fine.', { input: 5, output: 4 }) });
    const stream = await client.chat.completions.create({
      model: 'claude-sonnet-4-5',
      messages: [{ role: 'user', content: 'stream please' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let pieces = 0;
    let finish: string | null = null;
    let usage: unknown;
    let first = true;
    for await (const c of stream) {
      if (first) assert.equal(c.choices[0]?.delta.role, 'assistant');
      first = false;
      const t = c.choices[0]?.delta.content;
      if (t) {
        text += t;
        pieces++;
      }
      finish = c.choices[0]?.finish_reason ?? finish;
      if (c.usage) usage = c.usage;
    }
    assert.equal(text, 'Streaming works fine.');
    assert.ok(pieces >= 3, `text in pieces (${pieces})`);
    assert.equal(finish, 'stop');
    assert.deepEqual(usage, { prompt_tokens: 5, completion_tokens: 4, total_tokens: 9 });
    assert.equal(last().body.stream, true);
  });

  test('tools round trip: tool_calls out, tool result back in as tool_result', async () => {
    const tools = [
      {
        type: 'function' as const,
        function: {
          name: 'get_weather',
          description: 'Weather in a city',
          parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
        },
      },
    ];
    mock.queue('anthropic', {
      response: anthropicToolUse('get_weather', { city: 'Paris' }, { id: 'toolu_1' }),
    });
    const ask = [{ role: 'user' as const, content: 'Weather in Paris?' }];
    const r1 = await client.chat.completions.create({
      model: 'claude-sonnet-4-5',
      messages: ask,
      tools,
      tool_choice: 'auto',
    });
    const call = r1.choices[0]?.message.tool_calls?.[0];
    assert.equal(r1.choices[0]?.finish_reason, 'tool_calls');
    assert.ok(call && call.type === 'function');
    assert.equal(call.id, 'toolu_1');
    assert.equal(call.function.name, 'get_weather');
    assert.deepEqual(JSON.parse(call.function.arguments), { city: 'Paris' });
    assert.deepEqual((last().body.tools as unknown[])[0], {
      name: 'get_weather',
      description: 'Weather in a city',
      input_schema: tools[0]?.function.parameters,
    });
    assert.deepEqual(last().body.tool_choice, { type: 'auto' });

    mock.queue('anthropic', { response: anthropicText('It is 18 C in Paris.') });
    const r2 = await client.chat.completions.create({
      model: 'claude-sonnet-4-5',
      tools,
      messages: [
        ...ask,
        r1.choices[0]?.message as OpenAI.ChatCompletionMessageParam,
        { role: 'tool', tool_call_id: call.id, content: '18 C' },
      ],
    });
    assert.equal(r2.choices[0]?.message.content, 'It is 18 C in Paris.');
    assert.deepEqual(last().body.messages, [
      { role: 'user', content: 'Weather in Paris?' },
      {
        role: 'assistant',
        content: [{ type: 'tool_use', id: 'toolu_1', name: 'get_weather', input: { city: 'Paris' } }],
      },
      { role: 'user', content: [{ type: 'tool_result', tool_use_id: 'toolu_1', content: '18 C' }] },
    ]);

    // The same call streamed: id and name first, then the arguments in fragments.
    mock.queue('anthropic', {
      response: anthropicToolUse('get_weather', { city: 'Paris' }, { id: 'toolu_2' }),
    });
    const stream = await client.chat.completions.create({
      model: 'claude-sonnet-4-5',
      messages: ask,
      tools,
      stream: true,
    });
    let args = '';
    let id = '';
    let name = '';
    let finish = '';
    for await (const c of stream) {
      for (const t of c.choices[0]?.delta.tool_calls ?? []) {
        id ||= t.id ?? '';
        name ||= t.function?.name ?? '';
        args += t.function?.arguments ?? '';
      }
      finish = c.choices[0]?.finish_reason ?? finish;
    }
    assert.deepEqual(
      [id, name, JSON.parse(args), finish],
      ['toolu_2', 'get_weather', { city: 'Paris' }, 'tool_calls'],
    );
  });

  test('an image content part reaches Anthropic as a base64 image block', async () => {
    mock.queue('anthropic', { response: anthropicText('A red pixel.') });
    const r = await client.chat.completions.create({
      model: 'claude-sonnet-4-5',
      messages: [
        {
          role: 'user',
          content: [
            { type: 'text', text: 'What is this?' },
            { type: 'image_url', image_url: { url: `data:image/png;base64,${png}` } },
          ],
        },
      ],
    });
    assert.equal(r.choices[0]?.message.content, 'A red pixel.');
    assert.deepEqual(last().body.messages[0]?.content, [
      { type: 'text', text: 'What is this?' },
      { type: 'image', source: { type: 'base64', media_type: 'image/png', data: png } },
    ]);
  });

  test('other models pass through to OpenRouter, JSON and streamed', async () => {
    mock.queue('openai', {
      response: openaiText('hi from llama', { model: 'meta-llama/llama-3.1-8b-instruct' }),
    });
    const r = await client.chat.completions.create({
      model: 'meta-llama/llama-3.1-8b-instruct',
      messages: [{ role: 'user', content: 'hi' }],
      temperature: 1.5,
    });
    assert.equal(r.choices[0]?.message.content, 'hi from llama');
    assert.equal(last().headers.authorization, 'Bearer sk-or-test');
    assert.equal(last().body.temperature, 1.5);
    assert.equal(last().body.model, 'meta-llama/llama-3.1-8b-instruct');

    mock.queue('openai', { response: openaiText('streamed through openrouter') });
    const stream = await client.chat.completions.create({
      model: 'openai/gpt-4o-mini',
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
    });
    let text = '';
    let sawUsage = false;
    for await (const c of stream) {
      text += c.choices[0]?.delta.content ?? '';
      if (c.usage) sawUsage = true;
    }
    assert.equal(text, 'streamed through openrouter');
    // Asked upstream (to record it), not passed to a client that did not ask.
    assert.deepEqual(last().body.stream_options, { include_usage: true });
    assert.equal(sawUsage, false);
  });

  test('GET /v1/models lists the models of both providers', async () => {
    const ids = (await client.models.list()).data.map((m) => m.id).sort();
    assert.deepEqual(ids, [
      'claude-haiku-4-5',
      'claude-sonnet-4-5',
      'meta-llama/llama-3.1-8b-instruct',
      'openai/gpt-4o-mini',
    ]);
    const m = (await client.models.list()).data.find((x) => x.id === 'claude-sonnet-4-5');
    assert.equal(m?.object, 'model');
    assert.equal(m?.owned_by, 'anthropic');
  });

  test('GET /v1/models/{id}: one model, slashes and colons included; one not served is 404', async () => {
    const listed = (await client.models.list()).data;
    for (const id of ['claude-sonnet-4-5', 'openai/gpt-4o-mini']) {
      const m = await client.models.retrieve(id);
      assert.deepEqual(
        m,
        listed.find((x) => x.id === id),
      );
    }
    // Unescaped, as curl sends it.
    const raw = await fetch(`${d.url}/v1/models/meta-llama/llama-3.1-8b-instruct`, {
      headers: { authorization: `Bearer ${alice.token}` },
    });
    assert.equal(((await raw.json()) as { id: string }).id, 'meta-llama/llama-3.1-8b-instruct');
    for (const id of ['gpt-99', 'meta-llama/llama-3.1-8b-instruct:free'])
      await assert.rejects(client.models.retrieve(id), (e: unknown) => {
        assert.ok(e instanceof OpenAI.NotFoundError, String(e));
        assert.equal((e.error as { code?: string }).code, 'MODEL_NOT_FOUND');
        return true;
      });
    // A web page is not the loopback listener's admin: a site the user visits cannot spend the
    // operator's model keys through the gateway.
    const page = { origin: 'http://evil.example' };
    const asked = mock.requests.length;
    assert.equal((await fetch(`${d.url}/v1/models/claude-sonnet-4-5`, { headers: page })).status, 401);
    const spend = await fetch(`${d.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { ...page, 'content-type': 'text/plain' },
      body: JSON.stringify({ model: 'claude-sonnet-4-5', messages: [{ role: 'user', content: 'x' }] }),
    });
    assert.equal(spend.status, 401);
    assert.equal(mock.requests.length, asked, 'nothing went upstream');
  });

  test('upstream errors: 429 with Retry-After, 400 with its message, 401/500/garbage → 502, hang → 504', async () => {
    const ask = { model: 'claude-sonnet-4-5', messages: [{ role: 'user' as const, content: 'x' }] };
    mock.queue('anthropic', {
      status: 429,
      body: {
        type: 'error',
        error: { type: 'rate_limit_error', message: 'Number of requests has exceeded your rate limit' },
      },
      headers: { 'retry-after': '17' },
    });
    await assert.rejects(client.chat.completions.create(ask), (e: unknown) => {
      assert.ok(e instanceof OpenAI.RateLimitError);
      assert.equal(e.status, 429);
      assert.equal(e.headers?.get('retry-after'), '17');
      assert.equal((e.error as { code?: string }).code, 'UPSTREAM_RATE_LIMITED');
      assert.match(e.message, /rate limit/);
      return true;
    });
    mock.queue('anthropic', {
      status: 400,
      body: { type: 'error', error: { type: 'invalid_request_error', message: 'temperature: range: 0..1' } },
    });
    await assert.rejects(client.chat.completions.create({ ...ask, temperature: 1.7 }), (e: unknown) => {
      assert.ok(e instanceof OpenAI.BadRequestError);
      assert.match(e.message, /temperature: range/);
      return true;
    });
    mock.queue('openai', {
      status: 401,
      body: { error: { message: 'No auth credentials found for sk-or-test' } },
    });
    await assert.rejects(
      client.chat.completions.create({ ...ask, model: 'openai/gpt-4o-mini' }),
      (e: unknown) => {
        assert.ok(e instanceof OpenAI.APIError);
        assert.equal(e.status, 502);
        assert.match(e.message, /refused the gateway's key/);
        assert.doesNotMatch(JSON.stringify(e.error), /sk-or-test/);
        return true;
      },
    );
    mock.queue('anthropic', {
      status: 500,
      body: { type: 'error', error: { type: 'api_error', message: 'Internal server error' } },
    });
    await assert.rejects(client.chat.completions.create(ask), (e: unknown) => {
      assert.ok(e instanceof OpenAI.APIError);
      assert.equal(e.status, 502);
      assert.equal((e.error as { code?: string }).code, 'UPSTREAM_FAILED');
      return true;
    });
    mock.queue('anthropic', {
      raw: (res) => res.writeHead(200, { 'content-type': 'application/json' }).end('<html>'),
    });
    await assert.rejects(
      client.chat.completions.create(ask),
      (e: unknown) => (e as { status?: number }).status === 502,
    );
    mock.queue('anthropic', { hang: true });
    const t0 = Date.now();
    await assert.rejects(client.chat.completions.create(ask), (e: unknown) => {
      assert.ok(e instanceof OpenAI.APIError);
      assert.equal(e.status, 504);
      assert.equal((e.error as { code?: string; type?: string }).type, 'timeout');
      return true;
    });
    assert.ok(Date.now() - t0 >= 1400);
    // Mid-stream: an error event becomes an error the SDK throws from the iteration.
    mock.queue('anthropic', {
      raw: (res) => {
        const [start] = anthropicEvents(anthropicText('x') as never);
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write(`event: message_start\ndata: ${JSON.stringify(start?.data)}\n\n`);
        res.end(
          'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n',
        );
      },
    });
    const stream = await client.chat.completions.create({ ...ask, stream: true });
    await assert.rejects(
      (async () => {
        for await (const _ of stream);
      })(),
      /Overloaded/,
    );
  });

  test('bad bodies are 400 in both error shapes and never reach upstream', async () => {
    const before = mock.requests.length;
    const r = await authed(
      d.url,
      'POST',
      '/v1/chat/completions',
      { token: alice.token },
      { model: 'claude-x', messages: [] },
    );
    assert.equal(r.status, 400);
    assert.equal(r.body.code, 'INVALID_ARGUMENT');
    assert.equal((r.body.error as { type: string }).type, 'invalid_request_error');
    const bad = await authed(
      d.url,
      'POST',
      '/v1/chat/completions',
      { token: alice.token },
      {
        model: 'claude-x',
        messages: [
          {
            role: 'assistant',
            content: null,
            tool_calls: [{ id: 'c', type: 'function', function: { name: 'f', arguments: '{' } }],
          },
        ],
      },
    );
    assert.equal(bad.status, 400);
    assert.match(bad.body.message as string, /not valid JSON/);
    assert.equal(mock.requests.length, before);
  });

  test('a client that goes away cancels the upstream request (JSON and streaming)', async () => {
    mock.queue('anthropic', { hang: true });
    const ac = new AbortController();
    const n = mock.requests.length;
    const p = client.chat.completions.create(
      { model: 'claude-sonnet-4-5', messages: [{ role: 'user', content: 'x' }] },
      { signal: ac.signal },
    );
    await until('the request reaches the mock', () => mock.requests.length > n, 5000);
    ac.abort();
    await assert.rejects(p);
    const rec = mock.requests[n];
    await until('the mock sees its connection closed', () => rec?.aborted === true, 5000);

    // A stream that never ends: the client reads one chunk, then leaves.
    mock.queue('anthropic', {
      raw: (res) => {
        const evs = anthropicEvents(anthropicText('x') as never);
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write(`event: message_start\ndata: ${JSON.stringify(evs[0]?.data)}\n\n`);
        const t = setInterval(() => res.write('event: ping\ndata: {"type":"ping"}\n\n'), 50);
        res.on('close', () => clearInterval(t));
      },
    });
    const ac2 = new AbortController();
    const m = mock.requests.length;
    const stream = await client.chat.completions.create(
      { model: 'claude-sonnet-4-5', messages: [{ role: 'user', content: 'x' }], stream: true },
      { signal: ac2.signal },
    );
    for await (const _ of stream) {
      ac2.abort();
      break;
    }
    const rec2 = mock.requests[m];
    await until('the mock sees the stream cut', () => rec2?.aborted === true, 5000);
    // Both are recorded for alice as abandoned (499), not as failures of the provider.
    const db = new Database(join(d.stateDir, 'gateway.db'), { readonly: true });
    try {
      await until(
        'both abandoned requests are recorded',
        () =>
          (
            db.prepare("SELECT COUNT(*) AS n FROM usage WHERE user = 'alice' AND status = 499").get() as {
              n: number;
            }
          ).n === 2,
        5000,
      );
    } finally {
      db.close();
    }
  });

  test('usage: per user, per model, only the caller sees theirs', async () => {
    mock.queue('anthropic', { response: anthropicText('for bob', { input: 3, output: 2 }) });
    const bobClient = new OpenAI({ baseURL: `${d.url}/v1`, apiKey: bob.token, maxRetries: 0 });
    await bobClient.chat.completions.create({
      model: 'claude-haiku-4-5',
      messages: [{ role: 'user', content: 'x' }],
    });
    const b = await authed(d.url, 'GET', '/v1/usage', { token: bob.token });
    assert.equal(b.status, 200);
    assert.equal(b.body.user, 'bob');
    assert.deepEqual(b.body.data, [
      { model: 'claude-haiku-4-5', requests: 1, prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 },
    ]);
    const a = await authed(d.url, 'GET', '/v1/usage', { token: alice.token });
    const rows = a.body.data as { model: string; requests: number; prompt_tokens: number }[];
    assert.ok(!rows.some((r) => r.model === 'claude-haiku-4-5'), 'bob’s usage is not alice’s');
    const sonnet = rows.find((r) => r.model === 'claude-sonnet-4-5');
    assert.ok(sonnet && sonnet.requests >= 5 && sonnet.prompt_tokens >= 12 + 5);
    assert.ok(rows.some((r) => r.model === 'meta-llama/llama-3.1-8b-instruct'));
    const future = await authed(d.url, 'GET', `/v1/usage?since=${Math.floor(Date.now() / 1000) + 3600}`, {
      token: alice.token,
    });
    assert.deepEqual(future.body.data, []);
    const bad = await authed(d.url, 'GET', '/v1/usage?since=yesterday', { token: alice.token });
    assert.equal(bad.status, 400);
  });
});

describe('model gateway without an Anthropic key', () => {
  let mock: MockLlm;
  let d: TestDaemon;
  before(async () => {
    mock = await startMockLlm();
    d = await startDaemon({ env: gatewayEnv(mock, { anthropic: false }) });
  });
  after(async () => {
    await cleanup(d);
    await mock.close();
  });

  test('/v1/models lists only OpenRouter models; a claude model is MODEL_NOT_FOUND naming the key', async () => {
    // The loopback admin (no token) is a principal like any other.
    const client = new OpenAI({
      baseURL: `${d.url}/v1`,
      apiKey: 'unused',
      maxRetries: 0,
      defaultHeaders: { authorization: null as never },
    });
    const ids = (await client.models.list()).data.map((m) => m.id).sort();
    assert.deepEqual(ids, ['meta-llama/llama-3.1-8b-instruct', 'openai/gpt-4o-mini']);
    await assert.rejects(
      client.chat.completions.create({
        model: 'claude-sonnet-4-5',
        messages: [{ role: 'user', content: 'x' }],
      }),
      (e: unknown) => {
        assert.ok(e instanceof OpenAI.NotFoundError);
        assert.equal((e.error as { code?: string }).code, 'MODEL_NOT_FOUND');
        assert.match(e.message, /HUTCH_ANTHROPIC_KEY/);
        return true;
      },
    );
    assert.equal(mock.requests.filter((r) => r.api === 'anthropic').length, 0);
  });
});
